"""Half-precision caches (``cache_dtype`` "float16" / "bfloat16"): passes/half_caches.py, the operators'
dtype rule (docs/ops.md, "Dtypes") in the ONNX Runtime kernels, the reference and Triton, and the
engine (prime stores half caches, updates cast float32 tiles explicitly, the manifest says so).
Caches of model outputs stay float32 (outside the edit a run returns them as primed).

``sigec.load(..., cache_dtype=...)`` changes a compiled engine's choice: its graphs and manifest
become those of compiling with that dtype (half_caches.recast_caches).

Tolerances. The operators convert half values exactly, so a kernel reading a half ``base`` must equal
the reference run on that base widened to float32 (1e-6, as the float32 kernels; bit-exact without a
prologue). An engine with float16 caches differs from the original model by the rounding of every
cached value (relative 2^-11) carried through the following layers: in exact mode its outputs stay
within HALF_EXACT_TOLERANCE (5e-3, max-abs relative; measured below 1e-3) of ONNX Runtime on the
original model; in approx mode the relative L2 error grows by at most HALF_APPROX_GROWTH (2e-3) over
the float32-cache engine's (measured: BENCHMARKS.md, "Half-precision caches").
"""

from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import sigec
from helpers import (ALWAYS_SPARSE, ROOT, always_sparse, compare_with_oracle, conv_attrs, coords_of, engine_from_proto,
                     ort_oracle, rel_err, sparse_input)
from sigec.core import reference_ops
from sigec.core.engine_file import read_manifest
from sigec.core.errors import BackendError, CacheError, CompileError, EngineFileError, InputError
from sigec.core.manifest_schema import validate_manifest
from sigec.core.names import CACHE_PREFIX
from sigec.core.options import CACHE_DTYPES
from sigec.core.ops import DOMAIN
from sigec.passes.half_caches import choose_half_caches
from sigec.passes.sparse_context import CacheSpec
from sigec.runtime import ort_ops
from sigec.runtime.cache_store import cast_tiles
from sigec.runtime.synthetic_edits import edit_inputs, square_mask

HALF_EXACT_TOLERANCE = 5e-3
HALF_APPROX_GROWTH = 2e-3
HALF = {"float16": (np.dtype(np.float16), TensorProto.FLOAT16, torch.float16),
        "bfloat16": (np.dtype(ml_dtypes.bfloat16), TensorProto.BFLOAT16, torch.bfloat16)}


# ---------------------------------------------------------------------------------------------- op helpers


def _ort_value(array: np.ndarray, onnx_type: int) -> ort.OrtValue:
    if array.dtype == HALF["bfloat16"][0]:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), onnx_type)
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def run_ops(nodes, feeds: dict[str, np.ndarray], outputs: list[str], threads: int = 1) -> list[np.ndarray]:
    """Run a graph of sigec nodes in ONNX Runtime; input element types follow the arrays' dtypes."""
    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
             np.dtype(np.float64): TensorProto.DOUBLE, HALF["float16"][0]: TensorProto.FLOAT16,
             HALF["bfloat16"][0]: TensorProto.BFLOAT16}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, types[a.dtype], list(a.shape))
                                           for n, a in feeds.items()],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(ort_ops.DOMAIN, ort_ops.OPSET_VERSION)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    ort_ops.register(options)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = {n: _ort_value(a, types[a.dtype]) for n, a in feeds.items()}
    return [v.numpy() for v in session.run_with_ort_values(outputs, values)]


def gather_node(inputs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node("TileGather", inputs, ["out"], domain=DOMAIN, **attrs)


def half_case(seed: int, dtype: str, batch=2, channels=5, height=21, width=19, tile=4, frac=0.3):
    """helpers.sparse_input with its base rounded to the half ``dtype`` (the reference's base is the
    widened half base: the kernels must convert exactly)."""
    arrays = sparse_input(np.random.default_rng(seed), batch, channels, height, width, tile, frac=frac)
    arrays["base"] = arrays["base"].astype(HALF[dtype][0])
    return arrays


def widened(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32))


def ref_gather(arrays: dict, **attrs) -> np.ndarray:
    t = {k: (widened(v) if k == "base" else torch.from_numpy(v)) for k, v in arrays.items()}
    return reference_ops.tile_gather(t["base"], t.get("vals"), t.get("grid"), t["coords"], t.get("scale"),
                                     t.get("shift"), **attrs).numpy()


# ---------------------------------------------------------------------------------------------- the dtype rule


