"""The ONNX Runtime kernels of ai.sigec (plugins/ort) against the PyTorch reference (docs/ops.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from helpers import ACT_PARAMS, GATHER_INPUTS, check_gather, conv_attrs, coords_of, sparse_input
from sigec.core.errors import BackendError
from sigec.core.reference_ops import ACTIVATIONS, PAD_MODES, tile_gather, tile_scatter
from sigec.runtime import ort_ops

INT64_INPUTS = {"grid", "coords"}


# ---------------------------------------------------------------------------------------------- helpers


def _session(nodes, inputs, outputs, threads: int = 1, extra_inputs=()) -> ort.InferenceSession:
    value_infos = [
        helper.make_tensor_value_info(name, TensorProto.INT64 if name in INT64_INPUTS else TensorProto.FLOAT, None)
        for name in [*inputs, *extra_inputs]
    ]
    graph = helper.make_graph(
        nodes, "g", value_infos, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(ort_ops.DOMAIN, ort_ops.OPSET_VERSION)]
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    ort_ops.register(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_gather(arrays: dict, threads: int = 1, **attrs) -> np.ndarray:
    """Run a one-node TileGather graph; inputs missing from ``arrays`` are omitted from the node."""
    node_inputs = [name if arrays.get(name) is not None else "" for name in GATHER_INPUTS]
    while node_inputs[-1] == "":
        node_inputs.pop()
    present = [n for n in node_inputs if n]
    node = helper.make_node("TileGather", node_inputs, ["out"], domain=ort_ops.DOMAIN, **attrs)
    sess = _session([node], present, ["out"], threads)
    return sess.run(None, {n: arrays[n] for n in present})[0]


def ort_gather(threads: int = 1):
    """The ONNX Runtime kernel with the signature of ``reference_ops.tile_gather`` (for helpers.check_gather)."""

    def kernel(*tensors: torch.Tensor | None, **attrs) -> torch.Tensor:
        arrays = {name: None if t is None else t.numpy() for name, t in zip(GATHER_INPUTS, tensors)}
        return torch.from_numpy(run_gather(arrays, threads, **attrs))

    return kernel


def ref_gather(arrays: dict, **attrs) -> np.ndarray:
    t = {n: (torch.from_numpy(arrays[n]) if arrays.get(n) is not None else None) for n in GATHER_INPUTS}
    return tile_gather(t["base"], t["vals"], t["grid"], t["coords"], t["scale"], t["shift"], **attrs).numpy()


# ---------------------------------------------------------------------------------------------- TileGather


def test_zero_active_tiles_give_empty_output():
    rng = np.random.default_rng(0)
    arrays = sparse_input(rng, 2, 3, 16, 16, 8, cells=[])
    arrays["coords"] = np.zeros((0, 3), np.int64)
    out = check_gather(ort_gather(), **arrays, **conv_attrs(8)).numpy()
    assert out.shape == (0, 3, 10, 10)


@pytest.mark.parametrize("pad_mode", PAD_MODES)
def test_corner_and_border_tiles(pad_mode):
    # 21 x 19 is not a multiple of the tile size: the last row/column of tiles is partial.
    rng = np.random.default_rng(1)
    B, C, H, W, T = 2, 3, 21, 19, 8
    gh, gw = 3, 3
    corners = [(b, y, x) for b in range(B) for y in (0, gh - 1) for x in (0, gw - 1)]
    arrays = sparse_input(rng, B, C, H, W, T, cells=corners + [(1, 1, 1), (0, 1, 2)])
    arrays["coords"] = coords_of(corners)
    out = check_gather(ort_gather(), **arrays, pad_mode=pad_mode, **conv_attrs(T)).numpy()
    assert out.shape == (8, C, T + 2, T + 2)
    if pad_mode == "zeros":
        assert np.all(out[0, :, 0, :] == 0) and np.all(out[0, :, :, 0] == 0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation(activation):
    rng = np.random.default_rng(2)
    B, C, H, W, T = 2, 4, 20, 20, 6
    arrays = sparse_input(rng, B, C, H, W, T, frac=0.5)
    arrays["coords"] = coords_of(
        [(b, y, x) for b in range(B) for y in range(4) for x in range(4) if (y + x + b) % 3 == 0]
    )
    arrays["scale"] = (rng.standard_normal((B, C)) * 2).astype(np.float32)
    arrays["shift"] = rng.standard_normal((C,)).astype(np.float32)
    alpha, beta = ACT_PARAMS.get(activation, (0.0, 0.0))
    out = check_gather(ort_gather(), **arrays, activation=activation, alpha=alpha, beta=beta, **conv_attrs(T)).numpy()
    if activation == "relu":
        assert out.min() == 0.0


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "silu"])
def test_exp_activations_on_extreme_values(activation):
    # Values from -100 to 100 (saturation of the vectorised exponential) and a NaN.
    base = np.linspace(-100, 100, 2 * 16 * 16, dtype=np.float32).reshape(1, 2, 16, 16)
    base[0, 1, 5, 5] = np.nan
    arrays = {"base": base, "coords": coords_of([(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)])}
    out = check_gather(ort_gather(), **arrays, activation=activation, **conv_attrs(8)).numpy()
    assert np.isnan(out).sum() == 1


LINEAR_ACTIVATIONS = ["relu", "leaky_relu", "hard_sigmoid", "hard_swish", "clip"]


def _linear_formula(v: np.ndarray, activation: str, alpha: float, beta: float) -> np.ndarray:
    """The kernels' scalar formulas (plugins/ort/prologue.h) in float32, one rounding per operation
    and no fused multiply-add; NaN propagates through min/max as in std::min/std::max."""
    a, b, zero, one = np.float32(alpha), np.float32(beta), np.float32(0), np.float32(1)
    with np.errstate(invalid="ignore", over="ignore"):
        if activation == "relu":
            return np.where(v < 0, zero, v)
        if activation == "leaky_relu":
            return np.where(v >= 0, v, v * a)
        if activation == "hard_sigmoid":
            return np.minimum(np.maximum(v * a + b, zero), one)
        if activation == "hard_swish":
            return v * np.minimum(np.maximum(v * (one / np.float32(6)) + np.float32(0.5), zero), one)
        return np.minimum(np.maximum(v, a), b)  # clip


def _same_bits(out: np.ndarray, expected: np.ndarray) -> None:
    """Equal to the bit (signed zeros included), NaN wherever the other is NaN."""
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out[~nan].view(np.uint32), expected[~nan].view(np.uint32))


@pytest.mark.parametrize("activation", LINEAR_ACTIVATIONS)
@pytest.mark.parametrize("affine", [False, True])
def test_linear_activations_match_the_scalar_formulas_to_the_bit(activation, affine):
    _check_linear_activation(activation, affine)


def test_linear_activations_without_avx():
    """The same on the SSE2 paths alone (SIGEC_ORT_NO_AVX=1, read once per process: a fresh interpreter)."""
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_ort_ops as t\n"
              "for act in t.LINEAR_ACTIVATIONS:\n    for affine in (False, True): t._check_linear_activation(act, affine)")
    env = {**os.environ, "SIGEC_ORT_NO_AVX": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _check_linear_activation(activation: str, affine: bool) -> None:
    # The SSE2 / AVX paths of the piecewise-linear prologues (8- and 4-wide groups, then a scalar tail:
    # window areas 3, 4, 9, 25, 36, 49, 36 exercise every mix) against the scalar formulas, on values
    # at the kinks (+-3 and their neighbours, alpha, beta), signed zeros, infinities and NaN; padded
    # positions stay 0 (the prologue is not applied to padding).
    rng = np.random.default_rng(11)
    C, H, W = 5, 13, 11
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 3.0, -3.0, np.nextafter(3, 4), np.nextafter(-3, -4),
                         -0.5, 0.7, -2.5, 2.5, 1e30, -1e30, 1e-40, -1e-40], np.float32)
    base = (rng.standard_normal((1, C, H, W)) * 4).astype(np.float32)
    flat = base.reshape(-1)
    flat[rng.choice(flat.size, 6 * specials.size, replace=False)] = np.tile(specials, 6)
    alpha, beta = ACT_PARAMS.get(activation, (0.0, 0.0))
    arrays = {"base": base, "coords": coords_of([(0, y, x) for y in range(4) for x in range(3)])}
    if affine:
        arrays["scale"] = np.array([1.0, -1.0, 0.37, -2.5, 1e-3], np.float32)
        arrays["shift"] = np.array([0.0, -0.0, 0.5, -3.0, 3.0], np.float32)
    ones = {"base": np.ones_like(base), "coords": arrays["coords"]}
    for window in [(1, 3), (2, 2), (3, 3), (5, 5), (6, 6), (7, 7), (4, 9)]:
        attrs = {"window": list(window), "step": [4, 4], "offset": [-1, -1]}
        out = run_gather(arrays, activation=activation, alpha=alpha, beta=beta, **attrs)
        raw = ref_gather({"base": base, "coords": arrays["coords"]}, **attrs)
        inside = ref_gather(ones, **attrs) != 0
        if affine:
            raw = raw * arrays["scale"][None, :, None, None] + arrays["shift"][None, :, None, None]
        expected = np.where(inside, _linear_formula(raw, activation, alpha, beta), np.float32(0))
        _same_bits(out, expected.astype(np.float32))
        check_gather(ort_gather(), **{k: arrays.get(k) for k in ("base", "coords", "scale", "shift")},
                     activation=activation, alpha=alpha, beta=beta, **attrs)


@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("upsample", [1, 2])
def test_pad_modes_on_tiny_map(pad_mode, upsample):
    # A 3 x 5 map with 4 x 4 tiles: windows stick out on both sides; an odd 5 x 7 window.
    rng = np.random.default_rng(3)
    arrays = sparse_input(rng, 1, 2, 3, 5, 4, cells=[(0, 0, 1)])
    grid_h, grid_w = -(-3 * upsample // 4), -(-5 * upsample // 4)
    arrays["coords"] = coords_of([(0, y, x) for y in range(grid_h) for x in range(grid_w)])
    attrs = {"window": [5, 7], "step": [4, 4], "offset": [-1, -2]}
    check_gather(ort_gather(), **arrays, pad_mode=pad_mode, upsample=upsample, activation="tanh", **attrs)


@pytest.mark.parametrize("pad_mode", PAD_MODES)
def test_upsample_2(pad_mode):
    # Nearest 2x upsampling fused into the gather of a 3x3 convolution on the upsampled map.
    rng = np.random.default_rng(4)
    B, C, H, W, T = 2, 3, 10, 9, 4
    arrays = sparse_input(rng, B, C, H, W, T, frac=0.4)
    gh, gw = -(-2 * H // 8), -(-2 * W // 8)
    arrays["coords"] = coords_of(
        [(b, y, x) for b in range(B) for y in range(gh) for x in range(gw) if (x * y + b) % 2 == 0]
    )
    check_gather(ort_gather(), **arrays, upsample=2, pad_mode=pad_mode, **conv_attrs(8))


def test_strided_conv_geometry():
    # 3x3 stride-2 conv, output tile T: window (T - 1) * 2 + 3, step 2T.
    rng = np.random.default_rng(5)
    B, C, H, W, T = 2, 3, 33, 30, 4
    arrays = sparse_input(rng, B, C, H, W, T, frac=0.3)
    out_h, out_w = (H + 1) // 2, (W + 1) // 2
    gh, gw = -(-out_h // T), -(-out_w // T)
    arrays["coords"] = coords_of(
        [(b, y, x) for b in range(B) for y in range(gh) for x in range(gw) if (y + 2 * x + b) % 3]
    )
    window = (T - 1) * 2 + 3
    check_gather(ort_gather(), **arrays, window=[window, window], step=[2 * T, 2 * T], offset=[-1, -1],
                 activation="relu")


def test_transposed_conv_geometry():
    # Transposed-conv style: the output map is twice the input, output tile T reads T/2 + 2 inputs.
    rng = np.random.default_rng(6)
    B, C, H, W, T = 1, 3, 12, 14, 8
    arrays = sparse_input(rng, B, C, H, W, 4, frac=0.3)
    gh, gw = -(-2 * H // T), -(-2 * W // T)
    arrays["coords"] = coords_of([(0, y, x) for y in range(gh) for x in range(gw)])
    check_gather(ort_gather(), **arrays, window=[T // 2 + 2, T // 2 + 2], step=[T // 2, T // 2], offset=[-1, -1])


def test_vals_absent_reads_base():
    rng = np.random.default_rng(7)
    arrays = sparse_input(rng, 2, 3, 17, 23, 8, cells=[])
    arrays["vals"] = arrays["grid"] = None
    arrays["coords"] = coords_of([(0, 0, 0), (0, 2, 2), (1, 1, 2), (1, 2, 0)])
    out = check_gather(ort_gather(), **arrays, **conv_attrs(8)).numpy()
    np.testing.assert_array_equal(out[0, :, 1:, 1:], arrays["base"][0, :, :9, :9])
    assert np.all(out[0, :, 0, :] == 0)


@pytest.mark.parametrize("scale_shape", [None, "C", "BC"])
@pytest.mark.parametrize("shift_shape", [None, "C", "BC"])
def test_scale_shift_shapes(scale_shape, shift_shape):
    rng = np.random.default_rng(8)
    B, C = 2, 5
    arrays = sparse_input(rng, B, C, 16, 16, 8, cells=[(0, 0, 1), (1, 1, 0)])
    arrays["coords"] = coords_of([(0, 0, 0), (1, 1, 1)])
    shapes = {None: None, "C": (C,), "BC": (B, C)}
    for name, kind in (("scale", scale_shape), ("shift", shift_shape)):
        shape = shapes[kind]
        arrays[name] = None if shape is None else rng.standard_normal(shape).astype(np.float32)
    check_gather(ort_gather(), **arrays, activation="silu", **conv_attrs(8))


def test_large_random_two_threads():
    rng = np.random.default_rng(9)
    B, C, H, W, T = 1, 64, 96, 80, 8
    arrays = sparse_input(rng, B, C, H, W, T, frac=0.3)
    arrays["coords"] = coords_of([tuple(c) for c in np.argwhere(arrays["grid"] >= 0)] + [(0, 0, 0), (0, 11, 9)])
    arrays["scale"] = rng.standard_normal((C,)).astype(np.float32)
    arrays["shift"] = rng.standard_normal((B, C)).astype(np.float32)
    out = check_gather(ort_gather(2), **arrays, activation="silu", **conv_attrs(T)).numpy()
    assert out.shape[0] == len(arrays["coords"])
    plain = {k: arrays[k] for k in ("base", "vals", "grid", "coords")}
    check_gather(ort_gather(2), **plain, **conv_attrs(T))


def test_concurrent_runs_of_one_session():
    # Kernels are shared by all Run calls of a session: Compute must be thread-safe.
    attrs = dict(activation="relu", **conv_attrs(4))
    node = helper.make_node("TileGather", list(GATHER_INPUTS[:4]), ["out"], domain=ort_ops.DOMAIN, **attrs)
    sess = _session([node], GATHER_INPUTS[:4], ["out"], threads=2)
    rng = np.random.default_rng(13)
    cases = []
    for _ in range(6):
        arrays = sparse_input(rng, 2, 8, 24, 20, 4, frac=0.4)
        arrays["coords"] = coords_of([tuple(c) for c in np.argwhere(rng.random((2, 6, 5)) < 0.5)])
        cases.append(arrays)
    with ThreadPoolExecutor(max_workers=3) as pool:
        outs = list(pool.map(lambda a: sess.run(None, {n: a[n] for n in GATHER_INPUTS[:4]})[0], cases))
    for arrays, out in zip(cases, outs):
        np.testing.assert_allclose(out, ref_gather(arrays, **attrs), rtol=1e-6, atol=1e-6)


def test_gather_output_shape_is_inferred():
    node = helper.make_node(
        "TileGather", ["base", "", "", "coords"], ["out"], domain=ort_ops.DOMAIN, window=[6, 7], step=[4, 4]
    )
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("base", TensorProto.FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("coords", TensorProto.INT64, ["N", 3]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(ort_ops.DOMAIN, 1)]
    )
    options = ort.SessionOptions()
    ort_ops.register(options)
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert sess.get_outputs()[0].shape == ["N", 3, 6, 7]


# ---------------------------------------------------------------------------------------------- TileScatter


def run_scatter(base, vals, coords, threads: int = 1, base_from_add: bool = False) -> np.ndarray:
    nodes = [helper.make_node("TileScatter", ["b", "vals", "coords"], ["out"], domain=ort_ops.DOMAIN)]
    if base_from_add:  # base is an intermediate: ONNX Runtime may hand its buffer to the output
        nodes.insert(0, helper.make_node("Add", ["base", "base"], ["b"]))
    else:
        nodes.insert(0, helper.make_node("Identity", ["base"], ["b"]))
    sess = _session(nodes, ["base", "vals", "coords"], ["out"], threads)
    return sess.run(None, {"base": base, "vals": vals, "coords": coords})[0]


@pytest.mark.parametrize("base_from_add", [False, True])
def test_scatter_border_tiles_batch_2(base_from_add):
    rng = np.random.default_rng(10)
    B, C, H, W, T = 2, 3, 21, 19, 8
    cells = [(0, 0, 0), (0, 2, 2), (0, 2, 1), (1, 0, 2), (1, 1, 1), (1, 2, 0)]
    base = rng.standard_normal((B, C, H, W)).astype(np.float32)
    vals = rng.standard_normal((len(cells), C, T, T)).astype(np.float32)
    coords = coords_of(cells)
    out = run_scatter(base, vals, coords, threads=2, base_from_add=base_from_add)
    src = base * 2 if base_from_add else base
    expected = tile_scatter(torch.from_numpy(src), torch.from_numpy(vals), torch.from_numpy(coords)).numpy()
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out[1, :, 16:, :8], vals[5, :, :5, :8])


def test_scatter_no_tiles_and_large_unsorted():
    rng = np.random.default_rng(11)
    B, C, H, W, T = 1, 32, 64, 72, 8
    base = rng.standard_normal((B, C, H, W)).astype(np.float32)
    out = run_scatter(base, np.zeros((0, C, T, T), np.float32), np.zeros((0, 3), np.int64))
    np.testing.assert_array_equal(out, base)
    cells = [tuple(int(v) for v in c) for c in np.argwhere(rng.random((B, 8, 9)) < 0.3)]
    rng.shuffle(cells)
    coords = np.array(cells, np.int64)
    vals = rng.standard_normal((len(cells), C, T, T)).astype(np.float32)
    out = run_scatter(base, vals, coords, threads=2)
    expected = tile_scatter(torch.from_numpy(base), torch.from_numpy(vals), torch.from_numpy(coords)).numpy()
    np.testing.assert_array_equal(out, expected)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_gather_inputs_raise_errors():
    rng = np.random.default_rng(12)
    arrays = sparse_input(rng, 2, 3, 16, 16, 8, cells=[(0, 0, 0)])
    arrays["coords"] = coords_of([(2, 0, 0)])  # batch 2 of 2
    with pytest.raises(Exception, match=r"TileGather: coords\[0\] = \(2, 0, 0\): batch index"):
        run_gather(arrays, **conv_attrs(8))
    arrays["coords"] = coords_of([(0, 5000, 0)])
    with pytest.raises(Exception, match="TileGather: .*outside"):
        run_gather(arrays, **conv_attrs(8))
    arrays["coords"] = coords_of([(0, 0, 0)])
    bad_grid = dict(arrays, grid=np.full_like(arrays["grid"], 7))
    with pytest.raises(Exception, match="TileGather: input 'grid' holds slot 7"):
        run_gather(bad_grid, **conv_attrs(8))
    bad_vals = dict(arrays, vals=arrays["vals"][:, :2])
    with pytest.raises(Exception, match="TileGather: input 'vals' must have shape"):
        run_gather(bad_vals, **conv_attrs(8))
    bad_scale = dict(arrays, scale=np.ones((4,), np.float32))
    with pytest.raises(Exception, match="TileGather: input 'scale'"):
        run_gather(bad_scale, **conv_attrs(8))
    with pytest.raises(Exception, match="TileGather: unknown activation"):
        run_gather(arrays, activation="gelu", **conv_attrs(8))
    with pytest.raises(Exception, match="window"):
        run_gather(arrays, step=[8, 8])


def test_bad_scatter_coords_raise_error():
    base = np.zeros((1, 2, 10, 10), np.float32)
    vals = np.ones((1, 2, 8, 8), np.float32)
    with pytest.raises(Exception, match="TileScatter: coords.*outside the tile grid"):
        run_scatter(base, vals, np.array([[0, 2, 0]], np.int64))
    with pytest.raises(Exception, match="TileScatter: input 'vals'"):
        run_scatter(base, vals, np.zeros((0, 3), np.int64))


# ---------------------------------------------------------------------------------------------- loading


_SUBPROCESS_SCRIPT = """
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
from sigec.runtime import ort_ops

