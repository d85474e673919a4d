"""Every ``sigec`` command as a user types it (``python -m sigec.cli ...`` in a subprocess), on tiny_local.

Sparse results are compared with ONNX Runtime running the original ONNX model (tiny_local exported
once), with a tolerance relative to how much the edit changes the output, and each run asserts
the path it took (``sigec run`` prints it).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from sigec.cli import build_parser
from sigec.core.engine_file import read_manifest

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # tiny_local small: 32 px, 8 channels, input "image"
SQUARE = (slice(8, 14), slice(10, 18))  # the edited square (rows, columns)
# Exact mode: max |sigec - ONNX Runtime| may be at most this fraction of the largest change the
# edit causes in the output (float32 reassociation only; a wrong tile is of the order of 1).
EXACT_TOLERANCE = 1e-4


def sigec_cli(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``sigec ARGS`` as a user would; with ``check`` a failure shows its output."""
    result = subprocess.run([sys.executable, "-m", "sigec.cli", *map(str, args)], capture_output=True, text=True)
    if check and result.returncode != 0:
        pytest.fail(f"sigec {' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def run_path(stdout: str) -> str:
    """The path (sparse / dense / empty) ``sigec run`` reports."""
    found = re.search(r"^path (\w+),", stdout, re.MULTILINE)
    assert found, stdout
    return found.group(1)


def onnxruntime_outputs(model: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The original ONNX model run by ONNX Runtime (the reference of every comparison)."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_exact(actual: np.ndarray, edited_ref: np.ndarray, original_ref: np.ndarray) -> None:
    """sigec's output equals ONNX Runtime's up to ``EXACT_TOLERANCE`` of the edit's output change."""
    change = float(np.abs(edited_ref - original_ref).max())
    assert change > 1e-2, "the edit must change the output for the comparison to mean anything"
    error = float(np.abs(actual - edited_ref).max())
    assert error <= EXACT_TOLERANCE * change, f"max error {error:.2e} vs output change {change:.2e}"


def image_u8(seed: int = 0) -> np.ndarray:
    """A smooth random RGB picture [SIZE, SIZE, 3] uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    channels = [np.sin(2 * np.pi * (rng.uniform(1, 3) * yy + rng.uniform(1, 3) * xx)) for _ in range(3)]
    return ((np.stack(channels, -1) + 1) * 127.5).round().astype(np.uint8)


def as_input(picture: np.ndarray) -> np.ndarray:
    """What ``sigec run`` feeds for a picture: [1, 3, H, W] float32 in [-1, 1]."""
    return picture.transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1.0


def square_edit(x: np.ndarray, delta: float, square: tuple[slice, slice] = SQUARE) -> np.ndarray:
    """``x`` with ``delta`` added on ``square``."""
    edited = x.copy()
    edited[..., square[0], square[1]] += delta
    return edited


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """tiny_local (small) exported once to ONNX: the original model of every comparison."""
    from sigec.apps.zoo import build
    from sigec.frontends.torch_frontend import export_module

    module, inputs = build("tiny_local", small=True)
    path = tmp_path_factory.mktemp("cli_models") / "tiny_local.onnx"
    onnx.save(export_module(module, inputs), path)
    return path


@pytest.fixture(scope="session")
def tiny_engine(tiny_onnx) -> Path:
    """tiny_local compiled once from the command line, exact mode (threshold 0, dilation 0)."""
    path = tiny_onnx.with_name("tiny_local.sigec")
    sigec_cli("compile", tiny_onnx, "-o", path, "--mode", "exact", "-q")
    return path


@pytest.fixture(scope="session")
def pictures(tmp_path_factory) -> dict[str, Path]:
    """original.png, edited.png (a red square painted on SQUARE) and mask.png (white on the square)."""
    folder = tmp_path_factory.mktemp("cli_pictures")
    original = image_u8()
    edited = original.copy()
    edited[SQUARE] = (230, 20, 20)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[SQUARE] = 255
    paths = {"original": folder / "original.png", "edited": folder / "edited.png", "mask": folder / "mask.png"}
    Image.fromarray(original).save(paths["original"])
    Image.fromarray(edited).save(paths["edited"])
    Image.fromarray(mask, mode="L").save(paths["mask"])
    return paths


@pytest.fixture(scope="session")
def arrays(tmp_path_factory) -> dict[str, Path]:
    """original.npy (random in [-1, 1]) and edited.npy (+0.5 on SQUARE), for tiny_local's input."""
    folder = tmp_path_factory.mktemp("cli_arrays")
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, SIZE, SIZE)).astype(np.float32)
    paths = {"original": folder / "original.npy", "edited": folder / "edited.npy"}
    np.save(paths["original"], x)
    np.save(paths["edited"], square_edit(x, 0.5))
    return paths


