"""The run-side fixed costs: cache bindings (runtime/ort_binding.py), the vectorised mask program,
the finite-value check inside the mask, the phase split of ``engine.stats``, tools/run_overhead.py.

Engines use the ort backend; every run is forced onto the sparse path and the path is asserted.
Results are compared with the original model run by ONNX Runtime (exact mode: EXACT_TOLERANCE) and,
between the bound and the unbound path or concurrent and sequential runs, bit for bit (the same
session computes the same bits for the same feeds).
"""

from __future__ import annotations

import gc
import shutil
import threading
import weakref

import numpy as np
import pytest

import sigec
from helpers import (ALWAYS_SPARSE, EXACT_TOLERANCE, LOCAL_NET, always_sparse, engine_from_proto, load_tool,
                     ort_oracle, rel_err)
from random_nets import random_local_net
from sigec.core import mask_program
from sigec.core.errors import CacheError, InputError
from sigec.runtime.engine import PHASES
from sigec.runtime.ort_binding import CacheBindings

SIZE = LOCAL_NET["size"][0]
ORACLE = ort_oracle(random_local_net(**LOCAL_NET))


def _load(path, *, bind_caches: bool = True) -> sigec.Engine:
    engine = sigec.load(path, threads=1, dense_fallback_fraction=ALWAYS_SPARSE)
    engine.bind_caches = bind_caches
    return engine


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)


def _edit(x: np.ndarray, y: int, x0: int, h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``x`` with noise added in a rectangle, and the rectangle's mask."""
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y:y + h, x0:x0 + w] = True
    noise = np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
    return x + mask * noise, mask


def _assert_matches_oracle(outputs: list[np.ndarray], x: np.ndarray) -> None:
    for out, want in zip(outputs, ORACLE({"x": x})):
        assert rel_err(out, want) <= EXACT_TOLERANCE


def _entry(engine: sigec.Engine, key="default"):
    return engine._store.entry(key)


# ----- cache bindings -------------------------------------------------------------------------

def test_bound_runs_equal_unbound_runs_and_the_original_model(local_net_path):
    bound, unbound = _load(local_net_path), _load(local_net_path, bind_caches=False)
    x0 = _x(0)
    bound.prime({"x": x0})
    unbound.prime({"x": x0})
    for seed, rect in enumerate([(2, 3, 4, 5), (15, 15, 5, 5), (0, 0, 1, 1)]):
        x1, mask = _edit(x0, *rect, seed=seed)
        a, b = bound.run({"x": x1}, mask=mask), unbound.run({"x": x1}, mask=mask)
        assert bound.stats.path == unbound.stats.path == "sparse"
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
        _assert_matches_oracle(a, x1)
    assert isinstance(_entry(bound).bindings, CacheBindings) and _entry(bound).bindings.count == 1
    assert _entry(unbound).bindings is None, "bind_caches=False feeds the caches by name"


def test_reprime_replaces_the_bindings(local_net_path):
    engine = _load(local_net_path)
    x0, y0 = _x(1), _x(2)
    engine.prime({"x": x0})
    engine.run(_edit(x0, 4, 4, 3, 3)[0])
    first = _entry(engine).bindings
    assert first is not None
    engine.prime({"x": y0})  # same key, another original: runs must read the new caches
    y1, mask = _edit(y0, 4, 4, 3, 3)
    out = engine.run({"x": y1}, mask=mask)
    assert engine.stats.path == "sparse"
    assert _entry(engine).bindings is not first
    _assert_matches_oracle(out, y1)


