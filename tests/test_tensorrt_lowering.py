"""The TensorRT lowering below TensorRT itself: annotation, attribute encoding, AOT kernels, plan
orchestration, engine-file handling, and the errors without TensorRT (docs/architecture.md, TensorRT).

TensorRT is not installed on the development machine: the plugin definitions
(plugins/gpu/tensorrt_plugins.py), the real builder and the runner are exercised only by
``test_real_tensorrt_end_to_end``, which skips without ``tensorrt`` and a CUDA GPU. The kernels in
TensorRT's calling convention run here in Triton's interpreter (``TRITON_INTERPRET=1``, set before
Triton is imported, as in test_triton_ops.py) and are compiled for sm_90 in a subprocess without it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

# SIGEC_TEST_DEVICE=cuda (tools/gpu_check.sh) runs the kernel launches compiled on a GPU instead.
DEVICE = os.environ.get("SIGEC_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import run_without_interpreter  # noqa: E402
import sigec  # noqa: E402
from sigec.core.engine_file import EngineContents, read_engine, write_engine  # noqa: E402
from sigec.core.errors import BackendError, CompileError, EngineFileError  # noqa: E402
from sigec.passes import annotate_tensorrt as at  # noqa: E402
from sigec.core import reference_ops  # noqa: E402
from sigec.passes import tensorrt_build as tb  # noqa: E402
from sigec.runtime import tensorrt_runner as tr  # noqa: E402

triton_ops = pytest.importorskip("sigec.gpu.triton_ops", reason="Triton is not installed (group 'gpu')")
from sigec.gpu import tensorrt_kernels as tk  # noqa: E402

if DEVICE == "cpu" and not triton_ops.INTERPRET:
    raise RuntimeError("sigec.gpu.triton_ops was imported before TRITON_INTERPRET=1 (tests/conftest.py sets it)")


def _on_device(tensors):
    """Move the launch's tensors to the test device (the kernels run there; results compare on the CPU)."""
    return [t.to(DEVICE) for t in tensors]
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def unet_engine(tmp_path_factory):
    """The small approx-mode UNet (GroupNorm prologues, upsampling, attention island) compiled for ORT."""
    from small_unet import small_unet  # tests/ is on sys.path (conftest.py)

    model, x = small_unet()
    path = sigec.compile(model, tmp_path_factory.mktemp("trt") / "unet.sigec", inputs={"x": x}, mode="approx",
                         backend="ort", cache_dtype="float32")  # the TensorRT plugins read float32 caches only
    return path, x.numpy()


@pytest.fixture(scope="module")
def sparse_model(unet_engine):
    contents = read_engine(unet_engine[0])
    return tb.attach_weights(contents.graphs["sparse"], contents.weights)


def sigec_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == at.SIGEC_DOMAIN]


def call_of(node: onnx.NodeProto) -> tuple:
    """What a node computes: everything but proto presence bits (onnx_ir writes domain "" explicitly)."""
    return (node.name, node.domain, node.op_type, list(node.input), list(node.output),
            sorted((a.name, a.type, repr(onnx.helper.get_attribute_value(a))) for a in node.attribute))


# ---------------------------------------------------------------------------------------------- annotation


def test_every_sigec_node_of_a_compiled_sparse_graph_is_annotated(sparse_model):
    original = sigec_nodes(sparse_model)
    annotated = at.annotate(sparse_model)
    plugin_nodes = [n for n in annotated.graph.node if n.domain == at.TRT_DOMAIN]
    assert len(original) >= 20 and not sigec_nodes(annotated)
    assert len(plugin_nodes) == len(original)
    assert {n.op_type for n in plugin_nodes} >= {"TileScatter", "TileGather", "TileGather_vals",
                                                 "TileGather_vals_scale_shift"}
    for node in plugin_nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"sigec" and attrs["aot"] == 1
        assert all(node.input), f"{node.name}: absent inputs must be dropped"
    assert {o.domain: o.version for o in annotated.opset_import} == {"": 18, at.TRT_DOMAIN: 1}
    onnx.checker.check_model(annotated, full_check=True)
    # Everything else is untouched.
    others = [n for n in sparse_model.graph.node if n.domain != at.SIGEC_DOMAIN]
    assert [call_of(n) for n in others] == [call_of(n) for n in annotated.graph.node if n.domain != at.TRT_DOMAIN]
    assert [n.name for n in annotated.graph.node] == [n.name for n in sparse_model.graph.node]


def test_decoding_restores_every_node_exactly(sparse_model):
    annotated = at.annotate(sparse_model)
    decoded = at.decode(annotated)
    assert sigec_nodes(decoded) == sigec_nodes(sparse_model)  # the sigec nodes: identical protos
    assert [call_of(n) for n in decoded.graph.node] == [call_of(n) for n in sparse_model.graph.node]
    for node in annotated.graph.node:
        if node.domain == at.TRT_DOMAIN:
            assert call_of(at.encode_node(at.decode_node(node))) == call_of(node)