# ----- compile ------------------------------------------------------------------------------------------


def test_compile_a_factory_and_run_it_matches_onnxruntime(tmp_path, tiny_onnx, arrays):
    """`sigec compile pkg.module:factory` succeeds; its engine's sparse run equals ONNX Runtime on the export."""
    engine = tmp_path / "factory.sigec"
    compiled = sigec_cli("compile", "sigec.apps.zoo.cli_factories:tiny_local_small", "-o", engine, "--mode", "exact")
    assert f"wrote {engine}" in compiled.stdout and "mode exact, 2 resolutions" in compiled.stdout
    assert [i["name"] for i in read_manifest(engine)["inputs"]] == ["image"]

    out = tmp_path / "out.npy"
    run = sigec_cli("run", engine, "--original", arrays["original"], "--edited", arrays["edited"], "-o", out)
    assert run_path(run.stdout) == "sparse"
    original, edited = np.load(arrays["original"]), np.load(arrays["edited"])
    assert_exact(np.load(out), onnxruntime_outputs(tiny_onnx, {"image": edited})[0],
                 onnxruntime_outputs(tiny_onnx, {"image": original})[0])


def dynamic_copy(model: Path, target: Path) -> Path:
    """``model`` with symbolic height and width on its input and output (shapes inside dropped)."""
    proto = onnx.load(model)
    del proto.graph.value_info[:]
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "height", "width"
    onnx.save(proto, target)
    return target


def test_input_shape_pins_a_dynamic_axis(tmp_path, tiny_onnx):
    """A dynamic ONNX file compiles once --input-shape pins it, at a size it was not exported for."""
    dynamic = dynamic_copy(tiny_onnx, tmp_path / "dynamic.onnx")
    engine = tmp_path / "pinned.sigec"
    refused = sigec_cli("compile", dynamic, "-o", engine, "-q", check=False)
    assert refused.returncode == 2 and "--input-shape image=" in refused.stderr

    sigec_cli("compile", dynamic, "-o", engine, "--mode", "exact", "--input-shape", "image=1,3,48,40", "-q")
    assert read_manifest(engine)["inputs"][0]["shape"] == [1, 3, 48, 40]
    x = np.random.default_rng(2).uniform(-1, 1, (1, 3, 48, 40)).astype(np.float32)
    y = square_edit(x, 0.5)
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", y)
    run = sigec_cli("run", engine, "--original", tmp_path / "a.npy", "--edited", tmp_path / "b.npy",
                    "-o", tmp_path / "out.npy")
    assert run_path(run.stdout) == "sparse"
    assert_exact(np.load(tmp_path / "out.npy"), onnxruntime_outputs(dynamic, {"image": y})[0],
                 onnxruntime_outputs(dynamic, {"image": x})[0])


def test_compile_time_threshold_and_dilation(tmp_path, tiny_onnx, tiny_engine, arrays):
    """--threshold/--dilation land in the manifest's mask program and are what runs and inspect use."""
    engine = tmp_path / "masked.sigec"
    sigec_cli("compile", tiny_onnx, "-o", engine, "--mode", "exact", "--threshold", "0.3", "--dilation", "2", "-q")
    program = read_manifest(engine)["mask_program"]
    assert program["threshold"] == 0.3 and program["dilation"] == 2

    x = np.load(arrays["original"])
    corner = (slice(4, 6), slice(4, 6))  # small enough to stay sparse with the 2-px dilation
    np.save(tmp_path / "small_edit.npy", square_edit(x, 0.1, corner))  # below the engine's threshold
    small = sigec_cli("run", engine, "--original", arrays["original"], "--edited", tmp_path / "small_edit.npy")
    assert run_path(small.stdout) == "empty"
    overridden = sigec_cli("run", engine, "--original", arrays["original"], "--edited", tmp_path / "small_edit.npy",
                           "--threshold", "0.05")
    assert run_path(overridden.stdout) == "sparse"

    # one edited pixel: the 2-px dilation reaches tiles that the undilated engine leaves alone
    pixel = np.zeros((SIZE, SIZE), bool)
    pixel[16, 16] = True
    np.save(tmp_path / "pixel.npy", pixel)
    tiles = {}
    for name, path in (("dilated", engine), ("plain", tiny_engine)):
        report = json.loads(sigec_cli("inspect", path, "--mask", tmp_path / "pixel.npy", "--json").stdout)
        tiles[name] = report["mask"]["active_tiles"]["r32x32"]
    assert tiles["dilated"] > tiles["plain"]