node = helper.make_node(
    "TileGather", ["base", "", "", "coords"], ["out"], domain="ai.sigec", window=[2, 2], step=[2, 2]
)
inputs = [
    helper.make_tensor_value_info("base", TensorProto.FLOAT, None),
    helper.make_tensor_value_info("coords", TensorProto.INT64, None),
]
graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.sigec", 1)])
options = ort.SessionOptions()
ort_ops.register(options)
sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
base = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
print(sess.run(None, {"base": base, "coords": np.array([[0, 1, 1]])})[0].ravel().tolist())
"""


def test_library_loads_in_fresh_subprocess():
    env = {k: v for k, v in os.environ.items() if k != ort_ops.ENV_LIBRARY}
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[10.0, 11.0, 14.0, 15.0]"


def test_library_path_override(monkeypatch, tmp_path):
    real = ort_ops.library_path()
    assert real.is_file() and real.name.startswith("libsigec_ort_ops")
    monkeypatch.setenv(ort_ops.ENV_LIBRARY, str(real))
    assert ort_ops.library_path() == real.resolve()
    monkeypatch.setenv(ort_ops.ENV_LIBRARY, str(tmp_path / "missing.so"))
    with pytest.raises(BackendError, match="pip install"):
        ort_ops.library_path()
    with pytest.raises(BackendError):
        ort_ops.register(ort.SessionOptions())


def test_register_rejects_a_non_library(monkeypatch, tmp_path):
    fake = Path(tmp_path / "libsigec_ort_ops.so")
    fake.write_bytes(b"not an ELF file")
    monkeypatch.setenv(ort_ops.ENV_LIBRARY, str(fake))
    with pytest.raises(BackendError, match="could not load"):
        ort_ops.register(ort.SessionOptions())


@pytest.mark.parametrize("pad_mode", ["zeros", "edge", "reflect"])
def test_windows_lying_in_the_padding_are_valid(pad_mode):
    """A folded Pad can grow the map: the last tiles' windows may lie wholly in the padding."""
    rng = np.random.default_rng(21)
    arrays = sparse_input(rng, 1, 3, 19, 14, 4, cells=[(0, 4, 3)])
    # 1x1 conv after a pad of 2 on each side: output 23 x 18, window origin ty*4 - 2
    arrays["coords"] = coords_of([(0, 5, 1), (0, 5, 4), (0, 0, 0), (0, 4, 3)])
    check_gather(ort_gather(), **arrays, window=[4, 4], step=[4, 4], offset=[-2, -2], pad_mode=pad_mode)