def test_update_cache_resets_the_bindings(local_net_path):
    engine = _load(local_net_path)
    x0 = _x(3)
    engine.prime({"x": x0})
    x1, mask = _edit(x0, 0, 0, 5, 5)
    engine.run({"x": x1}, mask=mask)
    assert _entry(engine).bindings is not None
    engine.run({"x": x1}, mask=mask, update_cache=True)  # sparse update: caches written in place
    assert engine.stats.path == "sparse" and _entry(engine).bindings is None
    x2, mask2 = _edit(x1, 14, 14, 5, 5, seed=1)  # reads the top-left from the updated caches
    out = engine.run({"x": x2}, mask=mask2)
    assert _entry(engine).bindings is not None
    _assert_matches_oracle(out, x2)

    # A dense-path update replaces every cache array: the bindings must not read the old ones.
    engine.dense_fallback_fraction = 0.0
    x3 = x2 + np.float32(0.25)
    engine.run({"x": x3}, mask=np.ones((SIZE, SIZE), bool), update_cache=True)
    assert engine.stats.path == "dense" and _entry(engine).bindings is None
    engine.dense_fallback_fraction = ALWAYS_SPARSE
    x4, mask4 = _edit(x3, 8, 8, 3, 3, seed=2)
    out = engine.run({"x": x4}, mask=mask4)
    assert engine.stats.path == "sparse"
    _assert_matches_oracle(out, x4)


def test_eviction_and_drop_free_the_bindings(local_net_path):
    engine = _load(local_net_path)
    x0 = _x(4)
    engine.prime({"x": x0}, key="a")
    engine.max_cache_bytes = engine.cache_bytes("a") + 1  # room for one key
    engine.run(_edit(x0, 2, 2, 3, 3)[0], key="a")
    bindings = weakref.ref(_entry(engine, "a").bindings)
    engine.prime({"x": _x(5)}, key="b")  # evicts "a"
    gc.collect()
    assert bindings() is None, "an evicted key's bindings are freed with its entry"
    with pytest.raises(CacheError, match="evicted"):
        engine.run(_edit(x0, 2, 2, 3, 3)[0], key="a")
    engine.run(_edit(x0, 2, 2, 3, 3)[0], key="b")
    dropped = weakref.ref(_entry(engine, "b").bindings)
    engine.drop("b")
    gc.collect()
    assert dropped() is None, "a dropped key's bindings are freed with its entry"
    engine.prime({"x": x0}, key="a")
    x1, mask = _edit(x0, 2, 2, 3, 3)
    _assert_matches_oracle(engine.run({"x": x1}, mask=mask, key="a"), x1)


def test_concurrent_runs_on_one_key_equal_sequential_runs(local_net_path):
    threads, runs = 6, 12
    engine = _load(local_net_path)
    x0 = _x(6)
    engine.prime({"x": x0})
    rng = np.random.default_rng(7)
    plans = []
    for t in range(threads):
        plans.append([_edit(x0, *(int(v) for v in rng.integers(0, SIZE - 4, 2)), 4, 4, seed=100 * t + r)
                      for r in range(runs)])
    sequential = [[engine.run({"x": x}, mask=m) for x, m in plan] for plan in plans]
    assert engine.stats.path == "sparse"
    results: list[list] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for x, m in plans[t]:
                results[t].append(engine.run({"x": x}, mask=m))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not errors and not any(w.is_alive() for w in workers)
    for got, want in zip(results, sequential):
        for a, b in zip(got, want):
            for u, v in zip(a, b):
                np.testing.assert_array_equal(u, v)
    count = _entry(engine).bindings.count
    assert 1 <= count <= threads, "one binding per concurrent run at most, reused afterwards"
    x1, mask = plans[0][0]
    _assert_matches_oracle(results[0][0], x1)


class _FailingSession:
    """A session whose ``run_with_iobinding`` raises once."""

    def __init__(self, session) -> None:
        self.session, self.fail = session, True

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run_with_iobinding(self, binding):
        if self.fail:
            self.fail = False
            raise RuntimeError("injected")
        return self.session.run_with_iobinding(binding)


def test_a_failed_bound_run_drops_its_binding_and_missing_inputs_are_refused(local_net_path):
    engine = _load(local_net_path)
    x0 = _x(8)
    engine.prime({"x": x0})
    caches = _entry(engine).tensors
    session = _FailingSession(engine._runners["sparse"].session)
    bindings = CacheBindings(session, caches)
    x1, mask = _edit(x0, 3, 3, 4, 4)
    _, _, tiles = engine.expected_macs(mask)
    feeds = {"x": x1, **engine._tile_feeds(tiles)}
    with pytest.raises(RuntimeError, match="injected"):
        bindings.run(feeds, engine.output_names)
    assert bindings.count == 0, "the binding of a failed run is not reused"
    out = bindings.run(feeds, engine.output_names)
    assert bindings.count == 1
    _assert_matches_oracle(out, x1)
    with pytest.raises(ValueError, match="neither caches nor given"):
        bindings.run({"x": x1}, engine.output_names)
    assert bindings.count == 1


