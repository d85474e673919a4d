"""The Engine's parts on their own: the entry lock, the cache store, input validation, tile moves, costs."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sigec.core.errors import CacheError, InputError
from sigec.core.mask_program import TileIndex
from sigec.runtime import costs
from sigec.runtime.cache_store import DEFAULT_KEY, EVICTED_MEMORY, CacheEntry, CacheStore, resolve_key
from sigec.runtime.input_validation import (check_mask_options, check_static_inputs, validate_input,
                                            validate_inputs)
from sigec.runtime.rwlock import ReadWriteLock
from sigec.runtime.tiles import gather_tiles, scatter_tiles_inplace, split_tiles

WAIT = 0.2  # seconds a blocked thread is given to (wrongly) get through


def _start(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


# ----- readers-writer lock -----------------------------------------------------------------------

def test_readers_share_the_lock():
    lock = ReadWriteLock()
    lock.acquire_read()
    inside = threading.Event()

    def reader() -> None:
        lock.acquire_read()
        inside.set()
        lock.release_read()

    _start(reader).join(5)
    assert inside.is_set(), "a second reader waited for the first"
    lock.release_read()


@pytest.mark.parametrize("second", ["read", "write"])
def test_a_writer_excludes_everyone(second):
    lock = ReadWriteLock()
    lock.acquire_write()
    inside = threading.Event()

    def other() -> None:
        lock.acquire(write=second == "write")
        inside.set()
        lock.release(write=second == "write")

    thread = _start(other)
    assert not inside.wait(WAIT), f"a {second}er got in while a writer held the lock"
    lock.release_write()
    thread.join(5)
    assert inside.is_set()


def test_a_reader_excludes_writers():
    lock = ReadWriteLock()
    lock.acquire_read()
    inside = threading.Event()

    def writer() -> None:
        lock.acquire_write()
        inside.set()
        lock.release_write()

    thread = _start(writer)
    assert not inside.wait(WAIT)
    lock.release_read()
    thread.join(5)
    assert inside.is_set()


def test_a_waiting_writer_goes_before_new_readers():
    lock = ReadWriteLock()
    lock.acquire_read()  # a reader inside
    order: list[str] = []

    def writer() -> None:
        lock.acquire_write()
        order.append("writer")
        lock.release_write()

    def late_reader() -> None:
        lock.acquire_read()
        order.append("reader")
        lock.release_read()

    w = _start(writer)
    time.sleep(WAIT)  # the writer is now waiting for the first reader
    r = _start(late_reader)
    time.sleep(WAIT)
    assert order == [], "the late reader got in ahead of the waiting writer"
    lock.release_read()
    w.join(5)
    r.join(5)
    assert order == ["writer", "reader"]


# ----- cache store -------------------------------------------------------------------------------

ENTRY_BYTES = 3 * 64 * 4  # one input, one output, one cache of 64 float32 each


def _entry(value: float = 0.0) -> CacheEntry:
    def a() -> np.ndarray:
        return np.full(64, value, np.float32)
    return CacheEntry(inputs={"x": a()}, outputs=[a()], tensors={"cache::c": a()})


def test_entry_bytes_count_inputs_outputs_and_caches():
    assert _entry().nbytes == ENTRY_BYTES


def test_least_recently_used_keys_are_evicted_in_order():
    store = CacheStore(max_bytes=int(2.5 * ENTRY_BYTES))
    store.install("a", _entry())
    store.install("b", _entry())
    assert store.keys() == ["a", "b"] and store.nbytes() == 2 * ENTRY_BYTES
    store.install("a", _entry(1.0))  # re-installing replaces, counted once, and marks "a" used
    assert store.keys() == ["b", "a"] and store.nbytes() == 2 * ENTRY_BYTES
    store.install("c", _entry())  # "b" is the least recently used
    assert store.keys() == ["a", "c"]
    entry = store.acquire("a", write=False)  # a run uses "a": "c" is now the least recently used
    entry.lock.release(write=False)
    store.install("d", _entry())
    assert store.keys() == ["a", "d"]
    with pytest.raises(CacheError, match=r"cache key 'c' was evicted \(least recently used\).*prime it again"):
        store.acquire("c", write=False)
    store.install("c", _entry())  # an evicted key can come back
    assert store.keys() == ["d", "c"]


def test_lowering_the_bound_evicts_at_once_and_check_fits_refuses_big_entries():
    store = CacheStore()
    for key in "abc":
        store.install(key, _entry())
    store.max_bytes = 2 * ENTRY_BYTES
    assert store.keys() == ["b", "c"]
    store.check_fits("x", 2 * ENTRY_BYTES)
    with pytest.raises(CacheError, match=rf"key 'x' needs {2 * ENTRY_BYTES + 1} bytes .* max_cache_bytes = "
                                         rf"{2 * ENTRY_BYTES} bytes"):
        store.check_fits("x", 2 * ENTRY_BYTES + 1)
    for bad in (0, -1, 1.5, "10", True):
        with pytest.raises(CacheError, match="max_cache_bytes must be a positive integer or None"):
            store.max_bytes = bad
    assert store.max_bytes == 2 * ENTRY_BYTES


def test_evicted_keys_are_remembered_up_to_a_limit():
    store = CacheStore(max_bytes=ENTRY_BYTES)
    for key in range(EVICTED_MEMORY + 2):
        store.install(key, _entry())
    assert store.keys() == [EVICTED_MEMORY + 1]
    with pytest.raises(CacheError, match="cache key 1 was evicted"):
        store.entry(1)
    with pytest.raises(CacheError, match=r"unknown cache key 0; primed keys: \[257\]"):
        store.entry(0)  # the oldest eviction is forgotten


def test_unknown_keys_dropped_keys_and_key_resolution():
    store = CacheStore()
    with pytest.raises(CacheError, match=r"no cache for key 'default': run\(\) before prime\(\)"):
        store.nbytes(DEFAULT_KEY)
    store.install("a", _entry())
    store.drop("a")
    store.drop("never")  # dropping an unknown key does nothing
    assert store.keys() == []
    assert resolve_key(None) == DEFAULT_KEY and resolve_key(("t", 3)) == ("t", 3)
    with pytest.raises(CacheError, match="not hashable"):
        resolve_key(["a"])


def test_acquire_starts_over_on_the_entry_that_replaced_the_one_it_waited_for():
    store = CacheStore()
    old, new = _entry(0.0), _entry(1.0)
    store.install("k", old)
    old.lock.acquire_write()  # an update in progress on the old entry
    got: list[CacheEntry] = []
    reader = _start(lambda: got.append(store.acquire("k", write=False)))
    time.sleep(WAIT)  # the reader now waits for the old entry's lock
    installer = _start(lambda: store.install("k", new))  # a re-prime, also waiting for the old entry
    time.sleep(WAIT)
    assert got == [] and store.entry("k") is old
    old.lock.release_write()
    installer.join(5)
    reader.join(5)
    # the waiting writer (the install) went first; the reader then found "k" replaced and started over
    assert store.entry("k") is new
    assert len(got) == 1 and got[0] is new
    new.lock.release_read()
    entry = store.acquire("k", write=True)  # nothing holds either lock any more
    assert entry is new
    entry.lock.release(write=True)


# ----- input validation --------------------------------------------------------------------------

SPEC_X = {"name": "x", "shape": [1, 3, 4, 4], "dtype": "float32", "spatial": True}
SPEC_T = {"name": "t", "shape": [1], "dtype": "int64", "spatial": False}


@pytest.mark.parametrize("have", ["float64", "float16", "float32"])
def test_floats_convert_to_a_float_input(have):
    value = np.linspace(-2, 2, 48).reshape(1, 3, 4, 4).astype(have)
    got = validate_input("x", value, SPEC_X)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, value.astype(np.float32))


@pytest.mark.parametrize("have", ["uint8", "int8", "int32", "int64", "uint16", "bool"])
def test_integer_or_bool_data_for_a_float_input_is_refused(have):
    value = np.ones((1, 3, 4, 4), have)
    with pytest.raises(InputError, match=rf"input 'x' has dtype {have}, expected float32; sigec does not convert "
                                         rf"integer or boolean data.*arr\.astype\(np\.float32\), scaled as the "
                                         rf"model expects"):
        validate_input("x", value, SPEC_X)


@pytest.mark.parametrize("have", ["int64", "int32", "int8", "uint8"])
def test_integers_convert_to_an_integer_input(have):
    got = validate_input("t", np.array([7], have), SPEC_T)
    assert got.dtype == np.int64 and got.tolist() == [7]


@pytest.mark.parametrize("have", ["float32", "float64", "bool", "complex64", "<U1"])
def test_non_integers_for_an_integer_input_are_refused(have):
    with pytest.raises(InputError, match=rf"input 't' has dtype {have}, expected int64 \(or a numeric dtype"):
        validate_input("t", np.ones(1, have), SPEC_T)


def test_inputs_by_name_or_in_order():
    x, t = np.zeros((1, 3, 4, 4), np.float32), np.array([3])
    by_name = validate_inputs({"t": t, "x": x}, [SPEC_X, SPEC_T])
    in_order = validate_inputs([x, t], [SPEC_X, SPEC_T])
    assert list(in_order) == ["x", "t"]
    for name in ("x", "t"):
        np.testing.assert_array_equal(by_name[name], in_order[name])
    assert list(validate_inputs(x, [SPEC_X])) == ["x"]  # one array for a one-input engine
    with pytest.raises(InputError, match=r"missing input\(s\) \['t'\]"):
        validate_inputs({"x": x}, [SPEC_X, SPEC_T])
    with pytest.raises(InputError, match=r"expected 2 inputs \(\['x', 't'\]\), got 1"):
        validate_inputs([x], [SPEC_X, SPEC_T])
    with pytest.raises(InputError, match=r"input 'x' contains 1 NaN or Inf value\(s\), the first at index "
                                         r"\(0, 2, 3, 1\)"):
        bad = x.copy()
        bad[0, 2, 3, 1] = np.nan
        validate_inputs([bad, t], [SPEC_X, SPEC_T])


def test_mask_options_and_static_inputs():
    check_mask_options(0.0, 0)
    check_mask_options(None, None)
    for threshold in (-0.1, np.inf, "x"):
        with pytest.raises(InputError, match="threshold must be"):
            check_mask_options(threshold, None)
    for dilation in (-1, 2.0, False):
        with pytest.raises(InputError, match="dilation must be an integer >= 0"):
            check_mask_options(None, dilation)
    primed = {"x": np.zeros(2), "t": np.array([5])}
    check_static_inputs({"x": np.ones(2), "t": np.array([5])}, primed, ["x"], "k")  # spatial inputs may change
    with pytest.raises(InputError, match=r"input 't' differs from the value primed for key 'k'"):
        check_static_inputs({"x": np.zeros(2), "t": np.array([6])}, primed, ["x"], "k")


# ----- inner / border tile split -----------------------------------------------------------------

def _oracle_rect(coord: np.ndarray, tile: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the part of tile ``coord`` inside the map, clipped with plain min()."""
    _, ty, tx = (int(v) for v in coord)
    return ty * tile, min(ty * tile + tile, height), tx * tile, min(tx * tile + tile, width)


