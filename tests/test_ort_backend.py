"""The ONNX Runtime backend (native custom ops) against the PyTorch reference executor and against
the original model run by ONNX Runtime; keys, cache updates and cross-process loading.

Every sparse run is forced onto the sparse path and the path is asserted."""

import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import sigec
from helpers import (ALWAYS_SPARSE, EXACT_TOLERANCE, LOCAL_NET, RANDOM_NET_APPROX_INSIDE, ROOT, always_sparse,
                     assert_approx, assert_exact, compare_with_oracle, engine_from_proto, examples, ort_oracle, rel_err)
from random_nets import random_local_net


@settings(max_examples=examples(25))
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(["exact", "approx"]), tile=st.sampled_from([4, 8]),
       batch=st.sampled_from([1, 2]))
def test_ort_matches_reference_executor_and_the_original_model(seed, mode, tile, batch):
    proto = random_local_net(seed, batch=batch, depth=7)
    # float32 caches: each engine primes its own caches, and float16 ones (the approx default) could
    # round a value of the two backends' FULL runs to neighbouring halves (test_half_caches.py checks them)
    reference = always_sparse(engine_from_proto(proto, mode=mode, tile_size=tile, backend="torch",
                                                cache_dtype="float32"))
    native = always_sparse(engine_from_proto(proto, mode=mode, tile_size=tile, backend="ort", cache_dtype="float32"))
    shape = reference.manifest["inputs"][0]["shape"]
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(shape).astype(np.float32)
    mask = np.zeros((shape[0], shape[2], shape[3]), bool)
    y, x = rng.integers(0, shape[2]), rng.integers(0, shape[3])
    mask[:, y:y + 4, x:x + 3] = True
    x1 = x0 + mask[:, None] * rng.standard_normal(shape).astype(np.float32)
    result = compare_with_oracle(native, ort_oracle(proto), {"x": x0}, {"x": x1}, mask)
    reference.prime({"x": x0})
    for a, b in zip(result.outputs, reference.run({"x": x1}, mask=mask)):
        assert rel_err(a, b) <= EXACT_TOLERANCE
    assert reference.stats.path == "sparse"
    context = f"seed {seed}, {mode}, tile {tile}, batch {batch}"
    if mode == "exact":
        assert_exact(result, min_change=0.0, context=context)
    elif result.stale_l2_inside > 100 * EXACT_TOLERANCE:
        assert_approx(result, inside=RANDOM_NET_APPROX_INSIDE, whole=1.0, context=context)
    else:  # the edit does not reach the edited region of the output (strided layers skip it)
        assert result.path == "sparse" and max(result.primed, result.dense) <= EXACT_TOLERANCE, context
        assert result.sparse_l2 <= result.stale_l2 + EXACT_TOLERANCE, f"{context}: {result}"


def _local_net_input(engine: sigec.Engine, seed: int) -> np.ndarray:
    shape = engine.manifest["inputs"][0]["shape"]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_two_keys_hold_independent_caches(local_net_path):
    engine = sigec.load(local_net_path, dense_fallback_fraction=ALWAYS_SPARSE)
    oracle = ort_oracle(random_local_net(**LOCAL_NET))
    a, b = _local_net_input(engine, 0), _local_net_input(engine, 1)
    out_a, out_b = engine.prime({"x": a}, key=0), engine.prime({"x": b}, key=1)
    edit = np.zeros((20, 20), np.float32)
    edit[3:6, 4:9] = 1.0
    for key, x in ((0, a + edit * 0.5), (1, b - edit * 0.5)):
        out = engine.run({"x": x}, key=key)[0]
        assert engine.stats.path == "sparse"
        expected = oracle({"x": x})[0]
        assert rel_err(out, expected) <= EXACT_TOLERANCE
        assert rel_err((out_a, out_b)[key][0], expected) > 100 * EXACT_TOLERANCE, "the edit changes the output"
    np.testing.assert_array_equal(engine.run({"x": a}, key=0)[0], out_a[0])
    np.testing.assert_array_equal(engine.run({"x": b}, key=1)[0], out_b[0])


def test_update_cache_makes_the_edit_the_new_original(local_net_path):
    engine = sigec.load(local_net_path, dense_fallback_fraction=ALWAYS_SPARSE)
    oracle = ort_oracle(random_local_net(**LOCAL_NET))
    x0 = _local_net_input(engine, 1)
    engine.prime({"x": x0})
    edit = np.zeros((20, 20), np.float32)
    edit[10:14, 2:5] = 1.0
    x1 = x0 + edit
    edited = engine.run({"x": x1}, update_cache=True)[0]
    assert engine.stats.path == "sparse"
    again = engine.run({"x": x1})[0]  # an empty edit against the updated cache
    assert engine.stats.path == "empty"
    np.testing.assert_array_equal(again, edited)
    # A second, different edit against the updated cache is exact too.
    x2 = x1.copy()
    x2[:, :, 0:2, 15:20] += 1.0
    out = engine.run({"x": x2})[0]
    assert engine.stats.path == "sparse"
    expected = oracle({"x": x2})[0]
    assert rel_err(out, expected) <= EXACT_TOLERANCE
    assert rel_err(edited, expected) > 100 * EXACT_TOLERANCE, "the second edit changes the output"


_CROSS_PROCESS_LOAD = """
import sys, numpy as np, onnxruntime as ort, sigec
sys.path.insert(0, 'tests')
from random_nets import random_local_net
proto = random_local_net(3, depth=5, size=(16, 16))
oracle = ort.InferenceSession(proto.SerializeToString(), providers=['CPUExecutionProvider'])
e = sigec.load(r'%s', dense_fallback_fraction=float('inf'))
x = np.ones(e.manifest['inputs'][0]['shape'], np.float32)
e.prime({'x': x})
y = x.copy()
y[..., 2:4, 2:4] = 0
a = e.run({'x': y})[0]
assert e.stats.path == 'sparse', e.stats.path
want = oracle.run(None, {'x': y})[0]
assert np.abs(a - want).max() <= 1e-5 * np.abs(want).max(), np.abs(a - want).max()
print('ok')
"""


def test_engine_compiled_in_one_process_loads_in_another(tmp_path):
    path = tmp_path / "cross.sigec"
    code = ("import sys, sigec; sys.path.insert(0, 'tests'); from random_nets import random_local_net; "
            f"sigec.compile(random_local_net(3, depth=5, size=(16, 16)), r'{path}', mode='exact')")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _CROSS_PROCESS_LOAD % path], check=True, capture_output=True,
                         text=True, cwd=str(ROOT))
    assert out.stdout.strip() == "ok"
