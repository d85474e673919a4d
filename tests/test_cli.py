"""The command line end to end on a tiny model: compile, inspect (with and without a mask), run."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from random_nets import random_local_net


def sigec_cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "sigec.cli", *map(str, args)], capture_output=True, text=True,
                          check=check)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    onnx.save(random_local_net(11, depth=6, size=(32, 32)), d / "tiny.onnx")
    return d


def test_compile_inspect_run(tiny):
    out = sigec_cli("compile", tiny / "tiny.onnx", "-o", tiny / "tiny.sigec", "--mode", "exact", "--tile-size", "8", "-q")
    assert "wrote" in out.stdout and (tiny / "tiny.sigec").exists()

    table = sigec_cli("inspect", tiny / "tiny.sigec").stdout
    assert "per resolution" in table and "Conv" in table

    mask = np.zeros((32, 32), bool)
    mask[4:8, 4:8] = True
    np.save(tiny / "mask.npy", mask)
    report = json.loads(sigec_cli("inspect", tiny / "tiny.sigec", "--mask", tiny / "mask.npy", "--json").stdout)
    assert report["mask"]["mac_reduction"] > 1.0
    assert report["mask"]["executed_macs"] < report["dense_macs"]

    sigec_cli("inspect", tiny / "tiny.sigec", "--export-onnx", tiny / "graphs")
    for name in ("full", "sparse", "dense"):
        onnx.checker.check_model(onnx.load(tiny / "graphs" / f"{name}.onnx"))

    x = np.random.default_rng(0).standard_normal((1, *report["inputs"][0]["shape"][1:])).astype(np.float32)
    y = x.copy()
    y[..., 4:8, 4:8] += 1
    np.save(tiny / "a.npy", x)
    np.save(tiny / "b.npy", y)
    run = sigec_cli("run", tiny / "tiny.sigec", "--original", tiny / "a.npy", "--edited", tiny / "b.npy",
                    "-o", tiny / "out.npy")
    assert "path sparse" in run.stdout
    assert np.load(tiny / "out.npy").shape[0] == 1


def test_cli_errors_are_clear_and_exit_2(tiny):
    missing = sigec_cli("compile", tiny / "nope.onnx", "-o", tiny / "x.sigec", check=False)
    assert missing.returncode == 2 and "nope.onnx" in missing.stderr
    bad = tiny / "bad.sigec"
    bad.write_bytes(b"not an engine")
    broken = sigec_cli("inspect", bad, check=False)
    assert broken.returncode == 2 and "bad.sigec" in broken.stderr


def test_bench_command_prints_a_table(tiny):
    sigec_cli("compile", tiny / "tiny.onnx", "-o", tiny / "bench.sigec", "--mode", "exact", "-q")
    out = sigec_cli("bench", tiny / "bench.sigec", "--edits", "0.05,1.0", "--repeats", "1").stdout
    assert "| 5.0% |" in out and "| 100.0% |" in out


def test_compile_autotune_and_dense_resolutions_flags(tiny):
    sigec_cli("compile", tiny / "tiny.onnx", "-o", tiny / "tuned.sigec", "--mode", "approx", "--autotune",
              "--autotune-edits", "0.1", "--autotune-threads", "1", "-q")
    from sigec.core.engine_file import read_manifest

    options = read_manifest(tiny / "tuned.sigec")["options"]
    assert options["autotune"]["edits"] == [0.1] and options["tile_size"] == options["autotune"]["plan"]["tile_size"]
    sigec_cli("compile", tiny / "tiny.onnx", "-o", tiny / "plain.sigec", "-q")
    resolution = read_manifest(tiny / "plain.sigec")["resolutions"][-1]["name"]
    sigec_cli("compile", tiny / "tiny.onnx", "-o", tiny / "dres.sigec", "--dense-resolutions", resolution, "-q")
    manifest = read_manifest(tiny / "dres.sigec")
    assert manifest["options"]["dense_resolutions"] == [resolution]
    assert resolution not in {r["name"] for r in manifest["resolutions"]}
    refused = sigec_cli("compile", tiny / "tiny.onnx", "-o", tiny / "x.sigec", "--mode", "exact",
                        "--dense-resolutions", resolution, check=False)
    assert refused.returncode == 2 and "needs mode='approx'" in refused.stderr
