"""Reliability of the Engine: bad requests, failures that lose nothing, the cache memory bound."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import sigec
from sigec import BackendError, CacheError, InputError
from sigec.runtime import engine as engine_module
from sigec.runtime.tiles import gather_tiles, scatter_tiles_inplace
from random_nets import random_local_net

SIZE = 20  # the local net's input is [1, 3, 20, 20]; its caches are at 40x40 with 8 px tiles (border tiles)


def _static_input_net() -> onnx.ModelProto:
    """x [1, 2, 12, 12] (spatial) and t [1, 4, 1, 1] (non-spatial, like a timestep embedding)."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (4, 2, 3, 3)), ("w2", (3, 4, 3, 3)), ("s", (1, 4, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["t", "s"], ["temb"]),  # (a graph input read directly as a cache
             helper.make_node("Add", ["c1", "temb"], ["a1"]),  # does not compile: "cache of graph input")
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "static_input", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 12, 12]),
                                                      helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 12, 12])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def _int_timestep_net() -> onnx.ModelProto:
    """x [1, 2, 12, 12] float32 (spatial) and t [1] int64 (non-spatial: an integer timestep, cast in the graph)."""
    rng = np.random.default_rng(1)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (4, 2, 3, 3)), ("w2", (3, 4, 3, 3)), ("s", (1, 4, 1, 1)))]
    inits.append(onnx.numpy_helper.from_array(np.array([1, 1, 1, 1], np.int64), "shape4"))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["t"], ["tf"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["tf", "shape4"], ["t4"]),
             helper.make_node("Mul", ["t4", "s"], ["temb"]),
             helper.make_node("Add", ["c1", "temb"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "int_timestep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 12, 12]),
                                                      helper.make_tensor_value_info("t", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 12, 12])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


@pytest.fixture(scope="module")
def local_path(tmp_path_factory):
    return sigec.compile(random_local_net(7, depth=6, size=(SIZE, SIZE)),
                         tmp_path_factory.mktemp("rel") / "local.sigec", mode="exact")


@pytest.fixture(scope="module")
def static_path(tmp_path_factory):
    return sigec.compile(_static_input_net(), tmp_path_factory.mktemp("rel") / "static.sigec", mode="exact")


@pytest.fixture(scope="module")
def int_timestep_path(tmp_path_factory):
    return sigec.compile(_int_timestep_net(), tmp_path_factory.mktemp("rel") / "int_timestep.sigec", mode="exact")


@pytest.fixture
def engine(local_path):
    return sigec.load(local_path, threads=1)


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)


def _edit(x: np.ndarray, y0: int = 3, x0: int = 4, h: int = 3, w: int = 5, delta: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y0:y0 + h, x0:x0 + w] = True
    return x + mask * np.float32(delta), mask


def _snapshot(engine, key="default"):
    entry = engine._store.entry(key)
    return ({k: v.copy() for k, v in entry.tensors.items()}, {k: v.copy() for k, v in entry.inputs.items()},
            [o.copy() for o in entry.outputs])


def _assert_same_entry(engine, snapshot, key="default"):
    tensors, inputs, outputs = snapshot
    entry = engine._store.entry(key)
    assert entry.tensors.keys() == tensors.keys()
    for name, value in tensors.items():
        np.testing.assert_array_equal(entry.tensors[name], value, err_msg=name)  # bit-identical
        assert entry.tensors[name].dtype == value.dtype
    for name, value in inputs.items():
        np.testing.assert_array_equal(entry.inputs[name], value)
    for a, b in zip(entry.outputs, outputs):
        np.testing.assert_array_equal(a, b)


def _assert_exact(outputs, reference):
    for a, b in zip(outputs, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ----- 1. bad requests ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["prime", "run", "run_dense"])
