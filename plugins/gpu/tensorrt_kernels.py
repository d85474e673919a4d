"""The sigec kernels in the calling convention of TensorRT's ahead-of-time plugins, and their compilation.

Nothing here imports TensorRT: this module turns a plugin call (the decoded ``ai.sigec`` attributes
and the static shapes of its inputs) into what ``@tensorrt.plugin.aot_impl`` must return, so that
it can be tested on a machine without TensorRT or a GPU.

Calling convention of an AOT plugin kernel (TensorRT's quickly deployable plugins, see the
sources in :mod:`sigec.gpu.tensorrt_plugins`): the input tensors' pointers in input order,
then the extra int32 arguments, then the output pointers. The Triton kernels of
:mod:`sigec.gpu.triton_ops` take the output first and two float arguments, so this module adds
thin ``@triton.jit`` wrappers with that order:

- :func:`trt_tile_gather_kernel` calls ``triton_ops._tile_gather_kernel`` unchanged; absent
  optional inputs are compiled as ``None`` constants (they vanish from the kernel's parameters),
  ``alpha``/``beta`` are compile-time constants (extra arguments are integers only), and the tile
  count ``N`` is an extra argument: the launch grid is ``max(N, 1)`` programs along x (a grid of
  0 is not launchable) and programs ``>= N`` do nothing.
- :func:`trt_tile_scatter_kernel` is new: TensorRT launches one kernel per plugin, so the copy of
  ``base`` and the tile writes cannot be two launches as in ``triton_ops.tile_scatter``. One program
  per output cell finds the cell's tile by binary search in ``coords`` (row-major sorted, unique:
  docs/ops.md) and writes either the tile or ``base``; every output element is written once.

Triton (>= 3.3) appends unused ``global_scratch``/``profile_scratch`` pointer parameters to every
kernel; TensorRT passes only inputs, extra arguments and outputs, so :func:`compile_plugin_kernel`
removes those parameters from the PTX after checking that the kernel uses no scratch memory.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import triton
import triton.language as tl

from sigec.core.errors import BackendError

from sigec.gpu import triton_ops

INT32_MAX = 2**31 - 1


class TileCount:
    """Placeholder for the dynamic number of output tiles ``N`` (coords' first dimension)."""

    def __repr__(self) -> str:
        return "N"


N = TileCount()


class AtLeastOneTile:
    """Placeholder for ``max(N, 1)`` (a launch grid dimension)."""

    def __repr__(self) -> str:
        return "max(N, 1)"


GRID_N = AtLeastOneTile()

IntArg = "int | TileCount"


# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def trt_tile_gather_kernel(
    base_ptr, vals_ptr, grid_ptr, coords_ptr, scale_ptr, shift_ptr,
    N, C, H, W, PLANE, GH, GW, VT, WIN_H, WIN_W, STEP_Y, STEP_X, OFF_Y, OFF_X, UPSAMPLE, PERIOD_Y, PERIOD_X,
    out_ptr,
    ALPHA: tl.constexpr, BETA: tl.constexpr, PAD_MODE: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_VALS: tl.constexpr, HAS_SCALE: tl.constexpr, SCALE_PER_BATCH: tl.constexpr,
    HAS_SHIFT: tl.constexpr, SHIFT_PER_BATCH: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """``TileGather`` with TensorRT's argument order (inputs, int32 extras, output)."""
    if tl.program_id(0) < N:
        triton_ops._tile_gather_kernel(
            out_ptr, base_ptr, vals_ptr, grid_ptr, coords_ptr, scale_ptr, shift_ptr,
            C, H, W, PLANE, GH, GW, VT, WIN_H, WIN_W, STEP_Y, STEP_X, OFF_Y, OFF_X, UPSAMPLE,
            PERIOD_Y, PERIOD_X, ALPHA, BETA,
            PAD_MODE, ACTIVATION, HAS_VALS, HAS_SCALE, SCALE_PER_BATCH, HAS_SHIFT, SHIFT_PER_BATCH,
            BLOCK_C, BLOCK_P,
        )


@triton.jit
def trt_tile_scatter_kernel(
    base_ptr, vals_ptr, coords_ptr,
    N, C, H, W, PLANE, GH, GW, T,
    out_ptr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """``TileScatter`` in one launch: program (cell, channel block) writes its cell of the output."""
    cell = tl.program_id(0)
    cells_per_item = GH * GW
    b = cell // cells_per_item
    ty = (cell % cells_per_item) // GW
    tx = cell % GW
    key = cell.to(tl.int64)
    # Binary search of the cell in coords (row-major sorted): first slot whose key is >= this cell's.
    lo = tl.zeros([], tl.int32)
    hi = tl.zeros([], tl.int32) + N
    while lo < hi:
        mid = (lo + hi) // 2
        mid64 = mid.to(tl.int64)
        mb = tl.load(coords_ptr + mid64 * 3)
        my = tl.load(coords_ptr + mid64 * 3 + 1)
        mx = tl.load(coords_ptr + mid64 * 3 + 2)
        below = (mb * GH + my) * GW + mx < key
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    slot = lo.to(tl.int64)
    in_range = lo < N
    fb = tl.load(coords_ptr + slot * 3, mask=in_range, other=-1)
    fy = tl.load(coords_ptr + slot * 3 + 1, mask=in_range, other=-1)
    fx = tl.load(coords_ptr + slot * 3 + 2, mask=in_range, other=-1)
    found = in_range & (fb == b) & (fy == ty) & (fx == tx)

    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.arange(0, BLOCK_P)
    P = T * T
    y = ty * T + p // T
    x = tx * T + p % T
    c64 = c.to(tl.int64)
    mask = (c < C)[:, None] & ((p < P) & (y < H) & (x < W))[None, :]
    dst = (b.to(tl.int64) * C + c64)[:, None] * PLANE + (y * W + x)[None, :]
    take = tl.zeros([BLOCK_C, BLOCK_P], tl.int1) | found  # explicit broadcast (Triton's interpreter needs it)
    from_vals = tl.load(vals_ptr + (slot * C + c64)[:, None] * P + p[None, :], mask=mask & take, other=0.0)
    from_base = tl.load(base_ptr + dst, mask=mask & ~take, other=0.0)
    v = tl.where(take, from_vals.to(out_ptr.dtype.element_ty), from_base.to(out_ptr.dtype.element_ty))
    tl.store(out_ptr + dst, v, mask=mask)


# ---------------------------------------------------------------------------------------------- launch plans


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Everything an AOT plugin returns besides the PTX, with ``N`` left symbolic.

    ``pointers`` names the kernel's pointer parameters in order (inputs, then the output) with
    their Triton types; ``extra_args`` are the int32 extra arguments (ints or ``N``); ``grid`` is
    the launch grid (``GRID_N`` stands for ``max(N, 1)``).
    """

    kernel: Any
    pointers: tuple[tuple[str, str], ...]
    absent: tuple[str, ...]
    extra_args: tuple[tuple[str, Any], ...]
    constexprs: Mapping[str, Any]
    grid: tuple[Any, int, int]
    num_warps: int = triton_ops.NUM_WARPS

    def resolve(self, n: int) -> tuple[tuple[int, int, int], list[int]]:
        """The concrete launch grid and extra arguments for ``n`` output tiles."""
        def value(v: Any) -> int:
            if v is GRID_N:
                return max(int(n), 1)
            if v is N:
                return int(n)
            return int(v)

        return tuple(value(g) for g in self.grid), [value(v) for _, v in self.extra_args]

    def signature(self) -> dict[str, str]:
        """The Triton signature (parameter name -> type or ``constexpr``) of the compiled kernel."""
        sig = {name: "constexpr" for name in self.kernel.arg_names}
        sig.update(dict(self.pointers))
        sig.update({name: "i32" for name, _ in self.extra_args})
        return sig

    def all_constexprs(self) -> dict[str, Any]:
        """Compile-time constants, absent inputs (``None``) included."""
        return {**{name: None for name in self.absent}, **self.constexprs}


FLOAT_TYPES = {"float32": "fp32", "float16": "fp16"}


def _float_type(dtype: str) -> str:
    if dtype not in FLOAT_TYPES:
        raise BackendError(f"the TensorRT sigec plugins support {sorted(FLOAT_TYPES)}, not {dtype!r}")
    return "*" + FLOAT_TYPES[dtype]


def _int32(name: str, value: int, where: str) -> tuple[str, int]:
    v = int(value)
    if not -INT32_MAX - 1 <= v <= INT32_MAX:
        raise BackendError(f"{where}: {name} = {v} does not fit the plugin's int32 kernel arguments")
    return name, v


def gather_launch(attrs: Mapping[str, Any], *, dtype: str, base_shape: Sequence[int],
                  vals_tile: int | None, grid_shape: Sequence[int] | None,
                  scale_rank: int | None, shift_rank: int | None, where: str = "TileGather") -> LaunchPlan:
    """The launch of ``TileGather`` for decoded ``attrs`` (docs/ops.md names) and static input shapes.

    ``vals_tile`` and ``grid_shape`` ([B, GH, GW]) are None when the call has no ``vals``;
    ``scale_rank``/``shift_rank`` are None when absent, else 1 ([C]) or 2 ([B, C]).
    """
    if attrs["pad_mode"] not in triton_ops.PAD_MODE_CODES:
        raise BackendError(f"{where}: unknown pad_mode {attrs['pad_mode']!r}")
    if attrs["activation"] not in triton_ops.ACTIVATION_CODES:
        raise BackendError(f"{where}: unknown activation {attrs['activation']!r}")
    _, channels, height, width = (int(d) for d in base_shape)
    wh, ww = (int(v) for v in attrs["window"])
    up = int(attrs["upsample"])
    if up < 1:
        raise BackendError(f"{where}: upsample must be >= 1, got {up}")
    has_vals = vals_tile is not None
    if has_vals and grid_shape is None:
        raise BackendError(f"{where}: vals given without grid")
    vt, gh, gw = (int(vals_tile), int(grid_shape[1]), int(grid_shape[2])) if has_vals else (1, 1, 1)
    ptr = _float_type(dtype)
    pointers = [("base_ptr", ptr)]
    absent = []
    if has_vals:
        pointers += [("vals_ptr", ptr), ("grid_ptr", "*i64")]
    else:
        absent += ["vals_ptr", "grid_ptr"]
    pointers.append(("coords_ptr", "*i64"))
    for name, rank in (("scale_ptr", scale_rank), ("shift_ptr", shift_rank)):
        if rank is None:
            absent.append(name)
        elif rank in (1, 2):
            pointers.append((name, ptr))
        else:
            raise BackendError(f"{where}: {name[:-4]} must be [C] or [B, C], got rank {rank}")
    pointers.append(("out_ptr", ptr))
    ints = [("C", channels), ("H", height), ("W", width), ("PLANE", height * width), ("GH", gh), ("GW", gw),
            ("VT", vt), ("WIN_H", wh), ("WIN_W", ww), ("STEP_Y", attrs["step"][0]), ("STEP_X", attrs["step"][1]),
            ("OFF_Y", attrs["offset"][0]), ("OFF_X", attrs["offset"][1]), ("UPSAMPLE", up),
            ("PERIOD_Y", triton_ops._reflect_period(height * up)), ("PERIOD_X", triton_ops._reflect_period(width * up))]
    block_c, block_p = triton_ops._blocks(channels, wh * ww)
    constexprs = dict(
        ALPHA=float(attrs["alpha"]), BETA=float(attrs["beta"]),
        PAD_MODE=triton_ops.PAD_MODE_CODES[attrs["pad_mode"]],
        ACTIVATION=triton_ops.ACTIVATION_CODES[attrs["activation"]],
        HAS_VALS=has_vals, HAS_SCALE=scale_rank is not None, SCALE_PER_BATCH=scale_rank == 2,
        HAS_SHIFT=shift_rank is not None, SHIFT_PER_BATCH=shift_rank == 2, BLOCK_C=block_c, BLOCK_P=block_p,
    )
    return LaunchPlan(
        kernel=trt_tile_gather_kernel, pointers=tuple(pointers), absent=tuple(absent),
        extra_args=(("N", N), *(_int32(k, v, where) for k, v in ints)), constexprs=constexprs,
        grid=(GRID_N, triton.cdiv(channels, block_c), triton.cdiv(wh * ww, block_p)),
    )


def scatter_launch(*, dtype: str, base_shape: Sequence[int], tile: int, where: str = "TileScatter") -> LaunchPlan:
    """The launch of ``TileScatter`` for a base map ``[B, C, H, W]`` and tiles of size ``tile``."""
    batch, channels, height, width = (int(d) for d in base_shape)
    t = int(tile)
    if t < 1:
        raise BackendError(f"{where}: tile size must be >= 1, got {t}")
    gh, gw = -(-height // t), -(-width // t)
    ptr = _float_type(dtype)
    block_p = triton.next_power_of_2(t * t)
    block_c = min(triton.next_power_of_2(max(channels, 1)), max(1, triton_ops.ELEMENTS_PER_PROGRAM // block_p))
    ints = [("C", channels), ("H", height), ("W", width), ("PLANE", height * width), ("GH", gh), ("GW", gw), ("T", t)]
    return LaunchPlan(
        kernel=trt_tile_scatter_kernel,
        pointers=(("base_ptr", ptr), ("vals_ptr", ptr), ("coords_ptr", "*i64"), ("out_ptr", ptr)), absent=(),
        extra_args=(("N", N), *(_int32(k, v, where) for k, v in ints)),
        constexprs=dict(BLOCK_C=block_c, BLOCK_P=block_p),
        grid=(_int32("cells", batch * gh * gw, where)[1], triton.cdiv(channels, block_c), 1),
    )


# ---------------------------------------------------------------------------------------------- compilation


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    """A kernel compiled ahead of time: its entry name, PTX, threads per block and shared memory."""

    name: str
    ptx: str
    block_x: int
    shared_mem: int


_ENTRY = r"\.entry\s+{name}\s*\(([^)]*)\)"
_PARAM = re.compile(r"\.param\s+[^,]*?\s(\w+)\s*$")


def compile_plugin_kernel(plan: LaunchPlan, capability: int) -> CompiledKernel:
    """Compile ``plan``'s kernel with Triton for ``sm_<capability>`` (no GPU needed) into TensorRT's ABI."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(plan.kernel, plan.signature(), constexprs=plan.all_constexprs())
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", int(capability), 32),
                                  options={"num_warps": plan.num_warps})
    except Exception as exc:  # Triton raises many types; the message names the kernel
        raise BackendError(f"Triton could not compile {plan.kernel.__name__} for sm_{capability}: {exc}") from exc
    meta = compiled.metadata
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        if int(getattr(meta, scratch, 0) or 0):
            raise BackendError(f"{plan.kernel.__name__} needs Triton {scratch} memory, which TensorRT does not provide")
    expected = len(plan.pointers) + len(plan.extra_args)
    ptx = strip_trailing_params(compiled.asm["ptx"], meta.name, keep=expected)
    return CompiledKernel(name=meta.name, ptx=ptx, block_x=int(meta.num_warps) * 32, shared_mem=int(meta.shared))


def ptx_params(ptx: str, kernel_name: str) -> list[str]:
    """The parameter names of entry ``kernel_name`` in ``ptx``."""
    match = re.search(_ENTRY.format(name=re.escape(kernel_name)), ptx)
    if match is None:
        raise BackendError(f"no entry {kernel_name!r} in the PTX")
    params = [p.strip() for p in match.group(1).split(",") if p.strip()]
    names = []
    for p in params:
        m = _PARAM.search(p)
        if m is None:
            raise BackendError(f"cannot parse PTX parameter {p!r} of {kernel_name!r}")
        names.append(m.group(1))
    return names


def strip_trailing_params(ptx: str, kernel_name: str, *, keep: int) -> str:
    """``ptx`` with the parameters of ``kernel_name`` after the first ``keep`` removed.

    Raises BackendError when the kernel has fewer than ``keep`` parameters or reads a removed one.
    """
    match = re.search(_ENTRY.format(name=re.escape(kernel_name)), ptx)
    names = ptx_params(ptx, kernel_name)
    if len(names) < keep:
        raise BackendError(f"{kernel_name}: the PTX has {len(names)} parameters, TensorRT passes {keep}")
    body = ptx[match.end():]
    for name in names[keep:]:
        if re.search(rf"\b{re.escape(name)}\b", body):
            raise BackendError(f"{kernel_name}: PTX parameter {name} is used; it cannot be dropped")
    params = [p.strip() for p in match.group(1).split(",") if p.strip()][:keep]
    header = f".entry {kernel_name}(\n\t" + ",\n\t".join(params) + "\n)"
    return ptx[:match.start()] + header + ptx[match.end():]


def ptx_param_types(ptx: str, kernel_name: str) -> list[str]:
    """The PTX types (``u64`` pointers, ``u32`` ints, ...) of entry ``kernel_name``'s parameters."""
    match = re.search(_ENTRY.format(name=re.escape(kernel_name)), ptx)
    if match is None:
        raise BackendError(f"no entry {kernel_name!r} in the PTX")
    return re.findall(r"\.param\s+\.(\w+)", match.group(1))


def launch(plan: LaunchPlan, inputs: Sequence[Any], out: Any, n: int) -> None:
    """Launch ``plan`` with Triton's own launcher as TensorRT would: ``inputs`` are the plugin's
    input tensors in order, ``out`` its output, ``n`` the number of output tiles.

    For tests and debugging (under ``TRITON_INTERPRET=1`` on a CPU, or on a CUDA device).
    """
    grid, extras = plan.resolve(n)
    given = iter(inputs)
    extra = dict(zip((name for name, _ in plan.extra_args), extras))
    pointer_names = [name for name, _ in plan.pointers]
    args = []
    for name in plan.kernel.arg_names:
        if name == "out_ptr":
            args.append(out)
        elif name in pointer_names:
            args.append(next(given))
        elif name in plan.absent:
            args.append(None)
        elif name in extra:
            args.append(extra[name])
    if next(given, None) is not None:
        raise BackendError(f"{plan.kernel.__name__}: more inputs than the plan's {len(pointer_names) - 1}")
    plan.kernel[grid](*args, **plan.constexprs, num_warps=plan.num_warps)