def test_result_dtype_rule():
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    t = {d: torch.zeros(1, 1, 4, 4, dtype=d) for d in (f32, f16, bf16)}
    assert reference_ops.result_dtype(t[f16], t[f32]) == f32  # a half cache with float32 tiles
    assert reference_ops.result_dtype(t[f32], t[f16]) == f32  # autocast: float32 cache, float16 tiles
    assert reference_ops.result_dtype(t[f16], t[bf16]) == f32
    assert reference_ops.result_dtype(t[bf16], None) == bf16
    coords = torch.tensor([[0, 0, 0]])
    grid = torch.zeros(1, 1, 1, dtype=torch.int64)
    vals = torch.randn(1, 1, 4, 4)
    for base in (t[f16], t[bf16]):
        out = reference_ops.tile_gather(base, vals, grid, coords, window=[4, 4], step=[4, 4])
        assert out.dtype == f32 and torch.equal(out, vals)
        assert reference_ops.tile_gather(base, vals, grid, coords[:0], window=[4, 4], step=[4, 4]).dtype == f32
        scattered = reference_ops.tile_scatter(base, vals, coords)
        assert scattered.dtype == f32 and torch.equal(scattered, vals)
        assert reference_ops.tile_gather(base, None, None, coords, window=[4, 4], step=[4, 4]).dtype == base.dtype


# ---------------------------------------------------------------------------------------------- ONNX Runtime kernels


@pytest.mark.parametrize("dtype", list(HALF))
@pytest.mark.parametrize("geometry", ["conv", "upsample_reflect", "strided_edge"])
def test_ort_gather_reads_a_half_base_exactly(dtype, geometry):
    arrays = half_case(1, dtype)
    B, T = 2, 4
    attrs = {"conv": dict(conv_attrs(T), pad_mode="zeros"),
             "upsample_reflect": dict(window=[T + 2, T + 2], step=[T, T], offset=[-1, -1], upsample=2,
                                      pad_mode="reflect"),
             "strided_edge": dict(window=[2 * T + 1, 2 * T + 1], step=[2 * T, 2 * T], offset=[-1, -1],
                                  pad_mode="edge")}[geometry]
    arrays["coords"] = coords_of([(b, y, x) for b in range(B) for y in range(3) for x in range(3) if (b + x + y) % 2])
    inputs = ["base", "vals", "grid", "coords"]
    (out,) = run_ops([gather_node(inputs, **attrs)], {k: arrays[k] for k in inputs}, ["out"])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, ref_gather({k: arrays[k] for k in inputs}, **attrs))  # no prologue: exact


@pytest.mark.parametrize("dtype", list(HALF))
@pytest.mark.parametrize("activation", ["none", "silu", "leaky_relu"])
def test_ort_gather_prologue_on_a_half_base(dtype, activation):
    rng = np.random.default_rng(2)
    arrays = half_case(3, dtype, channels=37, height=17, width=23)
    arrays["coords"] = coords_of([(b, y, x) for b in range(2) for y in range(5) for x in range(6) if (x * y + b) % 3])
    arrays["scale"] = rng.standard_normal((2, 37)).astype(np.float32)
    arrays["shift"] = rng.standard_normal((37,)).astype(np.float32)
    attrs = dict(conv_attrs(4), activation=activation, alpha=0.1)
    (out,) = run_ops([gather_node(["base", "vals", "grid", "coords", "scale", "shift"], **attrs)], arrays, ["out"],
                     threads=2)
    np.testing.assert_allclose(out, ref_gather(arrays, **attrs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", list(HALF))
def test_ort_scatter_with_a_half_base_outputs_float32(dtype):
    arrays = half_case(4, dtype, height=22, width=17)  # border tiles are partial
    coords = coords_of([tuple(int(v) for v in c) for c in np.argwhere(arrays["grid"] >= 0)])
    vals = arrays["vals"][arrays["grid"][tuple(coords.T)]]  # tile n of coords
    node = helper.make_node("TileScatter", ["base", "vals", "coords"], ["out"], domain=DOMAIN)
    (out,) = run_ops([node], {"base": arrays["base"], "vals": vals, "coords": coords}, ["out"], threads=2)
    expected = reference_ops.tile_scatter(widened(arrays["base"]), torch.from_numpy(vals), torch.from_numpy(coords))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected.numpy())


def _special_halves(dtype: str) -> np.ndarray:
    """Every class of half value: signed zeros, subnormals, normals at both ends, infinities, NaN."""
    np_dtype = HALF[dtype][0]
    info = ml_dtypes.finfo(np_dtype) if dtype == "bfloat16" else np.finfo(np.float16)
    values = [0.0, -0.0, float(info.smallest_subnormal), -float(info.smallest_subnormal), float(info.tiny),
              float(info.max), -float(info.max), 1.0, -2.5, 1 / 3, np.inf, -np.inf, np.nan]
    bits = np.arange(0, 2 ** 16, 257, dtype=np.uint16).view(np_dtype)  # a sweep over the bit patterns
    return np.concatenate([np.array(values, np.float32).astype(np_dtype), bits])


@pytest.mark.parametrize("dtype", list(HALF))
@pytest.mark.parametrize("f16c", [True, False], ids=["f16c", "portable"])
def test_ort_conversion_of_every_value_class(dtype, f16c):
    """Gather and scatter copy special values exactly, with the F16C path and with the portable one
    (SIGEC_ORT_NO_F16C=1, read once per process: a fresh interpreter)."""
    if not f16c or dtype == "bfloat16":
        script = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_half_caches as t; "
                  f"t._check_special_values({dtype!r})")
        env = {**os.environ, "SIGEC_ORT_NO_F16C": "0" if f16c else "1"}
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        _check_special_values(dtype)