def test_compile_time_approx_dilation(tmp_path, tiny_onnx, arrays):
    """--approx-dilation is stored and widens every resolution's tiles around an edit."""
    pixel = np.zeros((SIZE, SIZE), bool)
    pixel[16, 16] = True
    np.save(tmp_path / "pixel.npy", pixel)
    tiles = {}
    for cells in (1, 3):
        engine = tmp_path / f"approx{cells}.sigec"
        sigec_cli("compile", tiny_onnx, "-o", engine, "--mode", "approx", "--approx-dilation", str(cells), "-q")
        assert read_manifest(engine)["options"]["approx_dilation"] == cells
        report = json.loads(sigec_cli("inspect", engine, "--mask", tmp_path / "pixel.npy", "--json").stdout)
        tiles[cells] = sum(report["mask"]["active_tiles"].values())
        run = sigec_cli("run", engine, "--original", arrays["original"], "--edited", arrays["edited"])
        assert run_path(run.stdout) == "sparse"
    assert tiles[3] > tiles[1]


def one_conv_onnx(path: Path, *, with_timestep: bool) -> Path:
    """A 16x16 net of one resolution: Conv (times a non-spatial input 't' [1]) -> ReLU -> Conv."""
    rng = np.random.default_rng(3)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1"),
               numpy_helper.from_array(rng.standard_normal((3, 4, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])]
    if with_timestep:
        nodes.append(helper.make_node("Mul", ["h", "t"], ["h_t"], name="scale"))
        inputs.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, [1]))
    nodes += [helper.make_node("Relu", [nodes[-1].output[0]], ["r"], name="relu"),
              helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "one_resolution", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16, 16])],
                              initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


def test_compile_and_inspect_say_1_resolution_not_1_resolutions(tmp_path):
    model = one_conv_onnx(tmp_path / "one.onnx", with_timestep=False)
    compiled = sigec_cli("compile", model, "-o", tmp_path / "one.sigec", "-q")
    assert "1 resolution," in compiled.stdout and "1 resolutions" not in compiled.stdout
    manifest = read_manifest(tmp_path / "one.sigec")
    caches = len(manifest["caches"])
    assert f"{caches} cache{'' if caches == 1 else 's'}," in compiled.stdout
    shown = sigec_cli("inspect", tmp_path / "one.sigec").stdout
    assert f"caches: {caches} tensor{'' if caches == 1 else 's'}," in shown