def _padded(base: np.ndarray, tile: int) -> np.ndarray:
    """``base`` zero-padded on the bottom and right to a whole number of tiles."""
    b, c, h, w = base.shape
    out = np.zeros((b, c, -(-h // tile) * tile, -(-w // tile) * tile), base.dtype)
    out[:, :, :h, :w] = base
    return out


def _random_case(h: int, w: int, tile: int, seed: int):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((2, 3, h, w)).astype(np.float32)
    coords = np.argwhere(rng.random((2, -(-h // tile), -(-w // tile))) < 0.6).astype(np.int64)
    rng.shuffle(coords)  # any order, not only the sorted order of tile_index
    vals = rng.standard_normal((len(coords), 3, tile, tile)).astype(np.float32)
    return base, coords, vals


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 21), w=st.integers(1, 21), tile=st.sampled_from([1, 2, 3, 4, 8]), seed=st.integers(0, 10 ** 6))
def test_split_gather_and_scatter_match_a_padded_oracle(h, w, tile, seed):
    base, coords, vals = _random_case(h, w, tile, seed)
    split = split_tiles(coords, tile, base.shape)
    # the split: inner iff the whole tile lies inside the map; border tiles clipped to the map
    for n, coord in enumerate(coords):
        y0, y1, x0, x1 = _oracle_rect(coord, tile, h, w)
        assert split.inner[n] == (y1 - y0 == tile and x1 - x0 == tile)
    assert [t.index for t in split.border] == np.nonzero(~split.inner)[0].tolist()
    for t in split.border:
        y0, y1, x0, x1 = _oracle_rect(coords[t.index], tile, h, w)
        assert (t.batch, t.rows, t.cols) == (coords[t.index][0], slice(y0, y1), slice(x0, x1))
    # gather: the tiles of the zero-padded map
    padded = _padded(base, tile)
    want = np.stack([padded[b, :, ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile] for b, ty, tx in coords]) \
        if len(coords) else np.zeros((0, 3, tile, tile), np.float32)
    np.testing.assert_array_equal(gather_tiles(base, coords, tile), want)
    # scatter: write into the padded map, crop back
    for n, (b, ty, tx) in enumerate(coords):
        padded[b, :, ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile] = vals[n]
    got = base.copy()
    scatter_tiles_inplace(got, vals, coords)
    np.testing.assert_array_equal(got, padded[:, :, :h, :w])


def test_split_edge_cases():
    shape = (1, 2, 8, 12)
    whole = split_tiles(np.argwhere(np.ones((1, 2, 3), bool)), 4, shape)  # multiples of the tile: no border
    assert whole.inner.all() and whole.border == [] and (whole.full_rows, whole.full_cols) == (2, 3)
    small = split_tiles(np.array([[0, 0, 0]]), 16, shape)  # a map smaller than one tile: all border
    assert not small.inner.any() and (small.border[0].height, small.border[0].width) == (8, 12)
    empty = split_tiles(np.zeros((0, 3), np.int64), 4, shape)
    assert empty.inner.shape == (0,) and empty.border == []
    for bad in ([[0, 2, 0]], [[1, 0, 0]], [[0, 0, -1]]):
        with pytest.raises(ValueError, match=r"outside the tile grid \[1, 2, 3\]"):
            split_tiles(np.array(bad), 4, shape)


def test_scatter_writes_through_a_strided_view_and_gather_reads_one():
    parent = np.zeros((1, 2, 10, 16), np.float32)
    view = parent[:, :, :, 2:13]  # 10 x 11, not contiguous: tiles of 4 leave border tiles on both sides
    coords = np.array([[0, 0, 0], [0, 2, 2], [0, 1, 2]])
    vals = np.arange(3 * 2 * 16, dtype=np.float32).reshape(3, 2, 4, 4) + 1
    scatter_tiles_inplace(view, vals, coords)
    assert parent[:, :, :, :2].sum() == 0 and parent[:, :, :, 13:].sum() == 0
    np.testing.assert_array_equal(parent[0, :, 0:4, 2:6], vals[0])
    np.testing.assert_array_equal(parent[0, :, 8:10, 10:13], vals[1, :, :2, :3])
    # a border tile reads back with zeros past the border
    np.testing.assert_array_equal(gather_tiles(view, coords, 4)[2], np.pad(vals[2, :, :, :3], ((0, 0), (0, 0), (0, 1))))


# ----- costs -------------------------------------------------------------------------------------

def test_node_costs_add_up_to_the_run_cost():
    nodes = [{"kind": "sparse", "resolution": "r8", "macs_per_tile": 5, "dense_macs": 320},
             {"kind": "approx", "resolution": "r4", "macs_per_tile": 3, "dense_macs": 48},
             {"kind": "dense", "dense_macs": 100},
             {"kind": "static", "dense_macs": 1000},
             {"kind": "sparse", "resolution": "r2", "macs_per_tile": 7}]  # no tiles of r2 this run
    tiles = {"r8": TileIndex(np.zeros((4, 3), np.int64), np.zeros((1, 2, 2), np.int64)),
             "r4": TileIndex(np.zeros((2, 3), np.int64), np.zeros((1, 4, 4), np.int64))}
    model = costs.CostModel(nodes)
    assert model.dense == costs.dense_macs(nodes) == 320 + 48 + 100
    assert model.executed(tiles) == costs.executed_macs(nodes, tiles) == 5 * 4 + 3 * 2 + 100
    assert [costs.node_macs(n, tiles) for n in nodes] == [20, 6, 100, 0, 0]


def test_an_interrupted_writer_does_not_leave_readers_waiting():
    """A writer interrupted while waiting must wake the readers it was holding back."""
    import threading
    import time

    from sigec.runtime.rwlock import ReadWriteLock

    lock = ReadWriteLock()
    lock.acquire_read()  # a reader inside: the writer has to wait
    real_wait, go = lock._cond.wait, threading.Event()
    writer_failed, reader_in = threading.Event(), threading.Event()

    def wait(timeout=None):
        if threading.current_thread().name != "writer":
            return real_wait(timeout)
        lock._cond.release()  # what Condition.wait does, then an interruption
        try:
            go.wait(5)
        finally:
            lock._cond.acquire()
        raise KeyboardInterrupt

    def writer() -> None:
        try:
            lock.acquire_write()
        except KeyboardInterrupt:
            writer_failed.set()

    def reader() -> None:
        lock.acquire_read()
        reader_in.set()
        lock.release_read()

    lock._cond.wait = wait
    threading.Thread(target=writer, name="writer").start()
    time.sleep(0.2)  # the writer is waiting now
    reader_thread = threading.Thread(target=reader)
    reader_thread.start()
    time.sleep(0.2)  # the reader waits behind the writer
    assert not reader_in.is_set()
    go.set()
    assert writer_failed.wait(5)
    assert reader_in.wait(2), "the reader still waits for a writer that is gone"
    lock.release_read()
    reader_thread.join(5)
    lock.acquire_write()  # the lock is still usable
    lock.release_write()


def test_integer_data_outside_the_declared_integer_range_is_refused():
    """int64 data for an int32 input converts when it fits and is refused when it would wrap."""
    from sigec.core.errors import InputError
    from sigec.runtime.input_validation import validate_input

    spec = {"dtype": "int32", "shape": [1]}
    assert validate_input("t", np.array([7], np.int64), spec).dtype == np.int32
    with pytest.raises(InputError, match=r"'t' holds values in \[4294967296, 4294967296\].*int32"):
        validate_input("t", np.array([2**32], np.int64), spec)
    with pytest.raises(InputError, match="uint8"):
        validate_input("t", np.array([-1], np.int64), {"dtype": "uint8", "shape": [1]})
