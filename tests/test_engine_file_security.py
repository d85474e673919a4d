"""Crafted engine files: a real compiled engine, mutated and repacked with recomputed checksums (an
attacker can recompute them; they are no signature), must be refused at load with an
EngineFileError naming the offender, and must never copy a local file into an output."""

from __future__ import annotations

import pathlib
import shutil
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sigec
from sigec import BackendError, EngineFileError
from sigec.core import engine_file, manifest_schema
from sigec.core.engine_file import read_engine, read_manifest
from test_engine_file import _expect_error, _repack, _set

SECRET_NAME = "secret.bin"
SECRET = b"sigec-secret:" + bytes(range(256)) * 4  # distinctive bytes, unlikely in any output
FULL = "graphs/full.onnx"
SPARSE = "graphs/sparse.onnx"
SIZE = 12


def _net() -> onnx.ModelProto:
    """x [1, 2, 12, 12] -> 3x3 conv -> Relu -> 3x3 conv -> y [1, 3, 12, 12]."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (4, 2, 3, 3)), ("w2", (3, 4, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, SIZE, SIZE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
                              initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return sigec.compile(_net(), tmp_path_factory.mktemp("compiled") / "net.sigec", mode="exact")


@pytest.fixture
def engine_path(compiled: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    """A fresh copy of the compiled engine, in a folder that also holds a secret file."""
    (tmp_path / SECRET_NAME).write_bytes(SECRET)
    return pathlib.Path(shutil.copy(compiled, tmp_path / "engine.sigec"))


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 2, SIZE, SIZE)).astype(np.float32)


# --------------------------------------------------------------------------------------------- crafting


def _external(name: str, location: str = SECRET_NAME, length: int = len(SECRET)) -> onnx.TensorProto:
    """A uint8 tensor whose bytes ONNX Runtime would read from ``location``."""
    tensor = TensorProto(name=name, data_type=TensorProto.UINT8, dims=[length], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _leak_constant(name: str, output: str) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], name=name, value=_external(f"{name}_value"))


def _zeros_constant(name: str, output: str) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], name=name,
                            value=numpy_helper.from_array(np.zeros(len(SECRET), np.uint8), f"{name}_value"))


def _true(output: str) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], name=output, value=numpy_helper.from_array(np.array(True)))


def _branch(name: str, node: onnx.NodeProto, *sparse: onnx.SparseTensorProto) -> onnx.GraphProto:
    """A subgraph of one node whose output is the branch's output."""
    output = helper.make_tensor_value_info(node.output[0], TensorProto.UINT8, [len(SECRET)])
    return helper.make_graph([node], name, [], [output], sparse_initializer=list(sparse))


def _if(name: str, condition: str, output: str, then_branch: onnx.GraphProto) -> onnx.NodeProto:
    """``output = If(condition, then_branch, else: zeros)``."""
    else_branch = _branch("else", _zeros_constant(f"{name}_zeros", f"{name}_else_out"))
    return helper.make_node("If", [condition], [output], name=name, then_branch=then_branch, else_branch=else_branch)


def _sparse_external(name: str) -> onnx.SparseTensorProto:
    indices = numpy_helper.from_array(np.arange(len(SECRET), dtype=np.int64), f"{name}_indices")
    return onnx.SparseTensorProto(values=_external(name), indices=indices, dims=[len(SECRET)])


def _add_leak_output(model: onnx.ModelProto, *nodes: onnx.NodeProto) -> None:
    """Append ``nodes`` (the last one computes ``leak``) and make ``leak`` a graph output."""
    model.graph.node.extend(nodes)
    model.graph.output.append(helper.make_tensor_value_info("leak", TensorProto.UINT8, [len(SECRET)]))


def _declare_leak_output(manifest: dict[str, Any]) -> None:
    manifest["outputs"].append({"name": "leak", "shape": [len(SECRET)], "dtype": "uint8"})


def _craft(path: pathlib.Path, member: str, change: Callable[[onnx.ModelProto], None]) -> pathlib.Path:
    """Rewrite one graph of the engine at ``path``, declare a ``leak`` output in the manifest and
    recompute the checksums, so that only validation can refuse the file."""
    with zipfile.ZipFile(path) as archive:
        model = onnx.ModelProto.FromString(archive.read(member))
    change(model)
    return _repack(path, replace={member: model.SerializeToString()}, edit_manifest=_declare_leak_output)


def _constant_leak(model: onnx.ModelProto) -> None:
    _add_leak_output(model, _leak_constant("leak_const", "leak"))