def test_output_folder_is_checked_before_any_work(tmp_path, tiny_onnx, tiny_engine, arrays):
    """run -o and compile -o into a missing folder: exit 2 at once, the path named, no traceback, no run."""
    target = tmp_path / "missing" / "dir" / "out.png"
    run = sigec_cli("run", tiny_engine, "--original", arrays["original"], "--edited", arrays["edited"], "-o", target,
                    check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"cannot write '{target}'" in run.stderr and "does not exist" in run.stderr
    assert "path " not in run.stdout  # refused before running
    compiled = sigec_cli("compile", tiny_onnx, "-o", tmp_path / "missing" / "x.sigec", check=False)
    assert compiled.returncode == 2 and "Traceback" not in compiled.stderr
    assert f"folder '{tmp_path / 'missing'}' does not exist" in compiled.stderr
    assert "frontend" not in compiled.stderr  # no compile step started
    odd = sigec_cli("run", tiny_engine, "--original", arrays["original"], "--edited", arrays["edited"],
                    "-o", tmp_path / "out.txt", check=False)
    assert odd.returncode == 2 and ".npy" in odd.stderr and not (tmp_path / "out.txt.npy").exists()


# ----- run ----------------------------------------------------------------------------------------------


def test_run_png_pictures_with_a_png_mask_matches_onnxruntime(tmp_path, tiny_onnx, tiny_engine, pictures):
    out = tmp_path / "out.npy"
    run = sigec_cli("run", tiny_engine, "--original", pictures["original"], "--edited", pictures["edited"],
                    "--mask", pictures["mask"], "-o", out)
    assert run_path(run.stdout) == "sparse"
    original = as_input(np.asarray(Image.open(pictures["original"])))
    edited = as_input(np.asarray(Image.open(pictures["edited"])))
    assert_exact(np.load(out), onnxruntime_outputs(tiny_onnx, {"image": edited})[0],
                 onnxruntime_outputs(tiny_onnx, {"image": original})[0])


def test_run_with_the_torch_backend_writes_a_png(tmp_path, tiny_onnx, tiny_engine, pictures):
    """--backend torch runs the same engine; -o .png holds ONNX Runtime's output to one grey level."""
    out = tmp_path / "out.png"
    run = sigec_cli("run", tiny_engine, "--backend", "torch", "--original", pictures["original"],
                    "--edited", pictures["edited"], "-o", out)
    assert run_path(run.stdout) == "sparse" and f"wrote {out}" in run.stdout
    written = np.asarray(Image.open(out)).astype(int)
    edited = as_input(np.asarray(Image.open(pictures["edited"])))
    reference = onnxruntime_outputs(tiny_onnx, {"image": edited})[0][0].transpose(1, 2, 0)
    expected = np.clip((reference + 1.0) * 127.5, 0, 255).astype(int)
    assert written.shape == (SIZE, SIZE, 3)
    assert np.abs(written - expected).max() <= 1  # float differences may move a value across a level


def test_run_threshold_at_run_time(tmp_path, tiny_onnx, tiny_engine, arrays):
    """An edit of 0.1 is seen at the exact engine's threshold 0 and ignored with --threshold 0.2."""
    np.save(tmp_path / "small_edit.npy", square_edit(np.load(arrays["original"]), 0.1))
    args = ("run", tiny_engine, "--original", arrays["original"], "--edited", tmp_path / "small_edit.npy")
    assert run_path(sigec_cli(*args).stdout) == "sparse"
    ignored = sigec_cli(*args, "--threshold", "0.2", "-o", tmp_path / "out.npy")
    assert run_path(ignored.stdout) == "empty"
    # an ignored edit returns the original's output
    reference = onnxruntime_outputs(tiny_onnx, {"image": np.load(arrays["original"])})[0]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), reference, rtol=0, atol=1e-5)