def test_input_validation_names_the_input(engine, method):
    engine.prime({"x": _x(0)})
    call = getattr(engine, method)
    good = _x(0)
    cases = [
        ({"x": good, "bogus": good}, r"unknown input name\(s\) \['bogus'\]; the engine's inputs are \['x'\]"),
        ({}, r"missing input\(s\) \['x'\]"),
        ({"x": good[:, :, :, :-1]}, r"input 'x' has shape \[1, 3, 20, 19\], expected \[1, 3, 20, 20\]"),
        ({"x": good[0]}, r"input 'x' has shape \[3, 20, 20\]"),
        ({"x": good > 0}, r"input 'x' has dtype bool, expected float32"),
        ({"x": good.astype(np.complex64)}, r"input 'x' has dtype complex64"),
        ({"x": np.full(good.shape, "a")}, r"input 'x' has dtype <U1"),
        ([good, good], r"expected 1 inputs \(\['x'\]\), got 2"),
        (None, r"inputs must be a mapping .* got NoneType"),
        ("x", r"inputs must be a mapping .* got str"),
    ]
    for inputs, message in cases:
        with pytest.raises(InputError, match=message):
            call(inputs)


@pytest.mark.parametrize("method", ["prime", "run", "run_dense"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(engine, method, bad):
    engine.prime({"x": _x(0)})
    x = _x(0)
    x[0, 1, 5, 6] = bad
    x[0, 2, 7, 7] = bad
    with pytest.raises(InputError, match=r"input 'x' contains 2 NaN or Inf value\(s\), the first at index \(0, 1, 5, 6\)"):
        getattr(engine, method)({"x": x})


def test_overflow_in_conversion_is_reported_as_such(engine):
    x = _x(0).astype(np.float64)
    x[0, 0, 0, 0] = 1e300  # finite in float64, Inf once converted to the engine's float32
    with pytest.raises(InputError, match="input 'x' contains 1 NaN or Inf.*after conversion from float64 to float32"):
        engine.prime({"x": x})
    # a float64 input that fits is converted and accepted, as before
    out64 = engine.prime({"x": _x(0).astype(np.float64)})
    np.testing.assert_array_equal(out64[0], engine.prime({"x": _x(0)})[0])


@pytest.mark.parametrize("method", ["prime", "run", "run_dense"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64, np.bool_])
def test_integer_data_for_a_float_input_is_refused(engine, method, dtype):
    # 0..255 pixels silently converted for a model that expects normalised floats would give garbage
    engine.prime({"x": _x(0)})
    pixels = np.random.default_rng(0).integers(0, 256, (1, 3, SIZE, SIZE)).astype(dtype)
    with pytest.raises(InputError, match=rf"input 'x' has dtype {np.dtype(dtype)}, expected float32; .*"
                                         rf"arr\.astype\(np\.float32\), scaled as the model expects"):
        getattr(engine, method)({"x": pixels})
    assert engine.cache_keys() == ["default"]


def test_float16_and_float64_inputs_are_converted(engine):
    x16 = _x(0).astype(np.float16)
    want = engine.prime({"x": x16.astype(np.float32)})
    for x in (x16, x16.astype(np.float64)):
        np.testing.assert_array_equal(engine.prime({"x": x})[0], want[0])
        np.testing.assert_array_equal(engine.run_dense({"x": x})[0], engine.run_dense({"x": x16.astype(np.float32)})[0])
    x1, mask = _edit(_x(0))
    _assert_exact(engine.run({"x": x1.astype(np.float16)}, mask=mask), engine.run_dense({"x": x1.astype(np.float16)}))


def test_integer_timestep_input_still_works(int_timestep_path):
    engine = sigec.load(int_timestep_path, threads=1)
    assert [(i["name"], i["dtype"], i["spatial"]) for i in engine.manifest["inputs"]] == \
        [("x", "float32", True), ("t", "int64", False)]
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((1, 2, 12, 12)).astype(np.float32)
    engine.prime({"x": x0, "t": np.array([7], np.int64)}, key=7)
    x1 = x0.copy()
    x1[..., 2:4, 3:6] += 1.0
    dense = engine.run_dense({"x": x1, "t": np.array([7])})
    for t in (np.array([7], np.int64), np.array([7], np.int32)):  # an int32 timestep converts to int64
        _assert_exact(engine.run({"x": x1, "t": t}, key=7), dense)
        assert engine.stats.path == "sparse"
    with pytest.raises(InputError, match=r"input 't' has dtype float32, expected int64"):
        engine.run({"x": x1, "t": np.array([7.0], np.float32)}, key=7)
    with pytest.raises(InputError, match=r"input 't' differs from the value primed for key 7"):
        engine.run({"x": x1, "t": np.array([8])}, key=7)


def test_bad_masks_are_refused(engine):
    x0 = _x(0)
    engine.prime({"x": x0})
    x1, mask = _edit(x0)
    cases = [
        (np.ones((SIZE, SIZE + 1), bool), r"mask has shape \[20, 21\], expected \[20, 20\] or \[1, 20, 20\]"),
        (np.ones((2, SIZE, SIZE), bool), r"mask has shape \[2, 20, 20\]"),
        (np.ones((40, 40), bool), r"mask has shape \[40, 40\]"),
        (mask.astype(np.float32), r"mask must be a boolean array, got dtype float32"),
        (mask.astype(np.int64) * 2, r"mask must be boolean \(or integers 0/1\), got dtype int64 with other values"),
        (np.full((SIZE, SIZE), "1"), r"mask must be a boolean array, got dtype <U1"),
    ]
    for bad, message in cases:
        with pytest.raises(InputError, match=message):
            engine.run({"x": x1}, mask=bad)
        with pytest.raises(InputError, match=message):
            engine.expected_macs(bad)
    # 0/1 integers are accepted and mean the same as booleans
    np.testing.assert_array_equal(engine.run({"x": x1}, mask=mask.astype(np.uint8))[0], engine.run({"x": x1}, mask=mask)[0])


def test_bad_threshold_and_dilation_are_refused(engine):
    engine.prime({"x": _x(0)})
    for value in (-1.0, np.nan, "big"):
        with pytest.raises(InputError, match=r"threshold must be"):
            engine.run({"x": _x(0)}, threshold=value)
    for value in (-1, 1.5, True):
        with pytest.raises(InputError, match=r"dilation must be an integer >= 0"):
            engine.run({"x": _x(0)}, dilation=value)


def test_run_before_prime_and_unknown_keys(engine):
    with pytest.raises(CacheError, match=r"no cache for key 'default': run\(\) before prime\(\)"):
        engine.run({"x": _x(0)})
    with pytest.raises(CacheError, match=r"no cache for key 7: run\(\) before prime\(\).*key=7"):
        engine.run({"x": _x(0)}, key=7)
    engine.prime({"x": _x(0)}, key="step-0")
    with pytest.raises(CacheError, match=r"unknown cache key 'step-1'; primed keys: \['step-0'\]"):
        engine.run({"x": _x(0)}, key="step-1")
    with pytest.raises(CacheError, match=r"not hashable"):
        engine.run({"x": _x(0)}, key=["step-0"])


def test_cache_bytes_of_an_unknown_key_raises_instead_of_hanging(engine):
    engine.prime({"x": _x(0)})
    result: list[BaseException | int] = []

    def ask() -> None:
        try:
            result.append(engine.cache_bytes("nope"))
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
            result.append(exc)

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "cache_bytes(key) deadlocked"
    assert isinstance(result[0], CacheError) and "'nope'" in str(result[0])
    assert engine.cache_bytes("default") == engine.cache_bytes() == engine.expected_entry_bytes()


def test_changed_non_spatial_input_is_refused(static_path):
    engine = sigec.load(static_path, threads=1)
    assert engine.input_names == ["x", "t"]
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((1, 2, 12, 12)).astype(np.float32)
    t0 = rng.standard_normal((1, 4, 1, 1)).astype(np.float32)
    engine.prime({"x": x0, "t": t0}, key="t0")
    x1 = x0.copy()
    x1[..., 2:4, 3:6] += 1.0
    with pytest.raises(InputError, match=r"input 't' differs from the value primed for key 't0'"):
        engine.run({"x": x1, "t": t0 + 1}, key="t0")
    with pytest.raises(InputError, match=r"missing input\(s\) \['t'\]"):
        engine.run({"x": x1}, key="t0")
    _assert_exact(engine.run({"x": x1, "t": t0}, key="t0"), engine.run_dense({"x": x1, "t": t0}))


# ----- 2. nothing lost ---------------------------------------------------------------------------

class _FailingRunner:
    """Wraps a runner; the call number ``fail_at`` (1-based) raises ``error``."""

    def __init__(self, inner, fail_at: int, error: BaseException) -> None:
        self.inner, self.fail_at, self.error, self.calls = inner, fail_at, error, 0
        self.input_names = inner.input_names

    def run(self, feeds, names):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return self.inner.run(feeds, names)


class _ShortUpdateRunner:
    """Returns one tile too few for the last update output (a backend returning a malformed update)."""

    def __init__(self, inner) -> None:
        self.inner, self.input_names = inner, inner.input_names

    def run(self, feeds, names):
        results = self.inner.run(feeds, names)
        if any(n.startswith("vals::") for n in names):
            results[-1] = results[-1][:-1]
        return results


def _replace_runner(engine, graph: str, runner) -> None:
    runners = dict(engine._runners)
    runners[graph] = runner
    engine._runners = runners


@pytest.mark.parametrize("update_cache", [False, True])
@pytest.mark.parametrize("error", [BackendError("injected"), RuntimeError("injected")])
def test_sparse_runner_failure_loses_nothing(engine, update_cache, error):
    x0 = _x(1)
    engine.prime({"x": x0})
    x1, mask = _edit(x0)
    reference = engine.run({"x": x1}, mask=mask)
    assert engine.stats.path == "sparse"
    before = _snapshot(engine)
    _replace_runner(engine, "sparse", _FailingRunner(engine._runners["sparse"], fail_at=2, error=error))
    engine.run({"x": x1}, mask=mask)  # call 1 succeeds
    with pytest.raises(BackendError, match="injected") as caught:  # call 2 fails
        engine.run({"x": x1}, mask=mask, update_cache=update_cache)
    if isinstance(error, RuntimeError):
        assert "SPARSE graph failed: RuntimeError" in str(caught.value)
    _assert_same_entry(engine, before)
    again = engine.run({"x": x1}, mask=mask)  # call 3: the engine still works, same result
    for a, b in zip(again, reference):
        np.testing.assert_array_equal(a, b)
    _assert_exact(again, engine.run_dense({"x": x1}))


@pytest.mark.parametrize("fail_after", [0, 1, 2])
@pytest.mark.parametrize("error", [MemoryError, KeyboardInterrupt])
def test_failure_in_the_write_phase_is_rolled_back(engine, monkeypatch, fail_after, error):
    x0 = _x(2)
    engine.prime({"x": x0})
    assert len(engine.manifest["updates"]) == 3
    x1, mask = _edit(x0, 14, 12, 6, 8)  # reaches the border tiles of the 40x40 caches
    before = _snapshot(engine)
    writes = []

    def flaky(base, vals, coords):
        if len(writes) == fail_after:
            scatter_tiles_inplace(base, vals[: len(vals) // 2], coords[: len(coords) // 2])  # a half-done write
            raise error("injected")
        writes.append(1)
        scatter_tiles_inplace(base, vals, coords)

    monkeypatch.setattr(engine, "_scatter", flaky)
    with pytest.raises(error):
        engine.run({"x": x1}, mask=mask, update_cache=True)
    _assert_same_entry(engine, before)
    monkeypatch.undo()
    updated = engine.run({"x": x1}, mask=mask, update_cache=True)
    _assert_exact(updated, engine.run_dense({"x": x1}))
    x2, mask2 = _edit(x1, 1, 1, 2, 2, delta=-0.4)
    _assert_exact(engine.run({"x": x2}, mask=mask2), engine.run_dense({"x": x2}))


def test_malformed_update_is_refused_before_any_write(engine):
    x0 = _x(3)
    engine.prime({"x": x0})
    x1, mask = _edit(x0)
    before = _snapshot(engine)
    _replace_runner(engine, "sparse", _ShortUpdateRunner(engine._runners["sparse"]))
    with pytest.raises(BackendError, match=r"update 'vals::mul14' for cache 'cache::mul14' has shape"):
        engine.run({"x": x1}, mask=mask, update_cache=True)
    _assert_same_entry(engine, before)


def test_bad_input_discovered_late_loses_nothing(static_path, monkeypatch):
    engine = sigec.load(static_path, threads=1)
    rng = np.random.default_rng(4)
    x0 = rng.standard_normal((1, 2, 12, 12)).astype(np.float32)
    t0 = rng.standard_normal((1, 4, 1, 1)).astype(np.float32)
    engine.prime({"x": x0, "t": t0})
    x1 = x0.copy()
    x1[..., 5:8, 5:8] -= 1.0
    before = _snapshot(engine)
    # the non-spatial check runs under the key's write lock, after the inputs were accepted
    with pytest.raises(InputError, match="input 't' differs"):
        engine.run({"x": x1, "t": t0 * 2}, update_cache=True)
    _assert_same_entry(engine, before)

    # an error raised while the tiles are computed (after the caches were read)
    def refuse(*args, **kwargs):
        raise InputError("injected: mask program refused the mask")

    monkeypatch.setattr(engine_module, "run_mask_program", refuse)
    with pytest.raises(InputError, match="injected"):
        engine.run({"x": x1, "t": t0}, update_cache=True)
    _assert_same_entry(engine, before)
    monkeypatch.undo()
    _assert_exact(engine.run({"x": x1, "t": t0}, update_cache=True), engine.run_dense({"x": x1, "t": t0}))


def test_failed_prime_keeps_the_previous_entry(engine):
    x0 = _x(5)
    engine.prime({"x": x0})
    before = _snapshot(engine)
    _replace_runner(engine, "full", _FailingRunner(engine._runners["full"], fail_at=1, error=RuntimeError("boom")))
    with pytest.raises(BackendError, match="FULL graph failed: RuntimeError: boom"):
        engine.prime({"x": _x(6)})
    _assert_same_entry(engine, before)
    _replace_runner(engine, "full", _FailingRunner(engine._runners["full"].inner, fail_at=1, error=BackendError("x")))
    with pytest.raises(BackendError):
        engine.prime({"x": _x(6)}, key="new")
    assert engine.cache_keys() == ["default"]


def test_dense_fallback_update_is_all_or_nothing(engine):
    x0 = _x(7)
    engine.prime({"x": x0})
    x1 = x0 + np.float32(0.3)
    full_mask = np.ones((SIZE, SIZE), bool)
    before = _snapshot(engine)
    _replace_runner(engine, "full", _FailingRunner(engine._runners["full"], fail_at=1, error=BackendError("injected")))
    with pytest.raises(BackendError, match="injected"):
        engine.run({"x": x1}, mask=full_mask, update_cache=True)
    _assert_same_entry(engine, before)
    out = engine.run({"x": x1}, mask=full_mask, update_cache=True)  # FULL call 2 succeeds
    assert engine.stats.path == "dense"
    _assert_exact(out, engine.run_dense({"x": x1}))
    reprimed = sigec.load(engine.path, threads=1)
    reprimed.prime({"x": x1})
    for name, value in reprimed._store.entry("default").tensors.items():
        np.testing.assert_array_equal(engine._store.entry("default").tensors[name], value)


def test_update_writes_only_the_active_tiles(engine):
    x0 = _x(8)
    engine.prime({"x": x0})
    x1, mask = _edit(x0, 0, 0, 2, 2)
    before = _snapshot(engine)
    _, _, tiles = engine.expected_macs(mask)
    engine.run({"x": x1}, mask=mask, update_cache=True)
    assert engine.stats.path == "sparse"
    (res,) = tiles.values()
    cells = np.zeros(res.grid.shape, bool)
    cells[tuple(res.coords.T)] = True
    active = np.kron(cells[0], np.ones((8, 8), bool))[:40, :40]
    assert 0 < active.sum() < active.size
    for name, value in before[0].items():
        now = engine._store.entry("default").tensors[name]
        np.testing.assert_array_equal(now[..., ~active], value[..., ~active])
    np.testing.assert_array_equal(engine._store.entry("default").inputs["x"], x1)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 19), w=st.integers(1, 19), tile=st.sampled_from([2, 4, 8]), seed=st.integers(0, 1000))
def test_gather_tiles_inverts_scatter(h, w, tile, seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((2, 3, h, w)).astype(np.float32)
    grid = (2, -(-h // tile), -(-w // tile))
    cells = np.argwhere(rng.random(grid) < 0.5)
    saved = gather_tiles(base, cells, tile)
    assert saved.shape == (len(cells), 3, tile, tile)
    copy = base.copy()
    scatter_tiles_inplace(copy, rng.standard_normal(saved.shape).astype(np.float32), cells)
    scatter_tiles_inplace(copy, saved, cells)
    np.testing.assert_array_equal(copy, base)


# ----- 4. memory bound ---------------------------------------------------------------------------

def test_least_recently_used_key_is_evicted(local_path):
    size = sigec.load(local_path).expected_entry_bytes()
    engine = sigec.load(local_path, threads=1, max_cache_bytes=int(2.5 * size))
    assert engine.max_cache_bytes == int(2.5 * size)
    for k in range(2):
        engine.prime({"x": _x(k)}, key=k)
    engine.prime({"x": _x(0)}, key=0)  # re-priming a key replaces it, counted once, and uses it
    assert engine.cache_keys() == [1, 0] and engine.cache_bytes() == 2 * size
    engine.prime({"x": _x(2)}, key=2)  # two entries fit: key 1, the least recently used, goes
    assert engine.cache_keys() == [0, 2]
    engine.run({"x": _x(0)}, key=0)  # a run uses key 0: key 2 is now the least recently used
    engine.prime({"x": _x(3)}, key=3)
    assert engine.cache_keys() == [0, 3]
    assert engine.cache_bytes() == 2 * size <= engine.max_cache_bytes
    with pytest.raises(CacheError, match=r"cache key 2 was evicted \(least recently used\).*prime it again"):
        engine.run({"x": _x(2)}, key=2)
    x1, mask = _edit(_x(0))
    _assert_exact(engine.run({"x": x1}, key=0), engine.run_dense({"x": x1}))
    engine.prime({"x": _x(2)}, key=2)  # an evicted key can be primed again
    assert engine.cache_keys() == [0, 2]


def test_entry_larger_than_the_bound_raises_and_changes_nothing(local_path):
    size = sigec.load(local_path).expected_entry_bytes()
    engine = sigec.load(local_path, threads=1, max_cache_bytes=size - 1)
    with pytest.raises(CacheError, match=rf"key 'big' needs {size} bytes .* more than max_cache_bytes = {size - 1} bytes"):
        engine.prime({"x": _x(0)}, key="big")
    assert engine.cache_keys() == []
    engine.max_cache_bytes = None
    for k in range(3):
        engine.prime({"x": _x(k)}, key=k)
    engine.max_cache_bytes = size  # lowering the bound evicts at once
    assert engine.cache_keys() == [2]
    engine.max_cache_bytes = size - 1  # no entry fits any more
    assert engine.cache_keys() == [] and engine.cache_bytes() == 0


@pytest.mark.parametrize("bad", [0, -5, 1.5, "10", True])
def test_max_cache_bytes_is_validated(local_path, bad):
    with pytest.raises(CacheError, match="max_cache_bytes must be a positive integer or None"):
        sigec.load(local_path, max_cache_bytes=bad)
