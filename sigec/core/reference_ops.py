"""Reference (PyTorch) implementations of the ``ai.sigec`` operators.

This module is the executable form of ``docs/ops.md``; every native kernel is tested against it.
It is written for clarity over speed, but is fully vectorised so that it can serve as the
CPU/CUDA fallback of the reference executor.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sigec.core.ops import ACTIVATIONS, PAD_MODES  # noqa: F401 - re-exported: the reference defines their meaning


def apply_activation(v: torch.Tensor, activation: str, alpha: float, beta: float) -> torch.Tensor:
    """Apply one of the prologue activations of ``TileGather`` element-wise."""
    if activation == "none":
        return v
    if activation == "relu":
        return torch.relu(v)
    if activation == "leaky_relu":
        return torch.where(v >= 0, v, v * alpha)
    if activation == "sigmoid":
        return torch.sigmoid(v)
    if activation == "tanh":
        return torch.tanh(v)
    if activation == "silu":
        return v * torch.sigmoid(v)
    if activation == "hard_sigmoid":
        return torch.clamp(v * alpha + beta, 0.0, 1.0)
    if activation == "hard_swish":
        return v * torch.clamp(v / 6.0 + 0.5, 0.0, 1.0)
    if activation == "clip":
        return torch.clamp(v, alpha, beta)
    raise ValueError(f"unknown TileGather activation {activation!r}")


def _map_padding(pos: torch.Tensor, size: int, pad_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Map virtual positions to in-map positions; also return which positions were inside."""
    inside = (pos >= 0) & (pos < size)
    if pad_mode == "zeros":
        return pos.clamp(0, size - 1), inside
    if pad_mode == "edge":
        return pos.clamp(0, size - 1), torch.ones_like(inside)
    if pad_mode == "reflect":
        if size == 1:
            return torch.zeros_like(pos), torch.ones_like(inside)
        period = 2 * (size - 1)
        r = torch.remainder(pos, period)
        return torch.where(r < size, r, period - r), torch.ones_like(inside)
    raise ValueError(f"unknown TileGather pad_mode {pad_mode!r}")


def result_dtype(base: torch.Tensor, vals: torch.Tensor | None) -> torch.dtype:
    """The dtype of ``TileGather`` and ``TileScatter`` outputs: ``base``'s promoted with ``vals``' when
    ``vals`` is given, else ``base``'s (docs/ops.md, "Dtypes"). A float16/bfloat16 cache read with
    float32 tiles gives float32; float32 caches with float16 tiles (autocast) give float32."""
    return base.dtype if vals is None else torch.promote_types(base.dtype, vals.dtype)


def _per_channel(t: torch.Tensor | None, batch: torch.Tensor) -> torch.Tensor | None:
    """Broadcast a [C] or [B, C] prologue parameter to [N, C, 1, 1] for the given tile batches."""
    if t is None:
        return None
    if t.dim() == 1:
        return t.view(1, -1, 1, 1)
    return t[batch].view(batch.shape[0], -1, 1, 1)


def tile_gather(
    base: torch.Tensor,
    vals: torch.Tensor | None,
    grid: torch.Tensor | None,
    coords: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    *,
    window: Sequence[int],
    step: Sequence[int],
    offset: Sequence[int] = (0, 0),
    upsample: int = 1,
    pad_mode: str = "zeros",
    activation: str = "none",
    alpha: float = 0.0,
    beta: float = 0.0,
) -> torch.Tensor:
    """Gather input windows for every output tile (``ai.sigec::TileGather``, docs/ops.md)."""
    _, channels, height, width = base.shape
    n = coords.shape[0]
    wh, ww = int(window[0]), int(window[1])
    out_dtype = result_dtype(base, vals)
    if n == 0:
        return base.new_zeros((0, channels, wh, ww), dtype=out_dtype)
    coords = coords.to(device=base.device, dtype=torch.long)
    b, ty, tx = coords[:, 0], coords[:, 1], coords[:, 2]
    ar_y = torch.arange(wh, device=base.device)
    ar_x = torch.arange(ww, device=base.device)
    vy = ty[:, None] * int(step[0]) + int(offset[0]) + ar_y[None, :]  # [N, wh]
    vx = tx[:, None] * int(step[1]) + int(offset[1]) + ar_x[None, :]  # [N, ww]
    vy, in_y = _map_padding(vy, height * upsample, pad_mode)
    vx, in_x = _map_padding(vx, width * upsample, pad_mode)
    sy = torch.div(vy, upsample, rounding_mode="floor")[:, :, None]  # [N, wh, 1]
    sx = torch.div(vx, upsample, rounding_mode="floor")[:, None, :]  # [N, 1, ww]
    bb = b[:, None, None]
    out = base[bb, :, sy, sx]  # [N, wh, ww, C]
    if vals is not None and vals.shape[0] > 0:
        tile = vals.shape[2]
        slot = grid.to(device=base.device, dtype=torch.long)[bb, sy // tile, sx // tile]
        active = slot >= 0
        from_vals = vals[slot.clamp(min=0), :, sy % tile, sx % tile]
        out = torch.where(active[..., None], from_vals, out)
    out = out.permute(0, 3, 1, 2)  # [N, C, wh, ww]
    scale_t = _per_channel(scale, b)
    shift_t = _per_channel(shift, b)
    if scale_t is not None:
        out = out * scale_t
    if shift_t is not None:
        out = out + shift_t
    out = apply_activation(out, activation, alpha, beta)
    if pad_mode == "zeros":
        inside = (in_y[:, :, None] & in_x[:, None, :])[:, None, :, :]
        out = torch.where(inside, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.to(out_dtype).contiguous()  # mixed dtypes compute promoted (scale/shift too), store as result_dtype


def tile_scatter(base: torch.Tensor, vals: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Write tiles into a copy of ``base`` (``ai.sigec::TileScatter``, docs/ops.md), of dtype
    ``result_dtype(base, vals)``."""
    out = base.to(result_dtype(base, vals), copy=True)
    n = coords.shape[0]
    if n == 0:
        return out
    _, _, height, width = base.shape
    tile = vals.shape[2]
    coords = coords.to(device=base.device, dtype=torch.long)
    b, ty, tx = coords[:, 0], coords[:, 1], coords[:, 2]
    ar = torch.arange(tile, device=base.device)
    yy = ty[:, None] * tile + ar[None, :]  # [N, T]
    xx = tx[:, None] * tile + ar[None, :]  # [N, T]
    valid = (yy < height)[:, :, None] & (xx < width)[:, None, :]  # [N, T, T]
    nn_, iy, ix = torch.nonzero(valid, as_tuple=True)
    out[b[nn_], :, yy[nn_, iy], xx[nn_, ix]] = vals[nn_, :, iy, ix].to(out.dtype)
    return out
