"""The Triton kernels of ai.sigec (plugins/gpu/triton_ops.py) against the PyTorch reference (docs/ops.md).

By default the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by conftest.py
before Triton is imported). With ``SIGEC_TEST_DEVICE=cuda`` (tools/gpu_check.sh) the same tests run
the compiled kernels on a GPU, and the end-to-end test loads an engine with ``device="cuda"``.
Tests of the kernels skip when Triton (the GPU kernel compiler, ``pip install -e .[gpu]``) is not
installed; the dispatch rules that need no Triton run everywhere.

Tolerances (helpers.check_gather): float32 results match the reference to 1e-6 (the interpreter's
and the GPU's ``exp`` differ from PyTorch's by a few ulps). float16/bfloat16 kernels compute the
prologue in float32 and round once, so they are compared with the float32 reference rounded to the
dtype (2 ulps: rtol 2e-3 for float16, 1.6e-2 for bfloat16) and with the reference run in that
dtype, which rounds after every prologue step (rtol = atol = 1e-2 for float16, 5e-2 for bfloat16).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sigec
from helpers import (ACT_PARAMS, ALWAYS_SPARSE, LOW_PRECISION, all_cells, check_gather, conv_attrs, coords_of,
                     run_without_interpreter, sparse_input)
from sigec.core import reference_ops
from sigec.core.errors import BackendError
from sigec.core.reference_ops import ACTIVATIONS, PAD_MODES
from sigec.runtime import torch_onnx_ops
from sigec.runtime.synthetic_edits import edit_inputs, square_mask

DEVICE = os.environ.get("SIGEC_TEST_DEVICE", "cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton, the GPU kernel compiler, is not installed "
                                                         "(optional dependency group 'gpu')")

if HAS_TRITON:
    from sigec.gpu import triton_ops

    if DEVICE == "cpu" and not triton_ops.INTERPRET:
        raise RuntimeError("sigec.gpu.triton_ops was imported before TRITON_INTERPRET=1 (tests/conftest.py sets it)")
if DEVICE == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("SIGEC_TEST_DEVICE=cuda but torch sees no CUDA device")

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter


# ---------------------------------------------------------------------------------------------- helpers


def device_input(seed: int, batch: int, channels: int, height: int, width: int, tile: int,
                 cells: list[tuple[int, int, int]], dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """helpers.sparse_input's ``base``, ``vals`` and ``grid`` on DEVICE, floats in ``dtype``."""
    arrays = sparse_input(np.random.default_rng(seed), batch, channels, height, width, tile, cells)
    return (torch.from_numpy(arrays["base"]).to(DEVICE, dtype), torch.from_numpy(arrays["vals"]).to(DEVICE, dtype),
            torch.from_numpy(arrays["grid"]).to(DEVICE))


def device_coords(cells) -> torch.Tensor:
    return torch.from_numpy(coords_of(cells)).to(DEVICE)


def check_triton_gather(*args, **attrs) -> torch.Tensor:
    """helpers.check_gather with the Triton kernel."""
    return check_gather(triton_ops.tile_gather, *args, **attrs)


def check_scatter(base, vals, coords) -> torch.Tensor:
    before = base.clone()
    out = triton_ops.tile_scatter(base, vals, coords)
    expected = reference_ops.tile_scatter(base, vals, coords)
    assert out.dtype == base.dtype and out.data_ptr() != base.data_ptr()
    assert torch.equal(out, expected)
    assert torch.equal(base, before), "TileScatter must not modify its input"
    return out


# ---------------------------------------------------------------------------------------------- TileGather


@needs_triton
def test_zero_tiles_give_empty_outputs():
    base, vals, grid = device_input(0, 2, 3, 16, 16, 8, cells=[])
    empty = device_coords([])
    out = check_triton_gather(base, vals, grid, empty, **conv_attrs(8))
    assert out.shape == (0, 3, 10, 10)
    assert check_triton_gather(base, None, None, empty, **conv_attrs(8)).shape == (0, 3, 10, 10)
    # Active output tiles but no active input tiles (vals [0, C, T, T]): everything reads base.
    out = check_triton_gather(base, vals, grid, device_coords([(1, 1, 1)]), **conv_attrs(8))
    assert torch.equal(out[0, :, 1:9, 1:9], base[1, :, 8:16, 8:16])
    assert torch.equal(check_scatter(base, vals, empty), base)


