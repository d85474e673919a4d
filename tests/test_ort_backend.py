"""The ONNX Runtime backend (native custom ops) against the PyTorch reference executor."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sigec
from helpers import engine_from_proto, rel_err
from random_nets import random_local_net

TOLERANCE = 1e-5  # relative to the output's largest magnitude


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(["exact", "approx"]), tile=st.sampled_from([4, 8]),
       batch=st.sampled_from([1, 2]))
def test_ort_matches_reference_executor(seed, mode, tile, batch):
    proto = random_local_net(seed, batch=batch, depth=7)
    reference = engine_from_proto(proto, mode=mode, tile_size=tile, backend="torch")
    native = engine_from_proto(proto, mode=mode, tile_size=tile, backend="ort")
    shape = reference.manifest["inputs"][0]["shape"]
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(shape).astype(np.float32)
    reference.prime({"x": x0})
    native.prime({"x": x0})
    mask = np.zeros((shape[0], shape[2], shape[3]), bool)
    y, x = rng.integers(0, shape[2]), rng.integers(0, shape[3])
    mask[:, y:y + 4, x:x + 3] = True
    x1 = x0 + mask[:, None] * rng.standard_normal(shape).astype(np.float32)
    for a, b in zip(native.run({"x": x1}), reference.run({"x": x1})):
        assert rel_err(a, b) <= TOLERANCE


@pytest.fixture(scope="module")
def small_engine_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("engines") / "local.sigec"
    return sigec.compile(random_local_net(7, depth=6, size=(20, 20)), path, mode="exact")


def test_two_keys_hold_independent_caches(small_engine_path):
    engine = sigec.load(small_engine_path)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((1, *engine.manifest["inputs"][0]["shape"][1:])).astype(np.float32) for _ in range(2))
    out_a, out_b = engine.prime({"x": a}, key=0), engine.prime({"x": b}, key=1)
    edit = np.zeros((20, 20), bool)
    edit[3:6, 4:9] = True
    a2, b2 = a + edit * 0.5, b - edit * 0.5
    np.testing.assert_allclose(engine.run({"x": a2}, key=0)[0], engine.run_dense({"x": a2})[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(engine.run({"x": b2}, key=1)[0], engine.run_dense({"x": b2})[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(engine.run({"x": a}, key=0)[0], out_a[0])
    np.testing.assert_array_equal(engine.run({"x": b}, key=1)[0], out_b[0])


def test_update_cache_makes_the_edit_the_new_original(small_engine_path):
    engine = sigec.load(small_engine_path)
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((1, *engine.manifest["inputs"][0]["shape"][1:])).astype(np.float32)
    engine.prime({"x": x0})
    edit = np.zeros((20, 20), bool)
    edit[10:14, 2:5] = True
    x1 = x0 + edit * 1.0
    edited = engine.run({"x": x1}, update_cache=True)[0]
    again = engine.run({"x": x1})[0]  # an empty edit against the updated cache
    assert engine.stats.path == "empty"
    np.testing.assert_array_equal(again, edited)
    # a second, different edit against the updated cache is still exact
    x2 = x1.copy()
    x2[:, :, 0:2, 15:20] += 1.0
    np.testing.assert_allclose(engine.run({"x": x2})[0], engine.run_dense({"x": x2})[0], rtol=1e-5, atol=1e-5)


def test_engine_compiled_in_one_process_loads_in_another(tmp_path):
    path = tmp_path / "cross.sigec"
    code = ("import sys, sigec; sys.path.insert(0, 'tests'); from random_nets import random_local_net; "
            f"sigec.compile(random_local_net(3, depth=5, size=(16, 16)), r'{path}', mode='exact')")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    load = ("import numpy as np, sigec; e = sigec.load(r'%s'); x = np.ones(e.manifest['inputs'][0]['shape'], "
            "np.float32); e.prime({'x': x}); y = x.copy(); y[..., 2:4, 2:4] = 0; "
            "a = e.run({'x': y})[0]; b = e.run_dense({'x': y})[0]; "
            "assert np.allclose(a, b, rtol=1e-5, atol=1e-5), abs(a - b).max(); print('ok')" % path)
    out = subprocess.run([sys.executable, "-c", load], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "ok"
