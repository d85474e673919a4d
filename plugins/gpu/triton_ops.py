"""Triton kernels of the ``ai.sigec`` operators (``TileGather``, ``TileScatter``; docs/ops.md).

The wrappers :func:`tile_gather` and :func:`tile_scatter` take and return the same arguments as
their references in :mod:`sigec.core.reference_ops`, so the PyTorch executor can swap them in
(``torch_onnx_ops.SIGEC_OPS``: CUDA tensors, or ``SIGEC_TRITON=1``). On CPU tensors they run only
under Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is imported), which is
how the tests check them on machines without a GPU.

Layout of the work: one program per (output tile, block of channels, block of window positions).
Everything that depends on the position only (padding, upsampling, the tile-grid lookup that
decides between ``vals`` and ``base``) is computed once per position and shared by the block's
channels; loads and stores are ``[BLOCK_C, BLOCK_P]`` tiles, contiguous along the positions.
The prologue (scale, shift, activation) is computed in float32 and rounded once to the output
dtype, which is ``reference_ops.result_dtype(base, vals)``: a float16/bfloat16 ``base`` (a half
cache) read with float32 ``vals`` is loaded and widened, and the output is float32. Supported
dtypes: float32, float16, bfloat16; other dtypes fall back to the reference.
Block sizes are a first guess, not tuned on a GPU.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import triton
import triton.language as tl

from sigec.core.errors import BackendError

from sigec.core import reference_ops

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
"""Whether Triton's CPU interpreter was on when this module was imported (kernels then accept CPU tensors)."""

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Kernel codes: the position in reference_ops' vocabularies (the numbers tested in _activate).
PAD_MODE_CODES = {name: code for code, name in enumerate(reference_ops.PAD_MODES)}
ACTIVATION_CODES = {name: code for code, name in enumerate(reference_ops.ACTIVATIONS)}
ELEMENTS_PER_PROGRAM = 2048  # BLOCK_C * BLOCK_P
MAX_BLOCK_P = 128
NUM_WARPS = 4


@triton.jit
def _clamp01(x):
    """Clamp to [0, 1], keeping NaN (as ``torch.clamp``)."""
    x = tl.where(x < 0.0, 0.0, x)
    return tl.where(x > 1.0, 1.0, x)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _activate(v, alpha, beta, ACTIVATION: tl.constexpr):
    """The ``TileGather`` prologue activation (float32 in, float32 out; NaN propagates)."""
    if ACTIVATION == 1:  # relu
        v = tl.where(v < 0.0, 0.0, v)
    elif ACTIVATION == 2:  # leaky_relu
        v = tl.where(v >= 0.0, v, v * alpha)
    elif ACTIVATION == 3:  # sigmoid
        v = _sigmoid(v)
    elif ACTIVATION == 4:  # tanh, from exp(-2|v|) (no overflow)
        t = tl.exp(-2.0 * tl.abs(v))
        r = (1.0 - t) / (1.0 + t)
        v = tl.where(v < 0.0, -r, r)
    elif ACTIVATION == 5:  # silu
        v = v * _sigmoid(v)
    elif ACTIVATION == 6:  # hard_sigmoid
        v = _clamp01(v * alpha + beta)
    elif ACTIVATION == 7:  # hard_swish
        v = v * _clamp01(v / 6.0 + 0.5)
    elif ACTIVATION == 8:  # clip: min(max(v, alpha), beta)
        v = tl.where(v < alpha, alpha, v)
        v = tl.where(v > beta, beta, v)
    return v


@triton.jit
def _map_padding(pos, size, period, PAD_MODE: tl.constexpr):
    """Virtual position -> in-map position (zeros and edge clamp; reflect folds with ``period``)."""
    if PAD_MODE == 2:
        r = ((pos % period) + period) % period
        pos = tl.where(r < size, r, period - r)
    else:
        pos = tl.minimum(tl.maximum(pos, 0), size - 1)
    return pos