@needs_triton
@pytest.mark.parametrize("pad_mode", PAD_MODES)
def test_corner_and_border_tiles(pad_mode):
    # 21 x 19 is not a multiple of the tile size: the last row/column of tiles is partial.
    B, C, H, W, T = 2, 3, 21, 19, 8
    corners = [(b, y, x) for b in range(B) for y in (0, 2) for x in (0, 2)]
    base, vals, grid = device_input(1, B, C, H, W, T, cells=corners[:4] + [(1, 1, 1), (1, 2, 2)])
    scale = torch.rand((B, C), device=DEVICE) + 0.5
    shift = torch.randn((C,), device=DEVICE)
    out = check_triton_gather(base, vals, grid, device_coords(corners), scale, shift, pad_mode=pad_mode,
                       activation="leaky_relu", alpha=0.1, **conv_attrs(T))
    assert out.shape == (8, C, T + 2, T + 2)
    if pad_mode == "zeros":  # padding is zero, after the prologue
        assert torch.all(out[0, :, 0, :] == 0) and torch.all(out[0, :, :, 0] == 0)
        assert torch.all(out[-1, :, 6:, :] == 0) and torch.all(out[-1, :, :, 4:] == 0)
    else:
        assert torch.all(out[0, :, 0, :] != 0)


@needs_triton
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation(activation):
    # Large magnitudes (exp saturation), exact zeros and a NaN, with the prologue before it.
    B, C, H, W, T = 2, 4, 12, 12, 6
    base, vals, grid = device_input(2, B, C, H, W, T, cells=[(0, 0, 1), (1, 1, 0)])
    base = base * 40
    base[0, 1, 2, 3] = float("nan")
    base[1, 2, :, 5] = 0.0
    scale = torch.randn((B, C), device=DEVICE) * 2
    shift = torch.randn((C,), device=DEVICE)
    alpha, beta = ACT_PARAMS.get(activation, (0.0, 0.0))
    out = check_triton_gather(base, vals, grid, device_coords([(0, 0, 0), (0, 1, 1), (1, 1, 0)]), scale, shift,
                       activation=activation, alpha=alpha, beta=beta, **conv_attrs(T))
    assert torch.isnan(out).sum() == 1 and torch.isnan(out[0, 1]).sum() == 1  # NaN propagates, once