def test_the_decoded_sparse_graph_computes_the_same_outputs(unet_engine, tmp_path):
    """The SPARSE graph after annotate + decode, run by the reference executor, gives identical outputs."""
    from sigec.runtime.synthetic_edits import edit_inputs, square_mask

    path, x = unet_engine
    contents = read_engine(path)
    round_trip = at.decode(at.annotate(onnx.ModelProto.FromString(contents.graphs["sparse"])))
    changed = write_engine(tmp_path / "decoded.sigec", EngineContents(
        manifest=contents.manifest, graphs={**contents.graphs, "sparse": round_trip.SerializeToString()},
        weights=contents.weights))
    mask = square_mask(32, 32, 0.08)
    edited = edit_inputs({"x": x}, ["x"], mask)
    outputs = []
    for p in (path, changed):
        engine = sigec.load(p, backend="torch", dense_fallback_fraction=10.0)
        engine.prime({"x": x})
        outputs.append(engine.run(edited, mask=mask)[0])
        assert engine.stats.path == "sparse"
    assert np.array_equal(outputs[0], outputs[1])


def test_the_pass_reports_modification_once(sparse_model):
    model = ir.serde.deserialize_model(sparse_model)
    assert at.AnnotateTensorRTPass()(model).modified
    assert not at.AnnotateTensorRTPass()(model).modified
    assert at.SIGEC_DOMAIN not in model.opset_imports and model.opset_imports[at.TRT_DOMAIN] == 1


def test_code_tables_match_the_kernels():
    assert at.PAD_MODES == reference_ops.PAD_MODES and at.ACTIVATIONS == reference_ops.ACTIVATIONS
    assert {m: i for i, m in enumerate(at.PAD_MODES)} == triton_ops.PAD_MODE_CODES
    assert {a: i for i, a in enumerate(at.ACTIVATIONS)} == triton_ops.ACTIVATION_CODES
    assert len(set(at.ALL_GATHER_PLUGINS)) == 8
    assert all(at.gather_plugin_name(at.gather_plugin_groups(n)) == n for n in at.ALL_GATHER_PLUGINS)


# ---------------------------------------------------------------------------------------------- attribute encoding

FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
PAIR = st.lists(st.integers(-(2**31), 2**31 - 1), min_size=2, max_size=2)


@st.composite
def gather_calls(draw):
    groups = draw(st.sets(st.sampled_from(at.OPTIONAL_GROUPS)))
    inputs = ["base", "vals" if "vals" in groups else "", "grid" if "vals" in groups else "", "coords",
              "scale" if "scale" in groups else "", "shift" if "shift" in groups else ""]
    while inputs[-1] == "":
        inputs.pop()
    attrs = {"window": draw(PAIR), "step": draw(PAIR), "offset": draw(PAIR),
             "upsample": draw(st.integers(1, 2**31 - 1)), "pad_mode": draw(st.sampled_from(at.PAD_MODES)),
             "activation": draw(st.sampled_from(at.ACTIVATIONS)), "alpha": draw(FLOAT32), "beta": draw(FLOAT32)}
    omitted = draw(st.sets(st.sampled_from(sorted(at.GATHER_DEFAULTS))))
    return inputs, attrs, omitted, groups


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gather_calls())
def test_attribute_encoding_round_trips(call):
    inputs, attrs, omitted, groups = call
    node = onnx.helper.make_node("TileGather", inputs, ["out"], name="g", domain=at.SIGEC_DOMAIN, **attrs)
    encoded = at.encode_node(node)
    assert encoded.op_type == at.gather_plugin_name(groups) and encoded.domain == at.TRT_DOMAIN
    assert list(encoded.input) == [i for i in inputs if i]
    kinds = {a.name: a.type for a in encoded.attribute}
    assert kinds == {"plugin_namespace": onnx.AttributeProto.STRING, "aot": onnx.AttributeProto.INT,
                     "geometry": onnx.AttributeProto.INTS, "params": onnx.AttributeProto.FLOATS}
    context = onnx.checker.C.CheckerContext()
    context.ir_version, context.opset_imports = onnx.IR_VERSION, {"": 18, at.TRT_DOMAIN: 1}
    onnx.checker.check_node(encoded, context)  # well-formed attributes
    assert at.decode_node(encoded) == node  # exact: names, order, float32 values
    # Attributes left at their defaults come back written out.
    sparse = onnx.helper.make_node("TileGather", inputs, ["out"], name="g", domain=at.SIGEC_DOMAIN,
                                   **{k: v for k, v in attrs.items() if k not in omitted})
    expected = {**attrs, **{k: at.GATHER_DEFAULTS[k] for k in omitted}}
    decoded = at.decode_node(at.encode_node(sparse))
    got = {a.name: onnx.helper.get_attribute_value(a) for a in decoded.attribute}
    # Exact: float32 values survive the round trip bit for bit, lists stay lists (pytest.approx
    # cannot compare the list-valued attributes and failed on some draws).
    assert got == {k: (v.encode() if isinstance(v, str) else v) for k, v in expected.items()}