def test_non_spatial_input_is_asked_for_by_its_flag_and_then_used(tmp_path):
    """A missing 't' (a timestep-like input) names --input t=FILE.npy; given, the run matches ONNX Runtime."""
    model = one_conv_onnx(tmp_path / "timestep.onnx", with_timestep=True)
    engine = tmp_path / "timestep.sigec"
    sigec_cli("compile", model, "-o", engine, "--mode", "exact", "-q")
    x = np.random.default_rng(4).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    y = square_edit(x, 0.5)
    t = np.array([0.7], np.float32)
    for name, value in (("a", x), ("b", y), ("t", t)):
        np.save(tmp_path / f"{name}.npy", value)
    args = ("run", engine, "--original", tmp_path / "a.npy", "--edited", tmp_path / "b.npy")

    missing = sigec_cli(*args, check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "--input t=FILE.npy" in missing.stderr and "float32 [1]" in missing.stderr
    unknown = sigec_cli(*args, "--input", f"time={tmp_path / 't.npy'}", check=False)
    assert unknown.returncode == 2 and "'time'" in unknown.stderr

    run = sigec_cli(*args, "--input", f"t={tmp_path / 't.npy'}", "-o", tmp_path / "out.npy")
    assert run_path(run.stdout) == "sparse"
    assert_exact(np.load(tmp_path / "out.npy"), onnxruntime_outputs(model, {"x": y, "t": t})[0],
                 onnxruntime_outputs(model, {"x": x, "t": t})[0])


# ----- inspect ------------------------------------------------------------------------------------------


def test_inspect_summarises_by_default_and_lists_nodes_on_request(tiny_engine, pictures):
    manifest = read_manifest(tiny_engine)
    names = [n["name"] for n in manifest["nodes"] if n["kind"] != "constant"]

    summary = sigec_cli("inspect", tiny_engine, "--mask", pictures["mask"]).stdout
    assert "per resolution" in summary and "per op type" in summary and "Conv" in summary
    assert "--nodes" in summary and not any(name in summary for name in names)
    assert "mask: " in summary and "MAC reduction" in summary

    table = sigec_cli("inspect", tiny_engine, "--nodes").stdout
    assert all(name in table for name in names)

    report = json.loads(sigec_cli("inspect", tiny_engine, "--mask", pictures["mask"], "--json").stdout)
    assert [n["name"] for n in report["nodes"]] == [n["name"] for n in manifest["nodes"]]  # JSON stays complete
    mask = np.asarray(Image.open(pictures["mask"])) > 0
    assert report["mask"]["edited_fraction"] == pytest.approx(mask.mean())
    assert 0 < report["mask"]["active_tiles"]["r32x32"] < (SIZE // 4) ** 2


# ----- help ---------------------------------------------------------------------------------------------


def _subparsers() -> dict[str, object]:
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_help_documents_every_option_and_its_default(command):
    """Every option of `sigec COMMAND --help` has help text, and every default worth showing is shown."""
    text = sigec_cli(command, "--help").stdout
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if not re.match(r"^  \S", line):  # an option or positional argument entry
            continue
        same_line = len(re.split(r"\s{2,}", line.strip())) > 1
        next_line = lines[index + 1] if index + 1 < len(lines) else ""
        assert same_line or re.match(r"^\s{10,}\S", next_line), f"no help text for {line.strip()!r}"
    flat = " ".join(text.split())
    for action in _subparsers()[command]._actions:
        if action.option_strings and action.default not in (None, False, (), argparse.SUPPRESS):
            shown = (f"(default: {action.default})", f"(default {action.default})")
            assert any(s in flat for s in shown), action.option_strings


def test_compile_help_names_mode_backend_and_quiet():
    text = " ".join(sigec_cli("compile", "--help").stdout.split())
    assert "(default: approx)" in text and "(default: ort)" in text
    assert "-q, --quiet do not print" in text


# ----- demo, bench, tools -------------------------------------------------------------------------------


def test_demo_command_writes_what_its_help_promises(tmp_path):
    """`sigec demo --size 32`: says its weights are random, writes the engine and the picture, nothing else."""
    helptext = " ".join(sigec_cli("demo", "--help").stdout.split())
    assert "random weights" in helptext and "report" not in helptext
    assert "tiny_local.sigec" in helptext and "demo.png" in helptext

    demo = sigec_cli("demo", "--out", tmp_path / "demo", "--size", "32")
    assert "random weights" in demo.stdout
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["demo.png", "tiny_local.sigec"]
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 1000
    error = float(re.search(r"max relative error vs dense (\S+)", demo.stdout).group(1))
    assert error <= 1e-5  # exact mode


def test_bench_shows_progress_per_edit_when_piped(tiny_engine):
    """With stdout and stderr both a pipe, a line per measured edit comes before the final table."""
    bench = subprocess.run([sys.executable, "-m", "sigec.cli", "bench", str(tiny_engine), "--edits", "0.05,1.0",
                            "--repeats", "1", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, check=True)
    lines = bench.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("[1/2] edit 5.0%"))
    second = next(i for i, line in enumerate(lines) if line.startswith("[2/2] edit 100.0%"))
    table = next(i for i, line in enumerate(lines) if line.startswith("| edit |"))
    assert first < second < table
    assert "path sparse" in lines[first] and "| 5.0% |" in bench.stdout


def test_profile_sparse_script_on_a_small_engine(tiny_engine):
    script = ROOT / "tools" / "profile_sparse.py"
    profile = subprocess.run([sys.executable, str(script), str(tiny_engine), "--edit", "0.05", "--runs", "1",
                              "--threads", "1"], capture_output=True, text=True, check=True)
    assert "edit 5.0%: MAC reduction" in profile.stdout
    assert "sparse graph" in profile.stdout and "| Conv |" in profile.stdout
    assert "| r32x32 |" in profile.stdout and "| r16x16 |" in profile.stdout
    missing = subprocess.run([sys.executable, str(script), str(tiny_engine.with_name("nope.sigec"))],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.sigec" in missing.stderr and "Traceback" not in missing.stderr