def _check_special_values(dtype: str) -> None:
    values = _special_halves(dtype)
    width = 16
    count = -(-values.size // width) * width
    base = np.resize(values, count).reshape(1, 1, count // width, width)
    height = base.shape[2]
    cells = [(0, y, x) for y in range(-(-height // 4)) for x in range(width // 4)]
    coords = coords_of(cells)
    grid = np.full((1, -(-height // 4), width // 4), -1, np.int64)
    vals = np.zeros((1, 1, 4, 4), np.float32)
    grid[0, 0, 0] = 0  # one tile from vals, the rest from base
    attrs = dict(window=[4, 4], step=[4, 4])
    (gathered,) = run_ops([gather_node(["base", "vals", "grid", "coords"], **attrs)],
                          {"base": base, "vals": vals, "grid": grid, "coords": coords}, ["out"])
    widened_base = base.astype(np.float32)
    expected = ref_gather({"base": base, "vals": vals, "grid": grid, "coords": coords}, **attrs)
    _assert_same_bits(gathered, expected)
    node = helper.make_node("TileScatter", ["base", "vals", "coords"], ["out"], domain=DOMAIN)
    (scattered,) = run_ops([node], {"base": base, "vals": vals, "coords": coords_of([(0, 0, 0)])}, ["out"])
    widened_base[0, 0, :4, :4] = 0
    _assert_same_bits(scattered, widened_base)


def _assert_same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal bit for bit (signed zeros, infinities, subnormals), NaN where NaN (F16C quiets signalling
    NaNs, numpy keeps their payload: both are NaN)."""
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    np.testing.assert_array_equal(actual[~nan].view(np.uint32), expected[~nan].view(np.uint32))


def test_ort_errors_for_unsupported_dtypes():
    arrays = half_case(5, "float16")
    with pytest.raises(Exception, match="needs float 'vals'"):  # the output would be half
        run_ops([gather_node(["base", "", "", "coords"], window=[4, 4], step=[4, 4])],
                {"base": arrays["base"], "coords": arrays["coords"]}, ["out"])
    with pytest.raises(Exception, match="float, float16 or bfloat16"):
        run_ops([gather_node(["base", "vals", "grid", "coords"], window=[4, 4], step=[4, 4])],
                {"base": arrays["base"].astype(np.float64), "vals": arrays["vals"], "grid": arrays["grid"],
                 "coords": arrays["coords"]}, ["out"])
    node = helper.make_node("TileScatter", ["base", "vals", "coords"], ["out"], domain=DOMAIN)
    with pytest.raises(Exception, match="float, float16 or bfloat16"):
        run_ops([node], {"base": arrays["base"].astype(np.float64), "vals": arrays["vals"][:0],
                         "coords": arrays["coords"][:0]}, ["out"])


# ---------------------------------------------------------------------------------------------- Triton kernels


@pytest.mark.parametrize("dtype", list(HALF))
def test_triton_kernels_read_a_half_base(dtype):
    pytest.importorskip("triton", reason="Triton, the GPU kernel compiler, is not installed")
    from sigec.gpu import triton_ops

    if not triton_ops.INTERPRET and not torch.cuda.is_available():
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1 (tests/conftest.py)")
    device = "cuda" if not triton_ops.INTERPRET else "cpu"
    arrays = half_case(6, dtype, channels=3, height=13, width=11)
    base = torch.from_numpy(arrays["base"].view(np.int16)).view(HALF[dtype][2]).to(device)
    vals, grid = torch.from_numpy(arrays["vals"]).to(device), torch.from_numpy(arrays["grid"]).to(device)
    coords = torch.from_numpy(coords_of([(0, 0, 0), (0, 3, 2), (1, 1, 2), (1, 2, 1)])).to(device)
    shift = torch.randn(3, device=device)
    out = triton_ops.tile_gather(base, vals, grid, coords, None, shift, activation="silu", pad_mode="reflect",
                                 **conv_attrs(4))
    expected = reference_ops.tile_gather(base.float(), vals, grid, coords, None, shift, activation="silu",
                                         pad_mode="reflect", **conv_attrs(4))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    scatter_coords = torch.from_numpy(coords_of([(0, 0, 0), (0, 3, 2), (1, 1, 1)])).to(device)
    scattered = triton_ops.tile_scatter(base, vals[:3], scatter_coords)
    assert scattered.dtype == torch.float32
    assert torch.equal(scattered, reference_ops.tile_scatter(base.float(), vals[:3], scatter_coords))


# ---------------------------------------------------------------------------------------------- the choice


def _cache(name: str, graph: ir.Graph, dtype=ir.DataType.FLOAT) -> tuple[ir.Value, CacheSpec]:
    value = ir.Value(name=CACHE_PREFIX + name, type=ir.TensorType(dtype), shape=ir.Shape([1, 2, 8, 8]))
    graph.inputs.append(value)
    return value, CacheSpec(value.name, name, [1, 2, 8, 8], "float32", "activation", "r8x8")


def test_only_caches_read_as_the_base_of_tile_ops_with_float_tiles_are_chosen():
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 18, DOMAIN: 1})
    vals = ir.Value(name="vals", type=ir.TensorType(ir.DataType.FLOAT))
    grid, coords = (ir.Value(name=n, type=ir.TensorType(ir.DataType.INT64)) for n in ("grid", "coords"))
    graph.inputs.extend([vals, grid, coords])
    specs = {}

    def use(op_type, inputs, domain=DOMAIN):  # a node reading ``inputs`` whose output is no graph output
        graph.append(ir.node(op_type, inputs, domain=domain, name=f"n{len(graph)}"))

    for name in ("gathered", "scattered", "both", "token", "added", "as_scale", "no_vals", "half_tiles", "int",
                 "output"):
        value, spec = _cache(name, graph, ir.DataType.INT64 if name == "int" else ir.DataType.FLOAT)
        specs[name] = (value, spec)
    half_vals = ir.Value(name="half_vals", type=ir.TensorType(ir.DataType.FLOAT16))
    graph.inputs.append(half_vals)
    v = {k: val for k, (val, _) in specs.items()}
    use("TileGather", [v["gathered"], vals, grid, coords])
    use("TileScatter", [v["scattered"], vals, coords])
    use("TileGather", [v["both"], vals, grid, coords])
    use("TileScatter", [v["both"], vals, coords])
    use("ScatterND", [v["token"], coords, vals], domain="")  # a token cache: read by a standard op
    use("TileScatter", [v["added"], vals, coords])
    use("Add", [v["added"], vals], domain="")
    use("TileGather", [v["gathered"], vals, grid, coords, v["as_scale"]])
    use("TileGather", [v["no_vals"], None, None, coords])
    use("TileGather", [v["half_tiles"], half_vals, grid, coords])
    use("TileGather", [v["int"], vals, grid, coords])
    scatter_to_model_output = ir.node("TileScatter", [v["output"], vals, coords], domain=DOMAIN, name="to_output")
    graph.append(scatter_to_model_output)
    graph.outputs.append(scatter_to_model_output.outputs[0])
    inner = ir.node("TileScatter", [v["scattered"], vals, coords], domain=DOMAIN, name="inner")
    graph.append(inner)
    graph.append(ir.node("Relu", [inner.outputs[0]], name="relu"))  # a scatter feeding a standard op is fine
    unread, unread_spec = _cache("unread", graph)
    choice = choose_half_caches(graph, [s for _, s in specs.values()] + [unread_spec], "float16")
    assert set(choice.chosen) == {CACHE_PREFIX + n for n in ("gathered", "scattered", "both")}
    kept = {k[len(CACHE_PREFIX):]: why for k, why in choice.kept.items()}
    assert "ScatterND" in kept["token"] and "Add" in kept["added"] and "input 4" in kept["as_scale"]
    assert "without tiles" in kept["no_vals"] and "FLOAT16 tiles" in kept["half_tiles"]
    assert "not float32" in kept["int"] and "nothing reads it" in kept["unread"]
    assert "model output" in kept["output"]
    assert choose_half_caches(graph, [s for _, s in specs.values()], "float32").chosen == {}
    with pytest.raises(CompileError, match="cache_dtype"):
        choose_half_caches(graph, [], "float8")


# ---------------------------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def unet(zoo_model):
    """The small DDPM UNet (approx mode: static and statistics caches besides the activations)."""
    return zoo_model("ddpm_unet")


def _dtypes(manifest) -> tuple[set[str], set[str]]:
    """The dtypes of the caches of model outputs (always float32: rule 4 of choose_half_caches) and of
    the other caches."""
    outputs = {o["name"] for o in manifest["outputs"]}
    of_outputs = {c["dtype"] for c in manifest["caches"] if c["source"] in outputs}
    return of_outputs, {c["dtype"] for c in manifest["caches"] if c["source"] not in outputs}


def _edit(engine, original, fraction=0.05, seed=1):
    spatial = [i["name"] for i in engine.manifest["inputs"] if i["spatial"]]
    height, width = engine.manifest["mask_program"]["input_size"]
    mask = square_mask(height, width, fraction)
    return edit_inputs(original, spatial, mask, seed=seed), mask


def test_caches_read_by_standard_ops_stay_float32(unet):
    engine = engine_from_proto(unet.proto, mode="approx", tile_size=4, backend="ort", cache_dtype="float16")
    caches = engine.manifest["caches"]
    assert engine.manifest["options"]["cache_dtype"] == "float16"
    by_kind = {kind: {c["dtype"] for c in caches if c["kind"] == kind} for kind in ("activation", "static", "stats")}
    assert by_kind["static"] == {"float32"} and by_kind["stats"] == {"float32"}  # read by Add, Gather, scale/shift
    assert "float16" in by_kind["activation"]
    full_outputs = {o.name: o.type for o in engine._runners["full"].session.get_outputs()}
    inputs = {i.name: i.type for i in engine._runners["sparse"].session.get_inputs()}
    for c in caches:
        assert inputs[c["name"]] == f"tensor({c['dtype'].replace('float32', 'float')})"
        if c["dtype"] == "float16":
            assert c["origin"] != c["source"] and full_outputs[c["source"]] == "tensor(float16)"
        else:
            assert "origin" not in c


def _sparse_uses(result) -> dict[str, set[tuple[str, int]]]:
    uses: dict[str, set[tuple[str, int]]] = {}
    for node in result.sparse.graph.node:
        for index, name in enumerate(node.input):
            uses.setdefault(name, set()).add((f"{node.domain}::{node.op_type}", index))
    return uses


def test_every_use_of_a_half_cache_is_a_tile_op_base(unet):
    from sigec.frontends.onnx_frontend import load_onnx
    from sigec.passes.sparse_rewrite import rewrite

    result = rewrite(load_onnx(unet.proto), mode="approx", tile_size=4, cache_dtype="bfloat16")
    uses = _sparse_uses(result)
    half = [c for c in result.manifest["caches"] if c["dtype"] == "bfloat16"]
    assert half
    for c in half:
        assert uses[c["name"]] <= {(f"{DOMAIN}::TileGather", 0), (f"{DOMAIN}::TileScatter", 0)}, c["name"]
    model_outputs = {o.name for o in result.sparse.graph.output}
    scattered_to = {n.input[0] for n in result.sparse.graph.node if n.op_type == "TileScatter" and n.output[0] in model_outputs}
    for c in result.manifest["caches"]:
        if c["dtype"] == "float32":
            read_otherwise = any(not op.startswith(DOMAIN) or index != 0 for op, index in uses[c["name"]])
            assert read_otherwise or c["name"] in scattered_to, c["name"]  # a model output's cache stays float32
    casts = {n.output[0]: n for n in result.full.graph.node if n.op_type == "Cast" and n.output[0].endswith("::bfloat16")}
    assert {c["source"] for c in half} == set(casts)
    assert {o.name for o in result.full.graph.output} >= set(casts)
    model_outputs = {o.name for o in unet.proto.graph.output}
    doubled = {c["origin"] for c in half} & {o.name for o in result.full.graph.output}
    assert doubled <= model_outputs  # a cache's float32 source is replaced by its Cast unless the model outputs it


@pytest.mark.parametrize("backend", ["ort", "torch"])
@pytest.mark.parametrize("dtype", list(HALF))
def test_exact_engine_with_half_caches_against_onnx_runtime(zoo_model, backend, dtype):
    """Exact mode, forced sparse path: the outputs differ from ONNX Runtime on the original model only
    by the rounding of the caches (HALF_EXACT_TOLERANCE; bfloat16 keeps 3 fewer mantissa bits: 4x
    float16's bound)."""
    model = zoo_model("tiny_local")
    engine = always_sparse(engine_from_proto(model.proto, mode="exact", tile_size=4, backend=backend,
                                             cache_dtype=dtype))
    assert _dtypes(engine.manifest) == ({"float32"}, {dtype})
    edited, mask = _edit(engine, model.inputs)
    c = compare_with_oracle(engine, ort_oracle(model.proto), model.inputs, edited, mask)
    assert c.path == "sparse" and engine.stats.path == "sparse"
    tolerance = HALF_EXACT_TOLERANCE * (1 if dtype == "float16" else 4)
    assert c.sparse <= tolerance, c
    assert c.stale > 10 * tolerance, c  # not recomputing would fail
    entry = engine._store.entry("default")
    stored = {c["name"]: np.dtype(c["dtype"]) for c in engine.manifest["caches"]}
    assert all(entry.tensors[name].dtype == want for name, want in stored.items())


def test_approx_engine_error_grows_little_with_float16_caches(unet):
    oracle = ort_oracle(unet.proto)
    errors = {}
    for dtype in ("float32", "float16"):
        engine = always_sparse(engine_from_proto(unet.proto, mode="approx", tile_size=4, backend="ort",
                                                 cache_dtype=dtype))
        edited, mask = _edit(engine, unet.inputs, fraction=0.05)
        c = compare_with_oracle(engine, oracle, unet.inputs, edited, mask)
        assert c.path == "sparse", c
        errors[dtype] = c
    assert errors["float16"].sparse_l2 <= errors["float32"].sparse_l2 + HALF_APPROX_GROWTH, errors
    assert errors["float16"].sparse_l2 < errors["float16"].stale_l2, errors  # better than not recomputing


@pytest.mark.parametrize("dtype", list(HALF))
def test_update_cache_casts_float32_tiles_into_half_caches(zoo_model, dtype):
    """run(update_cache=True) writes the float32 tiles rounded to the cache dtype (cast_tiles: numpy's
    round-to-nearest-even, as the FULL graph's Cast): the caches stay half and equal, within one
    half rounding, a fresh prime on the edited inputs; the next edit on top matches ONNX Runtime."""
    model = zoo_model("tiny_local")
    engine = always_sparse(engine_from_proto(model.proto, mode="exact", tile_size=4, backend="ort",
                                             cache_dtype=dtype))
    engine.prime(model.inputs)
    edited, mask = _edit(engine, model.inputs)
    writes = []
    scatter = engine._scatter

    def spy(base, vals, coords):
        writes.append((base.dtype, vals.dtype))
        scatter(base, vals, coords)

    engine._scatter = spy
    engine.run(edited, mask=mask, update_cache=True)
    assert engine.stats.path == "sparse" and writes
    assert all(b == v for b, v in writes) and HALF[dtype][0] in {b for b, _ in writes}
    updated = {k: v.astype(np.float32) for k, v in engine._store.entry("default").tensors.items()}
    fresh = always_sparse(engine_from_proto(model.proto, mode="exact", tile_size=4, backend="ort", cache_dtype=dtype))
    fresh.prime(edited)
    eps = float(ml_dtypes.finfo(HALF[dtype][0]).eps)
    for name, array in fresh._store.entry("default").tensors.items():
        scale = np.abs(array.astype(np.float32)).max() + 1e-6
        assert np.abs(updated[name] - array.astype(np.float32)).max() <= 4 * eps * scale, name
    again, mask2 = _edit(engine, edited, fraction=0.02, seed=3)
    out = engine.run(again, mask=mask2 | mask)
    assert engine.stats.path == "sparse"
    expected = ort_oracle(model.proto)(again)
    assert max(rel_err(o, e) for o, e in zip(out, expected)) <= HALF_EXACT_TOLERANCE * (1 if dtype == "float16" else 4)


def test_cast_tiles_rounds_to_nearest_even_and_refuses_float16_overflow():
    vals = np.array([1.0, 1 + 2 ** -11, 1 + 3 * 2 ** -11, -2.0 ** -25, 65504.0, np.nan], np.float32)
    out = cast_tiles(vals, np.dtype(np.float16), "cache::x")
    assert out.dtype == np.float16 and out.flags.c_contiguous
    np.testing.assert_array_equal(out[:5], np.array([1.0, 1.0, 1 + 2 ** -9, -0.0, 65504.0], np.float16))
    assert np.isnan(out[5])  # a NaN computed by the model stays NaN, as in a float32 cache
    bf = cast_tiles(np.array([1 + 2 ** -8, 3e38], np.float32), np.dtype(ml_dtypes.bfloat16), "cache::x")
    assert bf.dtype == ml_dtypes.bfloat16 and float(bf[0]) == 1.0 and np.isfinite(bf[1].astype(np.float32))
    with pytest.raises(CacheError, match="beyond float16's range"):
        cast_tiles(np.array([1.0, 70000.0], np.float32), np.dtype(np.float16), "cache::x")
    same = np.ones((2, 2), np.float32)
    assert cast_tiles(same, np.dtype(np.float32), "cache::x") is same


def _overflowing_model() -> onnx.ModelProto:
    """Two 3x3 convolutions whose first output reaches ~1e5 (beyond float16's 65504)."""
    w1 = onnx.numpy_helper.from_array(np.full((2, 1, 3, 3), 3000.0, np.float32), "w1")
    w2 = onnx.numpy_helper.from_array(np.full((1, 2, 3, 3), 1e-4, np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 16, 16])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_float16_overflow_at_prime_and_update_is_refused_and_changes_nothing():
    proto = _overflowing_model()
    engine = always_sparse(engine_from_proto(proto, mode="exact", tile_size=4, backend="ort", cache_dtype="float16"))
    small = {"x": np.full((1, 1, 16, 16), 0.1, np.float32)}
    engine.prime(small)  # 0.1 * 3000 * 9 = 2700: fits
    before = {k: v.copy() for k, v in engine._store.entry("default").tensors.items()}
    big = {"x": small["x"].copy()}
    big["x"][..., 4:8, 4:8] = 5.0  # 5 * 3000 * 9 = 135000
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    with pytest.raises(CacheError, match="float16"):
        engine.run(big, mask=mask, update_cache=True)
    after = engine._store.entry("default").tensors
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.raises(CacheError, match="float16's range"):
        engine.prime(big, key="big")
    assert engine.cache_keys() == ["default"]
    bf16 = always_sparse(engine_from_proto(proto, mode="exact", tile_size=4, backend="ort", cache_dtype="bfloat16"))
    bf16.prime(big)  # bfloat16 has float32's range


# ---------------------------------------------------------------------------------------------- manifest, file, API


def test_engine_file_records_cache_dtypes_and_loads(zoo_model, tmp_path):
    model = zoo_model("tiny_local")
    path = sigec.compile(model.proto, tmp_path / "half.sigec", mode="exact", cache_dtype="float16")
    manifest = read_manifest(path)
    assert manifest["options"]["cache_dtype"] == "float16"
    assert _dtypes(manifest) == ({"float32"}, {"float16"})
    half = [c for c in manifest["caches"] if c["dtype"] == "float16"]
    assert half and all(c["source"] == f"{c['origin']}::float16" for c in half)
    engine = sigec.load(path, threads=1)
    engine.dense_fallback_fraction = ALWAYS_SPARSE
    engine.prime(model.inputs)
    half_bytes = engine.cache_bytes()
    full = sigec.compile(model.proto, tmp_path / "full.sigec", mode="exact")
    assert read_manifest(full)["options"]["cache_dtype"] == "float32"
    reference = sigec.load(full, threads=1)
    reference.prime(model.inputs)
    saved = sum(int(np.prod(c["shape"])) * 2 for c in half)  # 2 of the 4 bytes of every half cache value
    assert half_bytes == reference.cache_bytes() - saved
    bad = {**manifest, "options": {**manifest["options"], "cache_dtype": "float8"}}
    with pytest.raises(EngineFileError, match="cache_dtype"):
        validate_manifest(bad)


def test_cache_dtype_option_is_checked():
    with pytest.raises(CompileError, match="cache_dtype"):
        sigec.compile("unused.onnx", "unused.sigec", cache_dtype="half")
    from sigec.cli import build_parser

    args = build_parser().parse_args(["compile", "m.onnx", "-o", "m.sigec", "--cache-dtype", "bfloat16"])
    assert args.cache_dtype == "bfloat16"
    assert build_parser().parse_args(["compile", "m.onnx", "-o", "m.sigec"]).cache_dtype is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compile", "m.onnx", "-o", "m.sigec", "--cache-dtype", "float64"])


def test_defaults_by_mode_and_tensorrt_refuses_half_caches(zoo_model, tmp_path):
    from sigec.core.engine_file import read_engine
    from sigec.core.options import DEFAULT_CACHE_DTYPE
    from sigec.passes import tensorrt_build

    model = zoo_model("tiny_local")
    assert DEFAULT_CACHE_DTYPE == {"exact": "float32", "approx": "float16"}
    for mode in ("exact", "approx"):
        engine = engine_from_proto(model.proto, mode=mode, tile_size=4, backend="ort")
        assert engine.manifest["options"]["cache_dtype"] == DEFAULT_CACHE_DTYPE[mode]
        assert _dtypes(engine.manifest)[1] == {DEFAULT_CACHE_DTYPE[mode]}
    with pytest.raises(CompileError, match="TensorRT plugins read float32 caches only"):
        sigec.compile(model.proto, tmp_path / "trt.sigec", backend="tensorrt", cache_dtype="float16")
    path = sigec.compile(model.proto, tmp_path / "approx.sigec", mode="approx")
    with pytest.raises(CompileError, match="cache_dtype='float32'"):
        tensorrt_build.build_plans(read_engine(path), builder=object())  # refused before the builder is used


# ---------------------------------------------------------------------------------------------- load-time override


LOADED_TOLERANCE = 1e-6  # loaded with a dtype vs compiled with it: the same operators on the same values


@pytest.fixture(scope="module")
def unet_engines(unet, tmp_path_factory) -> dict[str, str]:
    """The small DDPM UNet compiled in approx mode with each cache dtype: dtype -> engine file."""
    folder = tmp_path_factory.mktemp("cache_dtypes")
    return {d: sigec.compile(unet.proto, folder / f"{d}.sigec", mode="approx", cache_dtype=d, progress=False)
            for d in CACHE_DTYPES}


def _full_and_sparse_types(engine) -> tuple[dict[str, str], dict[str, str]]:
    outputs = {o.name: o.type for o in engine._runners["full"].session.get_outputs()}
    return outputs, {i.name: i.type for i in engine._runners["sparse"].session.get_inputs()}


@pytest.mark.parametrize("compiled,loaded", [("float32", "float16"), ("float16", "float32"), ("float16", "bfloat16")])
def test_load_with_a_cache_dtype_gives_the_engine_compiled_with_it(unet, unet_engines, compiled, loaded):
    """The loaded engine has the manifest, graph signatures, cache arrays and outputs (within
    LOADED_TOLERANCE, relative) of the engine compiled with ``loaded``."""
    path = unet_engines[compiled]
    engine = always_sparse(sigec.load(path, threads=1, cache_dtype=loaded))
    reference = always_sparse(sigec.load(unet_engines[loaded], threads=1))
    assert read_manifest(path)["options"]["cache_dtype"] == compiled  # the file is not changed
    assert engine.manifest["options"] == reference.manifest["options"]
    assert engine.manifest["caches"] == reference.manifest["caches"]
    assert _full_and_sparse_types(engine) == _full_and_sparse_types(reference)
    edited, mask = _edit(engine, unet.inputs)
    results = []
    for e in (engine, reference):
        primed = e.prime(unet.inputs)
        results.append((primed, e.run(edited, mask=mask), e._store.entry("default").tensors))
        assert e.stats.path == "sparse"
    (primed, out, caches), (ref_primed, ref_out, ref_caches) = results
    assert {k: v.dtype for k, v in caches.items()} == {k: v.dtype for k, v in ref_caches.items()}
    assert engine.cache_bytes() == reference.cache_bytes()
    assert max(rel_err(a, b) for a, b in zip(primed + out, ref_primed + ref_out)) <= LOADED_TOLERANCE
    for name, array in caches.items():
        want = ref_caches[name].astype(np.float32)
        assert rel_err(array.astype(np.float32), want) <= LOADED_TOLERANCE, name


@pytest.mark.parametrize("dtype", list(HALF))
def test_exact_engine_loaded_with_half_caches_against_onnx_runtime(zoo_model, tmp_path, dtype):
    """An exact engine compiled with float32 caches and loaded with half ones stores half arrays (half
    the bytes of every such cache) and its sparse run stays within HALF_EXACT_TOLERANCE (bfloat16: 4x)
    of ONNX Runtime on the original model, far closer than not recomputing."""
    model = zoo_model("tiny_local")
    path = sigec.compile(model.proto, tmp_path / "exact.sigec", mode="exact", progress=False)
    assert read_manifest(path)["options"]["cache_dtype"] == "float32"
    engine = always_sparse(sigec.load(path, threads=1, cache_dtype=dtype))
    reference = always_sparse(sigec.load(path, threads=1))
    assert engine.manifest["options"]["cache_dtype"] == dtype
    assert _dtypes(engine.manifest) == ({"float32"}, {dtype})
    edited, mask = _edit(engine, model.inputs)
    c = compare_with_oracle(engine, ort_oracle(model.proto), model.inputs, edited, mask)
    tolerance = HALF_EXACT_TOLERANCE * (1 if dtype == "float16" else 4)
    assert c.path == "sparse" and c.sparse <= tolerance and c.stale > 10 * tolerance, c
    reference.prime(model.inputs)
    tensors = engine._store.entry("default").tensors
    half = [c for c in engine.manifest["caches"] if c["dtype"] == dtype]
    assert half and all(tensors[c["name"]].dtype == HALF[dtype][0] for c in half)
    saved = sum(int(np.prod(c["shape"])) * 2 for c in half)
    assert engine.cache_bytes() == reference.cache_bytes() - saved


def test_load_cache_dtype_errors(zoo_model, tmp_path):
    model = zoo_model("tiny_local")
    path = sigec.compile(model.proto, tmp_path / "e.sigec", mode="exact", progress=False)
    with pytest.raises(InputError, match="cache_dtype must be one of float32, float16, bfloat16"):
        sigec.load(path, cache_dtype="half")
    with pytest.raises(BackendError, match="TensorRT backend reads float32 caches only"):
        sigec.load(path, backend="tensorrt", cache_dtype="float16")
    assert sigec.load(path, cache_dtype="float32").manifest == sigec.load(path).manifest  # as compiled: unchanged
    from sigec.cli import build_parser

    args = build_parser().parse_args(["run", "e.sigec", "--original", "a.npy", "--edited", "b.npy",
                                      "--cache-dtype", "float16"])
    assert args.cache_dtype == "float16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "e.sigec", "--original", "a.npy", "--edited", "b.npy", "--cache-dtype", "x"])