# Geometry ints are not specialised (divisibility by 16, equality to 1): one compiled kernel per
# prologue/dtype combination instead of one per layer shape. They only enter per-position index math.
_GATHER_GEOMETRY = ["C", "H", "W", "PLANE", "GH", "GW", "VT", "WIN_H", "WIN_W", "STEP_Y", "STEP_X", "OFF_Y", "OFF_X",
                    "UPSAMPLE", "PERIOD_Y", "PERIOD_X"]


@triton.jit(do_not_specialize=_GATHER_GEOMETRY)
def _tile_gather_kernel(
    out_ptr, base_ptr, vals_ptr, grid_ptr, coords_ptr, scale_ptr, shift_ptr,
    C, H, W, PLANE, GH, GW, VT,
    WIN_H, WIN_W, STEP_Y, STEP_X, OFF_Y, OFF_X, UPSAMPLE,
    PERIOD_Y, PERIOD_X, alpha, beta,
    PAD_MODE: tl.constexpr, ACTIVATION: tl.constexpr, HAS_VALS: tl.constexpr,
    HAS_SCALE: tl.constexpr, SCALE_PER_BATCH: tl.constexpr,
    HAS_SHIFT: tl.constexpr, SHIFT_PER_BATCH: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    P = WIN_H * WIN_W
    c_ok = c < C
    p_ok = p < P
    b = tl.load(coords_ptr + n * 3).to(tl.int64)
    ty = tl.load(coords_ptr + n * 3 + 1).to(tl.int32)
    tx = tl.load(coords_ptr + n * 3 + 2).to(tl.int32)

    # Per position: virtual position, padding, source position, inside-the-map flag.
    vy = ty * STEP_Y + OFF_Y + p // WIN_W
    vx = tx * STEP_X + OFF_X + p % WIN_W
    HV = H * UPSAMPLE
    WV = W * UPSAMPLE
    inside = (vy >= 0) & (vy < HV) & (vx >= 0) & (vx < WV)
    sy = _map_padding(vy, HV, PERIOD_Y, PAD_MODE) // UPSAMPLE
    sx = _map_padding(vx, WV, PERIOD_X, PAD_MODE) // UPSAMPLE
    read = p_ok
    if PAD_MODE == 0:
        read = read & inside

    c64 = c.to(tl.int64)
    base_off = (b * C + c64)[:, None] * PLANE + (sy * W + sx)[None, :]
    mask_c = c_ok[:, None]
    if HAS_VALS:
        cell = tl.load(grid_ptr + (b * GH + sy // VT) * GW + sx // VT, mask=read, other=-1)
        active = cell >= 0
        slot = tl.where(active, cell, 0)
        tile_plane = VT * VT
        vals_off = (slot * C)[None, :] * tile_plane + c64[:, None] * tile_plane + \
            ((sy % VT) * VT + sx % VT)[None, :]
        from_vals = tl.load(vals_ptr + vals_off, mask=mask_c & (read & active)[None, :], other=0.0)
        from_base = tl.load(base_ptr + base_off, mask=mask_c & (read & ~active)[None, :], other=0.0)
        v = tl.where(active[None, :], from_vals.to(tl.float32), from_base.to(tl.float32))
    else:
        v = tl.load(base_ptr + base_off, mask=mask_c & read[None, :], other=0.0).to(tl.float32)

    # Prologue: scale, shift, activation; zero padding is applied after it.
    if HAS_SCALE:
        if SCALE_PER_BATCH:
            s = tl.load(scale_ptr + b * C + c64, mask=c_ok, other=0.0)
        else:
            s = tl.load(scale_ptr + c64, mask=c_ok, other=0.0)
        v = v * s.to(tl.float32)[:, None]
    if HAS_SHIFT:
        if SHIFT_PER_BATCH:
            t = tl.load(shift_ptr + b * C + c64, mask=c_ok, other=0.0)
        else:
            t = tl.load(shift_ptr + c64, mask=c_ok, other=0.0)
        v = v + t.to(tl.float32)[:, None]
    v = _activate(v, alpha, beta, ACTIVATION)
    if PAD_MODE == 0:
        v = tl.where(inside[None, :], v, 0.0)

    out_off = (n * C + c64)[:, None] * P + p[None, :]
    tl.store(out_ptr + out_off, v.to(out_ptr.dtype.element_ty), mask=mask_c & p_ok[None, :])


@triton.jit
def _tile_scatter_kernel(
    out_ptr, vals_ptr, coords_ptr, C, H, W, PLANE, T,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    P = T * T
    b = tl.load(coords_ptr + n * 3).to(tl.int64)
    ty = tl.load(coords_ptr + n * 3 + 1).to(tl.int32)
    tx = tl.load(coords_ptr + n * 3 + 2).to(tl.int32)
    y = ty * T + p // T
    x = tx * T + p % T
    c64 = c.to(tl.int64)
    mask = (c < C)[:, None] & ((p < P) & (y < H) & (x < W))[None, :]
    v = tl.load(vals_ptr + (n * C + c64)[:, None] * P + p[None, :], mask=mask)
    dst = (b * C + c64)[:, None] * PLANE + (y * W + x)[None, :]
    tl.store(out_ptr + dst, v.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- wrappers


def supports(tensor: torch.Tensor) -> bool:
    """Whether the kernels can run on ``tensor`` here (dtype, and CUDA or the interpreter)."""
    return tensor.dtype in SUPPORTED_DTYPES and (tensor.device.type == "cuda" or INTERPRET)


def _blocks(channels: int, positions: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P): positions in blocks of at most MAX_BLOCK_P, channels filling the rest."""
    block_p = min(MAX_BLOCK_P, triton.next_power_of_2(max(positions, 1)))
    block_c = min(triton.next_power_of_2(max(channels, 1)), max(1, ELEMENTS_PER_PROGRAM // block_p))
    return block_c, block_p


def _check_device(base: torch.Tensor) -> None:
    if base.device.type != "cuda" and not INTERPRET:
        raise BackendError(
            f"the Triton kernels need CUDA tensors (got {base.device}); on a CPU set TRITON_INTERPRET=1 "
            "before sigec.gpu.triton_ops is imported, or unset SIGEC_TRITON"
        )


def _index(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.int64).contiguous()


def _floats(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float operand on ``device``, contiguous; kept in its own dtype when the kernels read it
    (under autocast ``vals`` may be float16 while the cached ``base`` is float32)."""
    dtype = t.dtype if t.dtype in SUPPORTED_DTYPES else torch.float32
    return t.to(device=device, dtype=dtype).contiguous()


def _param(t: torch.Tensor | None, batch: int, channels: int, device: torch.device, name: str
           ) -> tuple[torch.Tensor | None, bool]:
    """A scale/shift input as a contiguous tensor on ``device`` and whether it is per batch item."""
    if t is None:
        return None, False
    if t.dim() == 1 and t.shape[0] == channels:
        return _floats(t, device), False
    if t.dim() == 2 and t.shape[1] == channels and t.shape[0] in (1, batch):
        return _floats(t, device), True
    raise ValueError(f"TileGather {name} must be [C] or [B, C] with C={channels}, got {list(t.shape)}")


def _reflect_period(size: int) -> int:
    """The period of ONNX ``reflect`` padding (1 for a one-pixel map, where everything maps to 0)."""
    return max(2 * (size - 1), 1)


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
    """``ai.sigec::TileGather`` with Triton: same arguments and result as ``reference_ops.tile_gather``."""
    if pad_mode not in PAD_MODE_CODES:
        raise ValueError(f"unknown TileGather pad_mode {pad_mode!r}")
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"unknown TileGather activation {activation!r}")
    if base.dtype not in SUPPORTED_DTYPES:
        return reference_ops.tile_gather(base, vals, grid, coords, scale, shift, window=window, step=step,
                                         offset=offset, upsample=upsample, pad_mode=pad_mode,
                                         activation=activation, alpha=alpha, beta=beta)
    _check_device(base)
    batch, channels, height, width = base.shape
    wh, ww = int(window[0]), int(window[1])
    n = coords.shape[0]
    out_dtype = reference_ops.result_dtype(base, vals)
    if out_dtype not in SUPPORTED_DTYPES:  # e.g. float16 base with float64 vals
        return reference_ops.tile_gather(base, vals, grid, coords, scale, shift, window=window, step=step,
                                         offset=offset, upsample=upsample, pad_mode=pad_mode,
                                         activation=activation, alpha=alpha, beta=beta)
    out = torch.empty((n, channels, wh, ww), dtype=out_dtype, device=base.device)
    if n == 0 or out.numel() == 0:
        return out
    up = int(upsample)
    if up < 1:
        raise ValueError(f"TileGather upsample must be >= 1, got {up}")
    device = base.device
    base = base.contiguous()
    coords = _index(coords, device)
    has_vals = vals is not None and vals.shape[0] > 0
    if has_vals:
        if grid is None:
            raise ValueError("TileGather: vals given without grid")
        vals = _floats(vals, device)
        grid = _index(grid, device)
        vt, gh, gw = int(vals.shape[2]), int(grid.shape[1]), int(grid.shape[2])
    else:
        vals, grid, vt, gh, gw = base, coords, 1, 1, 1  # placeholders, never read
    scale_t, scale_pb = _param(scale, batch, channels, device, "scale")
    shift_t, shift_pb = _param(shift, batch, channels, device, "shift")
    block_c, block_p = _blocks(channels, wh * ww)
    launch = (n, triton.cdiv(channels, block_c), triton.cdiv(wh * ww, block_p))
    _tile_gather_kernel[launch](
        out, base, vals, grid, coords,
        scale_t if scale_t is not None else base, shift_t if shift_t is not None else base,
        channels, height, width, height * width, gh, gw, vt,
        wh, ww, int(step[0]), int(step[1]), int(offset[0]), int(offset[1]), up,
        _reflect_period(height * up), _reflect_period(width * up), float(alpha), float(beta),
        PAD_MODE=PAD_MODE_CODES[pad_mode], ACTIVATION=ACTIVATION_CODES[activation], HAS_VALS=has_vals,
        HAS_SCALE=scale_t is not None, SCALE_PER_BATCH=scale_pb,
        HAS_SHIFT=shift_t is not None, SHIFT_PER_BATCH=shift_pb,
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=NUM_WARPS,
    )
    return out


def tile_scatter(base: torch.Tensor, vals: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``ai.sigec::TileScatter`` with Triton: same arguments and result as ``reference_ops.tile_scatter``."""
    out_dtype = reference_ops.result_dtype(base, vals)
    if base.dtype not in SUPPORTED_DTYPES or out_dtype not in SUPPORTED_DTYPES:
        return reference_ops.tile_scatter(base, vals, coords)
    _check_device(base)
    # A half base with float32 tiles widens to float32 (result_dtype); the copy converts it.
    out = base.to(dtype=out_dtype, memory_format=torch.contiguous_format, copy=True)
    n = coords.shape[0]
    if n == 0 or out.numel() == 0:
        return out
    _, channels, height, width = base.shape
    tile = int(vals.shape[2])
    vals = _floats(vals, base.device)
    coords = _index(coords, base.device)
    block_c, block_p = _blocks(channels, tile * tile)
    launch = (n, triton.cdiv(channels, block_c), triton.cdiv(tile * tile, block_p))
    _tile_scatter_kernel[launch](out, vals, coords, channels, height, width, height * width, tile,
                                 BLOCK_C=block_c, BLOCK_P=block_p, num_warps=NUM_WARPS)
    return out