def _if_leak(model: onnx.ModelProto) -> None:
    then_branch = _branch("then", _leak_constant("leak_then", "then_out"))
    _add_leak_output(model, _true("cond"), _if("leak_if", "cond", "leak", then_branch))


def _nested_if_leak(model: onnx.ModelProto) -> None:
    inner = _if("inner_if", "cond", "inner_out", _branch("then", _leak_constant("leak_then", "then_out")))
    _add_leak_output(model, _true("cond"), _if("outer_if", "cond", "leak", _branch("then", inner)))


def _tensors_attribute(model: onnx.ModelProto) -> None:
    node = model.graph.node[0]
    node.name = "tagged"
    node.attribute.append(helper.make_attribute("extra", [_external("in_list")]))


def _sparse_value_constant(model: onnx.ModelProto) -> None:
    _add_leak_output(model, helper.make_node("Constant", [], ["leak"], name="leak_sparse",
                                             sparse_value=_sparse_external("sparse_vals")))


def _sparse_initializer(model: onnx.ModelProto) -> None:
    model.graph.sparse_initializer.append(_sparse_external("sparse_init"))


def _sparse_initializer_in_branch(model: onnx.ModelProto) -> None:
    then_branch = _branch("then", _zeros_constant("then_zeros", "then_out"), _sparse_external("branch_sparse"))
    _add_leak_output(model, _true("cond"), _if("leak_if", "cond", "leak", then_branch))


def _external_flag_only(model: onnx.ModelProto) -> None:
    tensor = TensorProto(name="flagged", data_type=TensorProto.UINT8, dims=[1], data_location=TensorProto.EXTERNAL)
    _add_leak_output(model, helper.make_node("Constant", [], ["leak"], name="leak_flag", value=tensor))


def _unknown_domain(model: onnx.ModelProto) -> None:
    _add_leak_output(model, helper.make_node("ReadFile", ["x"], ["leak"], name="reader", domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))


def _unknown_domain_in_branch(model: onnx.ModelProto) -> None:
    reader = helper.make_node("ReadFile", [], ["then_out"], name="reader", domain="com.example")
    _add_leak_output(model, _true("cond"), _if("leak_if", "cond", "leak", _branch("then", reader)))


def _local_function(model: onnx.ModelProto) -> None:
    twice = helper.make_function("local.fn", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                                 [helper.make_opsetid("", 18)])
    model.functions.append(twice)


def _training_info(model: onnx.ModelProto) -> None:
    model.training_info.add().initialization.CopyFrom(helper.make_graph([], "init", [], []))


# (what is changed, graph member, the change, fragments the error must contain)
GRAPH_CRAFTS = [
    ("constant", FULL, _constant_leak,
     ["node 'leak_const' (Constant) attribute 'value'", "tensor 'leak_const_value' keeps its data in an external "
      "file (location 'secret.bin')"]),
    ("if-branch", FULL, _if_leak,
     ["node 'leak_if' (If) attribute 'then_branch': node 'leak_then' (Constant) attribute 'value'",
      "location 'secret.bin'"]),
    ("nested-if", FULL, _nested_if_leak,
     ["node 'outer_if' (If) attribute 'then_branch': node 'inner_if' (If) attribute 'then_branch': "
      "node 'leak_then' (Constant)", "location 'secret.bin'"]),
    ("tensors-attribute", SPARSE, _tensors_attribute,
     ["node 'tagged' (", "attribute 'extra': tensor 'in_list' keeps its data in an external file"]),
    ("sparse-value", FULL, _sparse_value_constant,
     ["node 'leak_sparse' (Constant) attribute 'sparse_value': sparse tensor 'sparse_vals' values: tensor "
      "'sparse_vals' keeps its data in an external file"]),
    ("sparse-initializer", FULL, _sparse_initializer,
     ["sparse initializer 'sparse_init' values: tensor 'sparse_init' keeps its data in an external file"]),
    ("sparse-initializer-in-branch", FULL, _sparse_initializer_in_branch,
     ["node 'leak_if' (If) attribute 'then_branch': sparse initializer 'branch_sparse' values: tensor "
      "'branch_sparse' keeps its data in an external file",
      "location 'secret.bin'"]),
    ("external-flag-only", FULL, _external_flag_only,
     ["node 'leak_flag' (Constant) attribute 'value': tensor 'flagged' keeps its data in an external file "
      "(location not given)"]),
    ("unknown-domain", FULL, _unknown_domain, ["node 'reader' (ReadFile) has domain 'com.example'; allowed:"]),
    ("unknown-domain-in-branch", SPARSE, _unknown_domain_in_branch,
     ["node 'leak_if' (If) attribute 'then_branch': node 'reader' (ReadFile) has domain 'com.example'"]),
    ("local-function", FULL, _local_function, ["holds 1 model-local function(s) ('local.fn:Twice')"]),
    ("training-info", FULL, _training_info, ["holds training information"]),
]