def test_scatter_encoding_and_malformed_nodes():
    scatter = onnx.helper.make_node("TileScatter", ["b", "v", "c"], ["o"], name="s", domain=at.SIGEC_DOMAIN)
    encoded = at.encode_node(scatter)
    assert encoded.op_type == "TileScatter" and list(encoded.input) == ["b", "v", "c"]
    assert at.decode_node(encoded) == scatter
    bad = [
        (onnx.helper.make_node("TileGather", ["b", "v", "", "c"], ["o"], name="n1", domain="ai.sigec",
                               window=[3, 3], step=[1, 1]), "vals and grid together"),
        (onnx.helper.make_node("TileGather", ["b", "", "", "c"], ["o"], name="n2", domain="ai.sigec",
                               window=[3, 3], step=[1, 1], pad_mode="wrap"), "pad_mode"),
        (onnx.helper.make_node("TileGather", ["b", "", "", "c"], ["o"], name="n3", domain="ai.sigec",
                               window=[3, 3]), "'step'"),
        (onnx.helper.make_node("TileGather", ["b", "", "", "c"], ["o"], name="n4", domain="ai.sigec",
                               window=[3, 3], step=[1, 1], alpha=0.1 + 1e-12), None),  # stored as float32: fine
        (onnx.helper.make_node("TileFoo", ["b"], ["o"], name="n5", domain="ai.sigec"), "no TensorRT plugin"),
    ]
    for node, message in bad:
        if message is None:
            at.encode_node(node)
            continue
        with pytest.raises(CompileError, match=message) as info:
            at.encode_node(node)
        assert node.name in str(info.value)


# ---------------------------------------------------------------------------------------------- kernels and launches