# ----- mask program ---------------------------------------------------------------------------

def _resample_reference(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Per output cell: any input pixel in the cell's interval [j*n/size, (j+1)*n/size) (at least one)."""
    b, h, w = mask.shape
    out = np.zeros((b, *size), bool)
    for j in range(size[0]):
        y0, y1 = j * h // size[0], max(-(-(j + 1) * h // size[0]), j * h // size[0] + 1)
        for i in range(size[1]):
            x0, x1 = i * w // size[1], max(-(-(i + 1) * w // size[1]), i * w // size[1] + 1)
            out[:, j, i] = mask[:, y0:y1, x0:x1].any(axis=(1, 2))
    return out


def _transpose_reference(mask: np.ndarray, kernel, stride, pads, size) -> np.ndarray:
    out = np.zeros((mask.shape[0], *size), bool)
    for b, y, x in zip(*np.nonzero(mask)):
        for ky in range(kernel[0]):
            for kx in range(kernel[1]):
                oy, ox = y * stride[0] - pads[0] + ky, x * stride[1] - pads[1] + kx
                if 0 <= oy < size[0] and 0 <= ox < size[1]:
                    out[b, oy, ox] = True
    return out


@pytest.mark.parametrize("seed", range(12))
def test_mask_program_steps_match_per_cell_references(seed):
    rng = np.random.default_rng(seed)
    batch, h, w = int(rng.integers(1, 3)), int(rng.integers(1, 30)), int(rng.integers(1, 30))
    mask = rng.random((batch, h, w)) < rng.choice([0.0, 0.03, 0.3])
    for size in [(h, w), (max(h // 2, 1), max(w // 3, 1)), (2 * h, 3 * w), (int(rng.integers(1, 40)), int(rng.integers(1, 40)))]:
        got = mask_program.run_instructions([{"op": "resample", "src": "input", "out": "m", "size": list(size)}], mask)["m"]
        np.testing.assert_array_equal(got, _resample_reference(mask, size), err_msg=f"resample to {size}")
    tile = int(rng.integers(1, 9))
    index = mask_program.tile_index(mask, tile)
    cells = np.zeros(index.grid.shape, bool)
    for b, ty, tx in np.ndindex(*index.grid.shape):
        cells[b, ty, tx] = mask[b, ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile].any()
    np.testing.assert_array_equal(index.coords, np.argwhere(cells))
    assert index.coords.dtype == np.int64 and index.coords.shape[1] == 3
    np.testing.assert_array_equal(index.grid[cells], np.arange(index.count))
    assert (index.grid[~cells] == -1).all()
    kernel, stride, pads = (3, 2), (2, 2), [1, 0, 1, 0]
    size = ((h - 1) * 2 - 2 + 3, (w - 1) * 2 + 2)
    got = mask_program.run_instructions([{"op": "transpose_window", "src": "input", "out": "m", "kernel": kernel,
                                          "stride": stride, "pads": pads, "size": size}], mask)["m"]
    np.testing.assert_array_equal(got, _transpose_reference(mask, kernel, stride, pads, size))


# ----- finite values inside the mask ----------------------------------------------------------

def test_non_finite_values_are_checked_in_the_active_tiles_only_on_the_sparse_path():
    size = 24
    engine = always_sparse(engine_from_proto(random_local_net(2, depth=4, size=(size, size)), tile_size=4, backend="ort"))
    x0 = np.random.default_rng(9).standard_normal((1, *engine.manifest["inputs"][0]["shape"][1:])).astype(np.float32)
    engine.prime({"x": x0})
    mask = np.zeros((size, size), bool)
    mask[1:4, 1:4] = True
    x1 = x0 + mask
    _, _, tiles = engine.expected_macs(mask)
    res = next(r for r in engine.manifest["resolutions"] if r["size"] == [size, size])
    tile, index = int(res["tile"]), tiles[res["name"]]
    idle = np.argwhere(index.grid[0] < 0)
    assert len(idle), "the test needs a tile the edit does not reach"
    y, x = (int(v) * tile for v in idle[-1])
    outside = x1.copy()
    outside[0, 0, y, x] = np.nan  # outside the mask: the mask's contract says it equals the primed value
    engine.run({"x": outside}, mask=mask)
    assert engine.stats.path == "sparse"
    inside = x1.copy()
    inside[0, 0, 3, 2] = np.inf
    inside[0, 0, 3, 1] = np.inf
    with pytest.raises(InputError, match=r"input 'x' contains 2 NaN or Inf value\(s\) inside the edited region "
                                         r"\(rows 0\.\.\d+, columns 0\.\.\d+\), the first at index \(0, 0, 3, 1\)"):
        engine.run({"x": inside}, mask=mask)
    # Everything is checked where the whole input is read or kept: without a mask, with update_cache,
    # and on the dense path.
    whole = rf"contains 1 NaN or Inf value\(s\), the first at index \(0, 0, {y}, {x}\)"
    with pytest.raises(InputError, match=whole):
        engine.run({"x": outside})
    with pytest.raises(InputError, match=whole):
        engine.run({"x": outside}, mask=mask, update_cache=True)
    engine.dense_fallback_fraction = 0.0
    with pytest.raises(InputError, match=whole):
        engine.run({"x": outside}, mask=mask)
    # a float64 input is converted, which reads it all: checked wholly, with the conversion named
    with pytest.raises(InputError, match="after conversion from float64 to float32"):
        engine.run({"x": outside.astype(np.float64)}, mask=mask)


def test_without_a_resolution_of_the_input_size_the_whole_input_is_checked(local_net_path):
    engine = _load(local_net_path)
    assert all(r["size"] != [SIZE, SIZE] for r in engine.manifest["resolutions"])
    x0 = _x(9)
    engine.prime({"x": x0})
    x1, mask = _edit(x0, 1, 1, 3, 3)
    x1[0, 0, SIZE - 1, SIZE - 1] = np.nan
    with pytest.raises(InputError, match=rf"contains 1 NaN or Inf value\(s\), the first at index \(0, 0, {SIZE - 1}, "
                                         rf"{SIZE - 1}\)"):
        engine.run({"x": x1}, mask=mask)


# ----- phases and the tool --------------------------------------------------------------------

def test_stats_split_the_wall_time_into_phases(local_net_path):
    engine = _load(local_net_path)
    x0 = _x(10)
    engine.prime({"x": x0})
    x1, mask = _edit(x0, 5, 5, 3, 3)
    for kwargs, path in [({"mask": mask}, "sparse"), ({"mask": np.zeros_like(mask)}, "empty"), ({}, "sparse")]:
        engine.run({"x": x1}, **kwargs)
        stats = engine.stats
        assert stats.path == path
        assert set(stats.phases_ms) <= set(PHASES)
        assert 0.0 < sum(stats.phases_ms.values()) <= stats.wall_ms
        if path == "sparse":
            assert {"validate", "mask", "tiles", "feeds", "execute", "finish"} <= set(stats.phases_ms)


def test_run_overhead_tool_reports_both_variants(zoo_engine_path, tmp_path, capsys):
    folder = tmp_path / "engines"
    folder.mkdir()
    shutil.copy(zoo_engine_path("tiny_local", "exact"), folder / "tiny_local_exact.sigec")
    tool = load_tool("run_overhead")
    assert tool.main(["--models", "tiny_local", "--mode", "exact", "--runs", "1", "--edits", "0", "0.05",
                      "--threads", "1", "--engine-dir", str(folder), "--feeds", "3"]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) == 8, printed  # 2 edits x 2 variants, in the main and the phase tables
    assert "| 0.0% | empty | bound |" in printed and "| 5.0% | sparse | unbound |" in printed
    assert any(line.startswith("| 3 | ") for line in printed.splitlines()), printed  # the feeding table