def _assert_refused(path: pathlib.Path, *fragments: str) -> None:
    """Refused by read_engine and by sigec.load, naming the offender, without the secret in the message."""
    message = _expect_error(path, *fragments)
    with pytest.raises(EngineFileError) as caught:
        sigec.load(path, threads=1)
    assert str(caught.value) == message
    assert SECRET[:16].decode("latin-1") not in message


# --------------------------------------------------------------------------------------------- tests


def test_the_legitimate_engine_loads_and_runs(engine_path: pathlib.Path) -> None:
    engine = sigec.load(engine_path, threads=1)
    original, edited = _x(0), _x(0)
    edited[:, :, 2:5, 3:6] += 1.0
    engine.prime({"x": original})
    mask = np.zeros((SIZE, SIZE), bool)
    mask[2:5, 3:6] = True
    (sparse,) = engine.run({"x": edited}, mask=mask)
    assert engine.stats.path == "sparse"
    (dense,) = engine.run_dense({"x": edited})
    np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-5 * float(np.abs(dense).max()))
    assert read_manifest(engine_path) == read_engine(engine_path).manifest


@pytest.mark.parametrize(("member", "change", "fragments"), [craft[1:] for craft in GRAPH_CRAFTS],
                         ids=[craft[0] for craft in GRAPH_CRAFTS])
def test_crafted_graph_is_refused(engine_path: pathlib.Path, member: str, change: Callable[[onnx.ModelProto], None],
                                  fragments: list[str]) -> None:
    _craft(engine_path, member, change)
    _assert_refused(engine_path, f"member '{member}': graph '{pathlib.Path(member).stem}' ", *fragments)


