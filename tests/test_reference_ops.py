"""The reference sigec ops against a literal, per-pixel reading of docs/ops.md."""

import numpy as np
import pytest
import torch

from helpers import sparse_input
from sigec.core.reference_ops import ACTIVATIONS, apply_activation, tile_gather, tile_scatter


def _value(base, vals, grid, b, c, y, x):
    if vals is not None:
        t = vals.shape[2]
        slot = grid[b, y // t, x // t]
        if slot >= 0:
            return vals[slot, c, y % t, x % t]
    return base[b, c, y, x]


def _naive_gather(base, vals, grid, coords, scale, shift, window, step, offset, upsample, pad_mode, act):
    _, C, H, W = base.shape
    Hv, Wv = H * upsample, W * upsample
    out = np.zeros((len(coords), C, window[0], window[1]), np.float32)
    for n, (b, ty, tx) in enumerate(coords):
        for c in range(C):
            for i in range(window[0]):
                for j in range(window[1]):
                    vy, vx = ty * step[0] + offset[0] + i, tx * step[1] + offset[1] + j
                    pos = []
                    for v, size in ((vy, Hv), (vx, Wv)):
                        if 0 <= v < size:
                            pos.append(v)
                        elif pad_mode == "zeros":
                            pos.append(None)
                        elif pad_mode == "edge":
                            pos.append(min(max(v, 0), size - 1))
                        else:
                            v = -v if v < 0 else 2 * (size - 1) - v
                            pos.append(v)
                    if None in pos:
                        continue
                    v = _value(base, vals, grid, b, c, pos[0] // upsample, pos[1] // upsample)
                    if scale is not None:
                        v = v * (scale[c] if scale.ndim == 1 else scale[b, c])
                    if shift is not None:
                        v = v + (shift[c] if shift.ndim == 1 else shift[b, c])
                    out[n, c, i, j] = apply_activation(torch.tensor(v), act, 0.1, 0.6).item()
    return out


@pytest.mark.parametrize("pad_mode", ["zeros", "edge", "reflect"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gather_matches_per_pixel_definition(pad_mode, act):
    rng = np.random.default_rng(0)
    B, C, H, W, Ti = 2, 3, 11, 9, 4
    base, vals, grid, _ = sparse_input(rng, B, C, H, W, Ti, frac=0.5).values()
    To, up = 3, 2 if act in ("relu", "tanh") else 1
    gh, gw = -(-H * up // To), -(-W * up // To)
    out_coords = np.argwhere(rng.random((B, gh, gw)) < 0.6).astype(np.int64)
    scale = rng.standard_normal((B, C)).astype(np.float32)
    shift = rng.standard_normal(C).astype(np.float32)
    kw = dict(window=(5, 5), step=(To, To), offset=(-1, -1), upsample=up, pad_mode=pad_mode)
    got = tile_gather(torch.from_numpy(base), torch.from_numpy(vals), torch.from_numpy(grid),
                      torch.from_numpy(out_coords), torch.from_numpy(scale), torch.from_numpy(shift),
                      activation=act, alpha=0.1, beta=0.6, **kw).numpy()
    want = _naive_gather(base, vals, grid, out_coords, scale, shift, kw["window"], kw["step"],
                         kw["offset"], up, pad_mode, act)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_gather_without_vals_reads_base_and_handles_zero_tiles():
    rng = np.random.default_rng(1)
    base = torch.from_numpy(rng.standard_normal((1, 2, 8, 8)).astype(np.float32))
    coords = torch.tensor([[0, 1, 1]])
    got = tile_gather(base, None, None, coords, window=(4, 4), step=(4, 4))
    assert torch.equal(got[0], base[0, :, 4:8, 4:8])
    empty = tile_gather(base, None, None, torch.zeros((0, 3), dtype=torch.long), window=(6, 6), step=(4, 4))
    assert empty.shape == (0, 2, 6, 6)


def test_scatter_crops_border_tiles_and_keeps_base_elsewhere():
    rng = np.random.default_rng(2)
    base, vals, grid, coords = sparse_input(rng, 2, 3, 10, 7, 4, frac=0.4).values()
    got = tile_scatter(torch.from_numpy(base), torch.from_numpy(vals), torch.from_numpy(coords)).numpy()
    for b in range(2):
        for y in range(10):
            for x in range(7):
                np.testing.assert_array_equal(got[b, :, y, x], [_value(base, vals, grid, b, c, y, x) for c in range(3)])


@pytest.mark.parametrize("base_dtype, tile_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32)])
def test_mixed_dtypes_give_the_promoted_dtype(base_dtype, tile_dtype):
    """Under torch.autocast float32 caches meet float16 tiles; half-precision caches (cache_dtype)
    meet float32 tiles: both ops return base's dtype promoted with vals' (float32 here; docs/ops.md,
    "Dtypes"), computed as the upcast inputs would be."""
    rng = np.random.default_rng(3)
    base, vals, grid, coords = sparse_input(rng, 1, 3, 12, 12, 4, frac=0.5).values()
    base_t, vals_t = torch.from_numpy(base).to(base_dtype), torch.from_numpy(vals).to(tile_dtype)
    grid_t, coords_t = torch.from_numpy(grid), torch.from_numpy(coords)
    shift = torch.linspace(-1, 1, 3).to(tile_dtype)
    scattered = tile_scatter(base_t, vals_t, coords_t)
    assert scattered.dtype == torch.float32
    torch.testing.assert_close(scattered.float(), tile_scatter(base_t.float(), vals_t.float(), coords_t),
                               rtol=1e-3, atol=1e-3)
    gathered = tile_gather(base_t, vals_t, grid_t, coords_t, None, shift, window=(6, 6), step=(4, 4),
                           offset=(-1, -1), activation="silu")
    assert gathered.dtype == torch.float32
    expected = tile_gather(base_t.float(), vals_t.float(), grid_t, coords_t, None, shift.float(), window=(6, 6),
                           step=(4, 4), offset=(-1, -1), activation="silu")
    torch.testing.assert_close(gathered.float(), expected, rtol=2e-3, atol=2e-3)