def _gather_case(seed: int, groups: set[str], dtype: torch.dtype = torch.float32, n_out: int | None = None,
                 empty_vals: bool = False):
    """Inputs of a TileGather call with the optional ``groups`` present, the plugin's input list and attrs."""
    gen = torch.Generator().manual_seed(seed)
    B, C, H, W, T = 2, 5, 13, 11, 4
    gh, gw = -(-H // T), -(-W // T)
    base = torch.randn((B, C, H, W), generator=gen)
    cells = [] if empty_vals else [(0, 0, 0), (0, 1, 2), (1, 2, 1), (1, 3, 0)]
    vals = torch.randn((len(cells), C, T, T), generator=gen)
    grid = -torch.ones((B, gh, gw), dtype=torch.int64)
    for slot, cell in enumerate(cells):
        grid[cell] = slot
    out_cells = [(0, 0, 0), (0, 0, 1), (0, 3, 2), (1, 1, 1), (1, 3, 0)][:n_out]
    coords = torch.tensor(out_cells, dtype=torch.int64).reshape(-1, 3)
    scale, shift = torch.randn((B, C), generator=gen) + 1, torch.randn((C,), generator=gen)
    attrs = {"window": [6, 7], "step": [4, 4], "offset": [-1, -2], "upsample": 1 + seed % 2,
             "pad_mode": at.PAD_MODES[seed % 3], "activation": at.ACTIVATIONS[seed % 9], "alpha": 0.3, "beta": 0.6}
    given = {"base": base.to(dtype), "vals": vals.to(dtype) if "vals" in groups else None,
             "grid": grid if "vals" in groups else None, "coords": coords,
             "scale": scale.to(dtype) if "scale" in groups else None,
             "shift": shift.to(dtype) if "shift" in groups else None}
    plugin_inputs = [t for t in given.values() if t is not None]
    return given, plugin_inputs, attrs


def _plan_for(given, attrs, dtype: str) -> tk.LaunchPlan:
    return tk.gather_launch(
        attrs, dtype=dtype, base_shape=list(given["base"].shape),
        vals_tile=None if given["vals"] is None else given["vals"].shape[2],
        grid_shape=None if given["grid"] is None else list(given["grid"].shape),
        scale_rank=None if given["scale"] is None else given["scale"].dim(),
        shift_rank=None if given["shift"] is None else given["shift"].dim())


SIGNATURES = [set(g for i, g in enumerate(at.OPTIONAL_GROUPS) if m >> i & 1) for m in range(8)]


@pytest.mark.parametrize("seed,groups", list(enumerate(SIGNATURES)), ids=at.ALL_GATHER_PLUGINS)
def test_gather_in_tensorrts_calling_convention_matches_the_reference(seed, groups):
    """Each plugin signature: the kernel launched as TensorRT launches it (inputs, int32 extras, output;
    grid from the launch plan) equals reference_ops, including N = 0 and vals with no rows."""
    for n_out, empty_vals in ((None, False), (0, False), (3, True)):
        given, inputs, attrs = _gather_case(seed, groups, n_out=n_out, empty_vals=empty_vals)
        plan = _plan_for(given, attrs, "float32")
        n = given["coords"].shape[0]
        out = torch.full((n, 5, 6, 7), float("nan"), device=DEVICE)
        tk.launch(plan, _on_device(inputs), out, n)
        expected = reference_ops.tile_gather(*given.values(), **attrs)
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_gather_fp16():
    given, inputs, attrs = _gather_case(4, {"vals", "scale", "shift"}, dtype=torch.float16)
    out = torch.empty((5, 5, 6, 7), dtype=torch.float16, device=DEVICE)
    tk.launch(_plan_for(given, attrs, "float16"), _on_device(inputs), out, 5)
    up = {k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in given.items()}
    rounded = reference_ops.tile_gather(*up.values(), **attrs).half()
    torch.testing.assert_close(out.cpu(), rounded, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_single_launch_scatter_matches_the_reference(dtype):
    """One program per output cell, tile found by binary search in the sorted coords: equals reference_ops,
    for partial border tiles, both batch items, all tiles active, and no tile active."""
    gen = torch.Generator().manual_seed(7)
    B, C, H, W, T = 2, 40, 21, 19, 8
    base = torch.randn((B, C, H, W), generator=gen).to(getattr(torch, dtype))
    all_cells = [(b, y, x) for b in range(B) for y in range(3) for x in range(3)]
    for cells in (all_cells[::3] + [all_cells[-1]], all_cells, []):
        cells = sorted(set(cells))
        coords = torch.tensor(cells, dtype=torch.int64).reshape(-1, 3)
        vals = torch.randn((len(cells), C, T, T), generator=gen).to(base.dtype)
        plan = tk.scatter_launch(dtype=dtype, base_shape=list(base.shape), tile=T)
        assert plan.resolve(len(cells))[0] == (B * 3 * 3, 2, 1)  # every cell, two channel blocks
        out = torch.full_like(base, float("nan"), device=DEVICE)
        tk.launch(plan, _on_device([base, vals, coords]), out, len(cells))
        assert torch.equal(out.cpu(), reference_ops.tile_scatter(base, vals, coords))


class _Recorder:
    """Stands in for a Triton kernel: records the launch grid, arguments and constexprs."""

    def __init__(self, arg_names):
        self.arg_names, self.calls = arg_names, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((tuple(grid), dict(zip(self.arg_names, args)), kwargs))
        return launch


@pytest.mark.parametrize("seed,groups", list(enumerate(SIGNATURES)), ids=at.ALL_GATHER_PLUGINS)
def test_launch_plan_equals_the_triton_wrappers_launch(seed, groups, monkeypatch):
    """Grid, int arguments and constexprs of the AOT launch are those triton_ops.tile_gather uses."""
    recorder = _Recorder(triton_ops._tile_gather_kernel.arg_names)
    monkeypatch.setattr(triton_ops, "_tile_gather_kernel", recorder)
    monkeypatch.setattr(triton_ops, "INTERPRET", True)  # CPU tensors
    given, _, attrs = _gather_case(seed, groups)
    triton_ops.tile_gather(*given.values(), **attrs)
    grid, args, kwargs = recorder.calls[0]
    plan = _plan_for(given, attrs, "float32")
    plan_grid, extras = plan.resolve(given["coords"].shape[0])
    assert plan_grid == grid
    named = dict(zip([name for name, _ in plan.extra_args], extras))
    assert named.pop("N") == given["coords"].shape[0]
    assert named == {k: args[k] for k in named}
    constexprs = dict(plan.constexprs)
    assert (constexprs.pop("ALPHA"), constexprs.pop("BETA")) == pytest.approx((args["alpha"], args["beta"]))
    assert constexprs == {k: kwargs[k] for k in constexprs}
    assert kwargs["num_warps"] == plan.num_warps


def test_zero_tiles_still_launch_one_program():
    given, _, attrs = _gather_case(0, set(), n_out=0)
    grid, extras = _plan_for(given, attrs, "float32").resolve(0)
    assert grid[0] == 1 and extras[0] == 0  # one program, which sees N = 0 and writes nothing


def test_ptx_parameter_stripping():
    ptx = (".visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n\t.param .u32 k_param_1,\n"
           "\t.param .u64 .ptr .global .align 1 k_param_2,\n\t.param .u64 .ptr .global .align 1 k_param_3\n)\n"
           "{\n\tld.param.b64 %rd1, [k_param_0];\n\tld.param.b32 %r1, [k_param_1];\n}\n")
    stripped = tk.strip_trailing_params(ptx, "k", keep=2)
    assert tk.ptx_params(stripped, "k") == ["k_param_0", "k_param_1"]
    assert tk.ptx_param_types(stripped, "k") == ["u64", "u32"]
    assert stripped.endswith("{\n\tld.param.b64 %rd1, [k_param_0];\n\tld.param.b32 %r1, [k_param_1];\n}\n")
    with pytest.raises(BackendError, match="k_param_1 is used"):
        tk.strip_trailing_params(ptx, "k", keep=1)
    with pytest.raises(BackendError, match="4 parameters, TensorRT passes 5"):
        tk.strip_trailing_params(ptx, "k", keep=5)


AOT_SCRIPT = """
import json
from sigec.passes.annotate_tensorrt import ALL_GATHER_PLUGINS, gather_plugin_groups
from sigec.gpu import tensorrt_kernels as tk

attrs = dict(window=[6, 6], step=[4, 4], offset=[-1, -1], upsample=2, pad_mode="reflect", activation="silu",
             alpha=0.0, beta=0.0)
report = []
for dtype in ("float32", "float16"):
    plans = [("TileScatter", tk.scatter_launch(dtype=dtype, base_shape=[2, 48, 32, 32], tile=4))]
    for name in ALL_GATHER_PLUGINS:
        g = gather_plugin_groups(name)
        plans.append((name, tk.gather_launch(
            attrs, dtype=dtype, base_shape=[1, 16, 32, 32], vals_tile=4 if "vals" in g else None,
            grid_shape=[1, 8, 8] if "vals" in g else None, scale_rank=2 if "scale" in g else None,
            shift_rank=1 if "shift" in g else None)))
    for name, plan in plans:
        k = tk.compile_plugin_kernel(plan, 90)
        report.append(dict(name=name, dtype=dtype, kernel=k.name, block_x=k.block_x, shared=k.shared_mem,
                           target=".target sm_90" in k.ptx, types=tk.ptx_param_types(k.ptx, k.name),
                           pointers=[t for _, t in plan.pointers], extras=len(plan.extra_args)))
print(json.dumps(report))
"""


def test_aot_ptx_for_sm90_in_tensorrts_abi():
    """Every plugin signature, fp32 and fp16, compiled to PTX for an H100 without a GPU: the entry
    takes exactly the input pointers, the int32 extras and the output pointer (Triton's scratch
    parameters removed)."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend: no PTX here")
    result = run_without_interpreter(AOT_SCRIPT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report) == 18
    assert {(r["name"], r["dtype"]) for r in report} == {
        (n, d) for n in (*at.ALL_GATHER_PLUGINS, "TileScatter") for d in ("float32", "float16")}
    for r in report:
        n_in = len(r["pointers"]) - 1
        assert r["target"] and r["block_x"] == 128, r
        assert r["types"] == ["u64"] * n_in + ["u32"] * r["extras"] + ["u64"], r
        assert r["pointers"][0] == ("*fp16" if r["dtype"] == "float16" else "*fp32")


# ---------------------------------------------------------------------------------------------- plan orchestration


class FakeBuilder:
    """Records what would be built; returns recognisable bytes instead of plans."""

    def __init__(self, fail_on: tuple[str, str] | None = None):
        self.requests, self.fail_on = [], fail_on

    def environment(self):
        return {"tensorrt_version": "10.9.0.34", "device": {"name": "NVIDIA H100", "compute_capability": [9, 0]}}

    def build(self, model, *, graph, precision, profiles):
        if (graph, precision) == self.fail_on:
            raise CompileError(f"fake failure on {graph} {precision}")
        domains = {n.domain for n in model.graph.node}
        assert at.SIGEC_DOMAIN not in domains  # the SPARSE graph arrives annotated
        onnx.checker.check_model(model, full_check=True)  # weights attached
        self.requests.append((graph, precision, [p.as_json() for p in profiles], at.TRT_DOMAIN in domains))
        return f"plan:{graph}:{precision}".encode()


def test_build_requests_plans_and_profiles(unet_engine):
    contents = read_engine(unet_engine[0])
    builder = FakeBuilder()
    blobs, section = tb.build_plans(contents, builder=builder)
    assert [(g, p) for g, p, _, _ in builder.requests] == [(g, p) for g in ("full", "sparse", "dense")
                                                           for p in ("fp32", "fp16")]
    assert [annotated for g, *_, annotated in builder.requests] == [g == "sparse" for g, *_ in builder.requests]
    sparse_profiles = builder.requests[2][2]
    totals = {"r32x32": 64, "r16x16": 16, "r8x8": 4}  # 1 x (32/4)^2, (16/4)^2, (8/4)^2 tiles
    assert sparse_profiles == [{"input": f"tiles::coords::{r}", "min": [0, 3], "opt": [math.ceil(n / 10), 3],
                                "max": [n, 3]} for r, n in totals.items()]
    assert builder.requests[0][2] == [] and builder.requests[4][2] == []  # FULL and DENSE are static
    assert blobs == {f"tensorrt/{g}_{p}.plan": f"plan:{g}:{p}".encode() for g in ("full", "sparse", "dense")
                     for p in ("fp32", "fp16")}
    assert section["precisions"] == ["fp32", "fp16"] and section["tensorrt_version"] == "10.9.0.34"
    assert section["device"] == {"name": "NVIDIA H100", "compute_capability": [9, 0]}
    assert [p["blob"] for p in section["plans"]] == list(blobs)
    with pytest.raises(CompileError, match="precisions"):
        tb.build_plans(contents, builder=builder, precisions=["int8"])


def test_build_engine_file_round_trip_and_atomicity(unet_engine, tmp_path):
    path = unet_engine[0]
    out = tb.build_engine_file(path, tmp_path / "with_plans.sigec", precisions=["fp16"], builder=FakeBuilder())
    contents = read_engine(out)
    assert set(contents.blobs) == {"tensorrt/full_fp16.plan", "tensorrt/sparse_fp16.plan", "tensorrt/dense_fp16.plan"}
    assert contents.blobs["tensorrt/sparse_fp16.plan"] == b"plan:sparse:fp16"
    assert contents.manifest["tensorrt"]["precisions"] == ["fp16"]
    assert contents.manifest["backend"] == "ort"  # the file still loads with ORT by default
    # Rebuilding replaces the old plans; a failing build leaves the file untouched.
    tb.build_engine_file(out, precisions=["fp32"], builder=FakeBuilder())
    assert set(read_engine(out).blobs) == {"tensorrt/full_fp32.plan", "tensorrt/sparse_fp32.plan",
                                           "tensorrt/dense_fp32.plan"}
    before = out.read_bytes()
    with pytest.raises(CompileError, match="fake failure"):
        tb.build_engine_file(out, precisions=["fp32", "fp16"], builder=FakeBuilder(fail_on=("sparse", "fp16")))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["with_plans.sigec"]


def test_manifest_section_is_validated(unet_engine, tmp_path):
    contents = read_engine(unet_engine[0])
    blobs, section = tb.build_plans(contents, builder=FakeBuilder(), precisions=["fp32"])
    bad = {**section, "plans": [{**section["plans"][0], "blob": "tensorrt/../x.plan"}]}
    with pytest.raises(EngineFileError, match=r"tensorrt\.plans\[0\]\.blob"):
        write_engine(tmp_path / "bad.sigec", tb.with_plans(contents, blobs, bad))
    bad = {**section, "device": {"name": "x", "compute_capability": [9]}}
    with pytest.raises(EngineFileError, match="compute_capability"):
        write_engine(tmp_path / "bad.sigec", tb.with_plans(contents, blobs, bad))


def test_only_tile_counts_may_be_dynamic(sparse_model):
    model = onnx.ModelProto.FromString(sparse_model.SerializeToString())
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(CompileError, match="only the tile coordinates"):
        tb.tile_profiles(model, {"resolutions": [], "batch": 1})


# ---------------------------------------------------------------------------------------------- errors without TensorRT

no_tensorrt = pytest.mark.skipif(not tb.missing_requirements(), reason="TensorRT and a GPU are present here")


@no_tensorrt
def test_compile_for_tensorrt_without_it_says_what_is_missing(tmp_path, capsys):
    from sigec.cli import main

    with pytest.raises(CompileError) as info:
        sigec.compile("sigec.apps.zoo.cli_factories:tiny_local", tmp_path / "x.sigec", backend="tensorrt")
    message = str(info.value)
    for problem in tb.missing_requirements():
        assert problem in message
    assert "--backend ort" in message and "sigec build-trt" in message
    assert not (tmp_path / "x.sigec").exists()
    assert main(["compile", "sigec.apps.zoo.cli_factories:tiny_local", "-o", str(tmp_path / "y.sigec"),
                 "--backend", "tensorrt", "-q"]) == 2
    assert "sigec build-trt" in capsys.readouterr().err


@no_tensorrt
def test_load_with_tensorrt_without_it_is_a_backend_error(unet_engine, tmp_path):
    with pytest.raises(BackendError, match="TensorRT backend cannot run here"):
        sigec.load(unet_engine[0], backend="tensorrt")
    out = tb.build_engine_file(unet_engine[0], tmp_path / "p.sigec", builder=FakeBuilder())
    with pytest.raises(BackendError, match="tensorrt"):
        sigec.load(out, backend="tensorrt")


@no_tensorrt
def test_build_trt_cli_without_tensorrt(unet_engine, capsys):
    from sigec.cli import main

    before = unet_engine[0].read_bytes()
    assert main(["build-trt", str(unet_engine[0]), "--precision", "fp16"]) == 2
    assert "TensorRT >= 10.9" in capsys.readouterr().err
    assert unet_engine[0].read_bytes() == before


def test_plan_selection_and_environment_checks():
    section = {"tensorrt_version": "10.9.0.34", "device": {"name": "NVIDIA H100", "compute_capability": [9, 0]},
               "precisions": ["fp16"], "plans": [{"graph": "full"}]}
    blobs = {tb.blob_name(g, "fp16"): b"x" for g in ("full", "sparse")}
    assert tr.select_plans({"tensorrt": section}, blobs, ["full", "sparse"], None) == {"full": b"x", "sparse": b"x"}
    with pytest.raises(BackendError, match="not 'fp32'"):
        tr.select_plans({"tensorrt": section}, blobs, ["full"], "fp32")
    with pytest.raises(BackendError, match="dense_fp16.plan"):
        tr.select_plans({"tensorrt": section}, blobs, ["dense"], None)
    with pytest.raises(BackendError, match="no TensorRT plans"):
        tr.select_plans({}, blobs, ["full"], None)
    tr.check_environment(section, "10.9.0.34", (9, 0), "NVIDIA H100 PCIe")
    with pytest.raises(BackendError, match="TensorRT 10.9.0.34, this is 10.13.0"):
        tr.check_environment(section, "10.13.0", (9, 0), "NVIDIA H100")
    with pytest.raises(BackendError, match=r"built for NVIDIA H100 \(compute capability 9.0\).*8.9"):
        tr.check_environment(section, "10.9.0.34", (8, 9), "NVIDIA L4")


# ---------------------------------------------------------------------------------------------- real TensorRT


def test_real_tensorrt_end_to_end(unet_engine, tmp_path):
    """Build fp32 and fp16 plans for the small UNet, run them, compare with ONNX Runtime
    (fp32: 1e-4 relative max error; fp16: 1e-2 relative L2), and deserialize a plan in a Python
    process that never imports sigec (the AOT kernels are inside the plan)."""
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs tensorrt >= 10.9 and a GPU)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from sigec.runtime.synthetic_edits import edit_inputs, square_mask

    path, x = unet_engine
    out = tb.build_engine_file(path, tmp_path / "trt.sigec")
    mask = square_mask(32, 32, 0.08)
    edited = edit_inputs({"x": x}, ["x"], mask)

    def run(**load):
        engine = sigec.load(out, dense_fallback_fraction=10.0, **load)
        engine.prime({"x": x})
        result = engine.run(edited, mask=mask)[0]
        assert engine.stats.path == "sparse"
        return result

    reference = run(backend="ort")
    fp32 = run(backend="tensorrt", precision="fp32")
    assert np.abs(fp32 - reference).max() <= 1e-4 * np.abs(reference).max()
    fp16 = run(backend="tensorrt", precision="fp16")
    assert np.linalg.norm(fp16 - reference) <= 1e-2 * np.linalg.norm(reference)
    plan = tmp_path / "sparse.plan"
    plan.write_bytes(read_engine(out).blobs["tensorrt/sparse_fp32.plan"])
    script = ("import sys, tensorrt as trt; r = trt.Runtime(trt.Logger()); "
              f"e = r.deserialize_cuda_engine(open({str(plan)!r}, 'rb').read()); "
              "assert e is not None and 'sigec' not in sys.modules; print(trt.__version__)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and trt.__version__ in done.stdout, done.stderr[-2000:]


FAKE_TENSORRT_SCRIPT = """
import inspect, json, sys, types

# A stand-in for the tensorrt.plugin API as documented (register / autotune / aot_impl / impl decorators,
# TensorDesc.shape_expr, ShapeExpr.is_constant / constant_value, KernelLaunchParams, SymInt32, SymIntExprs,
# AutoTuneCombination, from_shape_expr, max). It checks this module's use of the API, not TensorRT.
class Expr:
    def __init__(self, value=None, name=None):
        self.value, self.name = value, name
    is_constant = property(lambda self: self.value is not None)
    def constant_value(self):
        assert self.value is not None, "not a constant"
        return self.value
    def __repr__(self):
        return str(self.value) if self.value is not None else self.name

class Desc:
    def __init__(self, *dims, dtype="f32"):
        self.shape_expr, self.dtype = [d if isinstance(d, Expr) else Expr(d) for d in dims], dtype
    def like(self):
        return ("like", [repr(d) for d in self.shape_expr], self.dtype)

trt = types.ModuleType("tensorrt")
trt.float32, trt.float16 = "f32", "f16"
trtp = types.ModuleType("tensorrt.plugin")
defs = {}
def decorator(kind):
    def make(plugin_id):
        def record(fn):
            defs[(kind, plugin_id)] = fn
            return fn
        return record
    return make
for kind in ("register", "autotune", "aot_impl", "impl"):
    setattr(trtp, kind, decorator(kind))
trtp.TensorDesc, trtp.Tensor, trtp.SymExprs = Desc, object, object
class KernelLaunchParams:
    grid_x = grid_y = grid_z = block_x = shared_mem = None
trtp.KernelLaunchParams = KernelLaunchParams
trtp.SymInt32 = lambda v: repr(v) if isinstance(v, Expr) else int(v)
trtp.SymIntExprs = types.SimpleNamespace(from_tuple=lambda values: list(values))
trtp.AutoTuneCombination = lambda io_types: io_types
trtp.from_shape_expr = lambda dims, dtype: ("desc", [repr(d) if isinstance(d, Expr) else d for d in dims], dtype)
trtp.max = lambda a, b: f"max({a!r}, {b})"
trt.plugin = trtp
sys.modules["tensorrt"], sys.modules["tensorrt.plugin"] = trt, trtp

import numpy as np
from sigec.gpu import tensorrt_plugins as plugins
plugins._capability = lambda: 90

report = {"plugins": sorted(pid for kind, pid in defs if kind == "register")}
name = "sigec::TileGather_vals_scale_shift"
params = {k: list(inspect.signature(defs[(k, name)]).parameters) for k in ("register", "aot_impl", "impl")}
report["params"] = params
N = Expr(name="N")
base, vals, grid, coords = Desc(1, 16, 32, 32), Desc(Expr(name="Ni"), 16, 4, 4), Desc(1, 8, 8), Desc(N, 3)
scale, shift = Desc(1, 16), Desc(16)
geometry, p = np.array([6, 6, 4, 4, -1, -1, 1, 2, 5], np.int32), np.array([0.0, 0.0], np.float32)
report["desc"] = defs[("register", name)](base, vals, grid, coords, scale, shift, geometry, p)
report["tune"] = defs[("autotune", name)](base, vals, grid, coords, scale, shift, geometry, p, ())
kname, ptx, launch, extra = defs[("aot_impl", name)](base, vals, grid, coords, scale, shift, geometry, p, (), 0)
report["aot"] = dict(name=kname.decode(), sm90=b".target sm_90" in ptx, grid=[launch.grid_x, launch.grid_y,
                     launch.grid_z], block=launch.block_x, extra=extra)
s = "sigec::TileScatter"
report["scatter_desc"] = defs[("register", s)](base, Desc(N, 16, 4, 4), coords)
kname, ptx, launch, extra = defs[("aot_impl", s)](base, Desc(N, 16, 4, 4), coords, (), 0)
report["scatter_aot"] = dict(name=kname.decode(), grid=[launch.grid_x, launch.grid_y, launch.grid_z], extra=extra)
print(json.dumps(report))
"""


def test_plugin_definitions_against_a_stand_in_api():
    """The thin TensorRT layer run against a stand-in of the documented ``tensorrt.plugin`` API:
    which plugins are registered, their parameter lists, output descriptors, type combinations and
    what the AOT implementations return. (Checks this code's use of the API as documented; the real
    API is only exercised by test_real_tensorrt_end_to_end.)"""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend: no PTX here")
    result = run_without_interpreter(FAKE_TENSORRT_SCRIPT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["plugins"] == sorted(f"sigec::{n}" for n in (*at.ALL_GATHER_PLUGINS, "TileScatter"))
    tensors = ["base", "vals", "grid", "coords", "scale", "shift"]
    assert report["params"] == {"register": tensors + ["geometry", "params"],
                                "aot_impl": tensors + ["geometry", "params", "outputs", "tactic"],
                                "impl": tensors + ["geometry", "params", "outputs", "stream"]}
    assert report["desc"] == ["desc", ["N", "16", 6, 6], "f32"]
    assert report["tune"] == ["FP32|FP16,FP32|FP16,INT64|INT64,INT64|INT64,FP32|FP16,FP32|FP16,FP32|FP16"]
    aot = report["aot"]
    assert aot["name"] == "trt_tile_gather_kernel" and aot["sm90"] and aot["block"] == 128
    assert aot["grid"] == ["max(N, 1)", 1, 1]  # 16 channels x 36 positions fit one program
    # N, C, H, W, PLANE, GH, GW, VT, window, step, offset, upsample, reflect periods of the 32 x 32 map
    assert aot["extra"] == ["N", 16, 32, 32, 1024, 8, 8, 4, 6, 6, 4, 4, -1, -1, 1, 62, 62]
    assert report["scatter_desc"] == ["like", ["1", "16", "32", "32"], "f32"]
    assert report["scatter_aot"] == {"name": "trt_tile_scatter_kernel", "grid": [64, 1, 1],
                                     "extra": ["N", 16, 32, 32, 1024, 8, 8, 4]}