def test_writing_a_crafted_graph_is_refused(engine_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    contents = read_engine(engine_path, mmap=False)
    model = onnx.ModelProto.FromString(contents.graphs["full"])
    _constant_leak(model)
    contents.graphs["full"] = model.SerializeToString()
    with pytest.raises(EngineFileError, match="cannot write engine file .*'leak_const' \\(Constant\\)"):
        engine_file.write_engine(tmp_path / "out.sigec", contents)


@pytest.mark.parametrize("change", [_constant_leak, _if_leak], ids=["constant", "if-branch"])
def test_the_leak_is_closed(engine_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                            change: Callable[[onnx.ModelProto], None]) -> None:
    """The crafted file does leak when the graph checks are skipped; with them, it is refused."""
    monkeypatch.chdir(engine_path.parent)  # ONNX Runtime resolves the relative location from here
    _craft(engine_path, FULL, change)
    with monkeypatch.context() as patch:
        patch.setattr(engine_file, "model_problem", lambda model: None)
        try:
            outputs = sigec.load(engine_path, threads=1).prime({"x": _x(0)})
        except BackendError as exc:
            pytest.fail(f"the crafted engine no longer leaks without the checks ({exc}): rebuild this attack")
        assert bytes(outputs[-1]) == SECRET  # the attack is real
    with pytest.raises(EngineFileError) as caught:
        sigec.load(engine_path, threads=1)
    assert "keeps its data in an external file" in str(caught.value)
    assert SECRET[:16].decode("latin-1") not in str(caught.value)


def _edits(*edits: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        for one in edits:
            one(manifest)

    return edit


# (edit of the stored manifest, fragment of the error: the field path and what is wrong)
MANIFEST_CRAFTS = [
    pytest.param(_set(("mask_program", "dilation"), 10**7),
                 "field 'mask_program.dilation' must be at most 65536, got 10000000", id="dilation-1e7"),
    pytest.param(_set(("mask_program", "dilation"), 60_000),
                 "field 'mask_program.dilation' brings one run of the mask program to", id="dilation-over-budget"),
    pytest.param(_set(("resolutions", 0, "tile"), 10**9),
                 "field 'resolutions[0].tile' must be at most 1024, got 1000000000", id="giant-tile"),
    pytest.param(_set(("inputs", 0, "shape", 2), 10**12),
                 "field 'inputs[0].shape[2]' must be at most 2147483647", id="giant-shape"),
    pytest.param(_set(("caches", 0, "shape"), [1, 2**20, 2**20, 2**20]),
                 "field 'caches[0].shape' [1, 1048576, 1048576, 1048576] of float32 is", id="giant-cache"),
    pytest.param(_edits(_set(("caches", 0, "shape"), [1, 2**24, SIZE, SIZE]), _set(("resolutions", 0, "tile"), 1024)),
                 "field 'updates[0]' cache 'cache::c1' in whole tiles of 1024 is", id="giant-cache-tiles"),
    pytest.param(_set(("outputs", 0, "dtype"), "V2147483647"), "field 'outputs[0].dtype' must be one of",
                 id="giant-dtype"),
    pytest.param(_set(("resolutions", 0, "size"), [10**7, 10**7]),
                 "field 'resolutions[0].size[0]' must be at most 65536", id="giant-resolution"),
    pytest.param(_set(("mask_program", "input_size"), [65536, 65536]),
                 "field 'inputs[0].shape' is [1, 2, 12, 12]; a spatial input must be [batch 1, C, 65536, 65536]",
                 id="input-size-mismatch"),
    pytest.param(_set(("batch",), 10**6), "field 'batch' must be at most 4096", id="giant-batch"),
    pytest.param(_set(("mask_program", "threshold"), -1.0), "field 'mask_program.threshold' must be at least 0",
                 id="negative-threshold"),
    pytest.param(_set(("nodes", 0, "dense_macs"), 2**70), "field 'nodes[0].dense_macs' must be at most",
                 id="giant-macs"),
    pytest.param(_set(("options", "dense_fallback_fraction"), 1e300),
                 "field 'options.dense_fallback_fraction' must be at most 1000.0", id="giant-fraction"),
    pytest.param(_set(("mask_program", "instructions"), [{"op": "upsample", "out": "m", "src": "input",
                                                          "factor": [65536, 65536], "size": [12, 12]}]),
                 "field 'mask_program.instructions[0]' brings one run of the mask program to", id="giant-upsample"),
    pytest.param(_set(("mask_program", "instructions"), [{"op": "window", "out": "m", "src": "input",
                                                          "kernel": [1, 1], "stride": [65536, 65536],
                                                          "pads": [0, 0, 0, 0], "size": [12, 12]}]),
                 "field 'mask_program.instructions[0]' brings one run of the mask program to", id="giant-stride"),
    pytest.param(_set(("mask_program", "instructions"), [{"op": "transpose_window", "out": "m", "src": "input",
                                                          "kernel": [65536, 65536], "stride": [1, 1],
                                                          "pads": [0, 0, 0, 0], "size": [12, 12]}]),
                 "field 'mask_program.instructions[0]' brings one run of the mask program to",
                 id="giant-transpose-kernel"),
    pytest.param(_set(("mask_program", "instructions"), [{"op": "dilate", "out": "m", "src": "nowhere",
                                                          "radius": 1}]),
                 "field 'mask_program.instructions[0]' reads mask 'nowhere', which no earlier instruction defines",
                 id="undefined-mask"),
    pytest.param(_set(("mask_program", "instructions"), [{"op": "dilate", "out": "m", "src": "input"}]),
                 "field 'mask_program.instructions[0].radius' is missing", id="missing-radius"),
    pytest.param(_set(("mask_program", "instructions"), [{"op": "spin", "out": "m"}]),
                 "field 'mask_program.instructions[0].op' must be one of", id="unknown-instruction"),
    pytest.param(_edits(_set(("mask_program", "instructions"), [{"op": "empty", "out": "m0", "size": [6, 6]}]),
                        _set(("resolutions", 0, "mask"), "m0")),
                 "field 'resolutions[0].mask' names a [6, 6] mask for a [12, 12] resolution",
                 id="resolution-mask-size"),
    pytest.param(_set(("mask_program", "instructions"), [{"op": "empty", "out": "m0", "size": [6, 6]},
                                                         {"op": "union", "out": "m1", "srcs": ["input", "m0"]}]),
                 "field 'mask_program.instructions[1].srcs' unites masks of different sizes [[12, 12], [6, 6]]",
                 id="union-sizes"),
]


@pytest.mark.parametrize(("edit", "fragment"), MANIFEST_CRAFTS)
def test_crafted_manifest_numbers_are_refused(engine_path: pathlib.Path, edit: Callable[[dict[str, Any]], None],
                                              fragment: str) -> None:
    _repack(engine_path, edit_manifest=edit)
    _assert_refused(engine_path, "manifest.json " + fragment)
    with pytest.raises(EngineFileError, match="manifest.json field"):
        read_manifest(engine_path)


def test_the_compiled_engine_is_far_within_the_mask_budget(compiled: pathlib.Path) -> None:
    cells = manifest_schema.mask_program_cells(read_manifest(compiled))
    assert 0 < cells < manifest_schema.MAX_MASK_CELLS // 10**4