@needs_triton
@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("upsample", [1, 2])
def test_pad_modes_on_tiny_map(pad_mode, upsample):
    # A 3 x 5 map with 4 x 4 tiles: windows stick out on both sides; an odd 5 x 7 window.
    base, vals, grid = device_input(3, 1, 2, 3, 5, 4, cells=[(0, 0, 1)])
    gh, gw = -(-3 * upsample // 4), -(-5 * upsample // 4)
    attrs = {"window": [5, 7], "step": [4, 4], "offset": [-1, -2]}
    check_triton_gather(base, vals, grid, device_coords(all_cells(1, gh, gw)), pad_mode=pad_mode, upsample=upsample,
                 activation="tanh", **attrs)


@needs_triton
@pytest.mark.parametrize("pad_mode", ["edge", "reflect"])
def test_one_pixel_high_map(pad_mode):
    # H = 1: reflect has nothing to reflect (every row reads row 0), like edge.
    base, vals, grid = device_input(4, 2, 2, 1, 6, 4, cells=[(1, 0, 1)])
    out = check_triton_gather(base, vals, grid, device_coords(all_cells(2, 1, 2)), pad_mode=pad_mode,
                       window=[4, 6], step=[4, 4], offset=[-2, -1])
    assert torch.equal(out[:, :, 0], out[:, :, 3])


@needs_triton
def test_upsample_with_vals_of_another_tile_size():
    # Transposed-conv style geometry: output tiles of 8 on a 2x upsampled map whose tiles are 4.
    B, C, H, W = 2, 3, 10, 9
    base, vals, grid = device_input(5, B, C, H, W, 4, cells=[(0, 0, 0), (0, 1, 1), (1, 2, 1), (1, 2, 2)])
    coords = device_coords(all_cells(B, 3, 3, keep=lambda b, y, x: (x * y + b) % 2 == 0))
    check_triton_gather(base, vals, grid, coords, upsample=2, pad_mode="zeros", **conv_attrs(8))


@needs_triton
def test_strided_window_spans_several_program_blocks():
    # 3x3 stride-2 conv on 4 x 4 output tiles: 9 x 9 windows; 20 channels: 2 channel blocks,
    # and a 17 x 17 window (stride 2, T = 8) needs 3 position blocks.
    assert triton_ops._blocks(20, 17 * 17) == (16, 128)
    B, C, H, W = 2, 20, 33, 30
    base, vals, grid = device_input(6, B, C, H, W, 8, cells=[(0, 1, 1), (1, 0, 3), (1, 4, 0)])
    coords = device_coords([(0, 0, 0), (0, 1, 1), (1, 1, 0)])
    check_triton_gather(base, vals, grid, coords, window=[17, 17], step=[16, 16], offset=[-1, -1], activation="relu")


@needs_triton
@pytest.mark.parametrize("scale_kind,shift_kind", [(None, None), ("c", None), (None, "bc"), ("bc", "c")])
def test_prologue_parameters(scale_kind, shift_kind):
    B, C = 2, 5
    base, vals, grid = device_input(7, B, C, 16, 16, 8, cells=[(0, 1, 0), (1, 0, 1)])

    def param(kind):
        if kind is None:
            return None
        return torch.randn((C,) if kind == "c" else (B, C), device=DEVICE)

    out = check_triton_gather(base, vals, grid, device_coords(all_cells(B, 2, 2, keep=lambda b, y, x: y == x or b)),
                       param(scale_kind), param(shift_kind), activation="silu", **conv_attrs(8))
    assert out.shape == (6, C, 10, 10)


@needs_triton
def test_vals_absent_and_non_contiguous_inputs():
    base, _, _ = device_input(8, 2, 6, 17, 23, 8, cells=[])
    base = base.to(memory_format=torch.channels_last)
    assert not base.is_contiguous()
    coords = device_coords(all_cells(2, 3, 3, keep=lambda b, y, x: (b + y + x) % 2 == 0))
    check_triton_gather(base, None, None, coords, pad_mode="reflect", **conv_attrs(8))


@needs_triton
@pytest.mark.parametrize("seed", range(3))
def test_random_geometry(seed):
    rng = np.random.default_rng(100 + seed)
    B, C = int(rng.integers(1, 3)), int(rng.integers(1, 7))
    H, W = (int(v) for v in rng.integers(3, 20, 2))
    T = int(rng.choice([2, 4, 8]))
    up = int(rng.choice([1, 2]))
    gh, gw = -(-H // T), -(-W // T)
    in_cells = all_cells(B, gh, gw, keep=lambda b, y, x: rng.random() < 0.4)
    base, vals, grid = device_input(seed, B, C, H, W, T, cells=in_cells)
    k = int(rng.choice([1, 3, 5]))
    window = [T - 1 + k, T - 1 + k + int(rng.integers(0, 2))]
    pad = min(k // 2, H * up - 1, W * up - 1)
    ogh, ogw = -(-H * up // T), -(-W * up // T)
    out_cells = all_cells(B, ogh, ogw, keep=lambda b, y, x: rng.random() < 0.5) or [(0, 0, 0)]
    check_triton_gather(base, vals, grid, device_coords(out_cells), torch.randn((B, C), device=DEVICE), None,
                 window=window, step=[T, T], offset=[-pad, -pad], upsample=up,
                 pad_mode=str(rng.choice(PAD_MODES)), activation=str(rng.choice(ACTIVATIONS)), alpha=0.3, beta=0.6)


@needs_triton
@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
def test_low_precision(dtype):
    B, C, H, W, T = 2, 3, 13, 11, 4
    base, vals, grid = device_input(9, B, C, H, W, T, cells=[(0, 0, 0), (0, 3, 2), (1, 1, 1)], dtype=dtype)
    coords = device_coords([(0, 0, 0), (0, 3, 2), (1, 1, 2), (1, 2, 1)])
    scale = torch.randn((B, C), device=DEVICE, dtype=dtype)
    shift = torch.randn((C,), device=DEVICE, dtype=dtype)
    check_triton_gather(base, vals, grid, coords, scale, shift, pad_mode="reflect", activation="silu", **conv_attrs(T))
    check_scatter(base, vals, device_coords([(0, 0, 0), (0, 3, 2), (1, 1, 1)]))


@needs_triton
def test_mixed_dtypes_as_under_autocast():
    # float32 caches with float16 tiles and parameters (a conv under torch.autocast): float32 out.
    B, C, H, W, T = 1, 3, 12, 12, 4
    base, vals, grid = device_input(14, B, C, H, W, T, cells=[(0, 0, 1), (0, 2, 2)])
    half = vals.half()
    coords = device_coords([(0, 0, 0), (0, 0, 1), (0, 2, 2)])
    shift = torch.randn((C,), device=DEVICE).half()
    out = triton_ops.tile_gather(base, half, grid, coords, None, shift, activation="silu", **conv_attrs(T))
    assert out.dtype == torch.float32
    expected = reference_ops.tile_gather(base, half.float(), grid, coords, None, shift.float(), activation="silu",
                                         **conv_attrs(T))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    scattered = triton_ops.tile_scatter(base, half, device_coords([(0, 0, 1), (0, 2, 2)]))
    assert scattered.dtype == torch.float32
    assert torch.equal(scattered, reference_ops.tile_scatter(base, half.float(), device_coords([(0, 0, 1), (0, 2, 2)])))


@needs_triton
def test_unknown_attributes_are_rejected():
    base, vals, grid = device_input(10, 1, 1, 8, 8, 4, cells=[])
    with pytest.raises(ValueError, match="pad_mode"):
        triton_ops.tile_gather(base, None, None, device_coords([(0, 0, 0)]), window=[4, 4], step=[4, 4], pad_mode="wrap")
    with pytest.raises(ValueError, match="activation"):
        triton_ops.tile_gather(base, None, None, device_coords([(0, 0, 0)]), window=[4, 4], step=[4, 4], activation="gelu")


@needs_triton
def test_float64_falls_back_to_the_reference():
    base, vals, grid = device_input(11, 1, 2, 8, 8, 4, cells=[(0, 1, 1)], dtype=torch.float64)
    assert not triton_ops.supports(base)
    coords = device_coords([(0, 1, 0), (0, 1, 1)])
    out = triton_ops.tile_gather(base, vals, grid, coords, window=[6, 6], step=[4, 4], offset=[-1, -1])
    assert out.dtype == torch.float64
    assert torch.equal(out, reference_ops.tile_gather(base, vals, grid, coords, window=[6, 6], step=[4, 4],
                                                      offset=[-1, -1]))


# ---------------------------------------------------------------------------------------------- TileScatter


@needs_triton
def test_scatter_partial_border_tiles_and_batches():
    B, C, H, W, T = 2, 5, 21, 19, 8
    cells = [(0, 0, 0), (0, 2, 2), (1, 2, 0), (1, 0, 2), (1, 1, 1)]
    base, vals, _ = device_input(12, B, C, H, W, T, cells=cells)
    out = check_scatter(base, vals, device_coords(cells))
    assert torch.equal(out[0, :, 16:, 16:], vals[1, :, :5, :3])
    assert torch.equal(out[1, :, :8, :8], base[1, :, :8, :8])


# ---------------------------------------------------------------------------------------------- GPU compilation


SM90_COMPILE_SCRIPT = """
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sigec.gpu import triton_ops

if "constexprs" not in inspect.signature(ASTSource).parameters:
    print("ASTSource of this Triton version takes no constexprs")
    sys.exit(0)

def compile_sm90(kernel, pointers, floats=(), **constexprs):
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in floats else "i32")
           for n in kernel.arg_names}
    out = triton.compile(ASTSource(kernel, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": triton_ops.NUM_WARPS})
    assert ".target sm_90" in out.asm["ptx"] and out.asm["cubin"], "no sm_90 code"

flags = dict(HAS_VALS=True, HAS_SCALE=True, SCALE_PER_BATCH=True, HAS_SHIFT=True, SHIFT_PER_BATCH=False)
for dtype, pad_mode, activation, ones in [("fp16", 2, 5, {}), ("bf16", 0, 4, dict(C=1, VT=1, W=1, PLANE=1))]:
    ptrs = {n: "*" + dtype for n in ("out_ptr", "base_ptr", "vals_ptr", "scale_ptr", "shift_ptr")}
    ptrs.update(grid_ptr="*i64", coords_ptr="*i64")
    compile_sm90(triton_ops._tile_gather_kernel, ptrs, ("alpha", "beta"), PAD_MODE=pad_mode, ACTIVATION=activation,
                 BLOCK_C=16, BLOCK_P=128, **flags, **ones)
compile_sm90(triton_ops._tile_scatter_kernel, {"out_ptr": "*fp32", "vals_ptr": "*fp32", "coords_ptr": "*i64"},
             BLOCK_C=32, BLOCK_P=64)
print("compiled for sm_90")
"""


@needs_triton
def test_kernels_compile_for_an_h100():
    """Triton's whole pipeline down to PTX and cubin for sm_90, without a GPU (ptxas ships with
    Triton), in a process without the interpreter. Ints equal to 1 are compiled as constants, as
    Triton specialises them at launch."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA GPU backend")
    result = run_without_interpreter(SM90_COMPILE_SCRIPT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled for sm_90" in result.stdout, (
        f"Triton {triton_ops.triton.__version__}: ahead-of-time compile failed (the TensorRT plugins need it): "
        f"{result.stdout[-2000:]}")


# ---------------------------------------------------------------------------------------------- dispatch


def test_cpu_tensors_use_the_reference_unless_sigec_triton_is_1(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("SIGEC_TRITON", raising=False)
    assert torch_onnx_ops.tile_kernels(cpu) is reference_ops
    monkeypatch.setenv("SIGEC_TRITON", "0")
    assert torch_onnx_ops.tile_kernels(cpu) is reference_ops


def test_without_triton_gpu_tensors_use_the_reference_and_sigec_triton_1_is_an_error(monkeypatch):
    import sigec.gpu

    monkeypatch.setitem(sys.modules, "sigec.gpu.triton_ops", None)  # import fails, as without Triton
    monkeypatch.delattr(sigec.gpu, "triton_ops", raising=False)
    gpu_tensor = SimpleNamespace(device=SimpleNamespace(type="cuda"))  # only its device is looked at
    monkeypatch.delenv("SIGEC_TRITON", raising=False)
    with pytest.warns(RuntimeWarning, match="Triton is not available"):
        assert torch_onnx_ops.tile_kernels(gpu_tensor) is reference_ops
    monkeypatch.setenv("SIGEC_TRITON", "1")
    with pytest.raises(BackendError, match="SIGEC_TRITON=1 but the Triton kernels cannot be imported"):
        torch_onnx_ops.tile_kernels(torch.zeros(1))


@needs_triton
def test_sigec_triton_1_selects_triton_for_cpu_tensors(monkeypatch):
    monkeypatch.setenv("SIGEC_TRITON", "1")
    assert torch_onnx_ops.tile_kernels(torch.zeros(1)) is triton_ops


@needs_triton
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (SIGEC_TEST_DEVICE=cuda)")
def test_cuda_tensors_use_triton_by_default(monkeypatch):
    monkeypatch.delenv("SIGEC_TRITON", raising=False)
    assert torch_onnx_ops.tile_kernels(torch.zeros(1, device="cuda")) is triton_ops


@needs_triton
def test_cpu_tensors_without_the_interpreter_are_an_error(monkeypatch):
    monkeypatch.setattr(triton_ops, "INTERPRET", False)
    base = torch.zeros((1, 1, 8, 8))
    with pytest.raises(BackendError, match="TRITON_INTERPRET"):
        triton_ops.tile_gather(base, None, None, torch.zeros((1, 3), dtype=torch.int64), window=[4, 4], step=[4, 4])


@needs_triton
def test_engine_runs_with_the_triton_kernels(small_unet_approx_path, monkeypatch):
    """The session's approx-mode small UNet (frozen GroupNorm prologues, upsampling, strided convs,
    attention island, output scatter) on the PyTorch executor: the sparse run with the Triton
    kernels equals the run with the reference kernels."""
    from small_unet import small_unet  # tests/ is on sys.path (conftest.py)

    _, x = small_unet()
    original = {"x": x.numpy()}
    mask = square_mask(32, 32, 0.05)
    edited = edit_inputs(original, ["x"], mask)
    calls = {"gather": 0, "scatter": 0}
    for name in calls:
        real = getattr(triton_ops, f"tile_{name}")

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(triton_ops, f"tile_{name}", spy)

    def sparse_run(device: str, triton: str) -> np.ndarray:
        monkeypatch.setenv("SIGEC_TRITON", triton)
        engine = sigec.load(small_unet_approx_path, backend="torch", device=device,
                            dense_fallback_fraction=ALWAYS_SPARSE)
        engine.prime(original)
        out = engine.run(edited, mask=mask)[0]
        assert engine.stats.path == "sparse"
        return out

    reference = sparse_run(DEVICE, "0")
    assert calls == {"gather": 0, "scatter": 0}
    with_triton = sparse_run(DEVICE, "1")
    assert calls["gather"] > 10 and calls["scatter"] > 0
    np.testing.assert_allclose(with_triton, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    if DEVICE == "cuda":  # the whole pipeline on the GPU against the CPU reference (cuDNN may use TF32)
        monkeypatch.delenv("SIGEC_TRITON")
        cpu = sigec.load(small_unet_approx_path, backend="torch", device="cpu", dense_fallback_fraction=ALWAYS_SPARSE)
        cpu.prime(original)
        np.testing.assert_allclose(with_triton, cpu.run(edited, mask=mask)[0], rtol=0,
                                   atol=2e-2 * np.abs(reference).max())
