"""Device-resident caches (runtime/device_mirror.py): uploaded once, refreshed after update_cache, freed with the key.

On this CPU-only machine the mirror is forced on with the CPU as its "device" (it then copies, as a
GPU upload would), so every path the CUDA engine takes is exercised.
"""

import gc

import numpy as np
import onnx
import pytest

from helpers import ALWAYS_SPARSE, EXACT_TOLERANCE, ort_oracle, rel_err
from random_nets import random_local_net
from sigec.compiler import engine_graphs
from sigec.frontends.onnx_frontend import load_onnx
from sigec.passes.sparse_rewrite import rewrite
from sigec.runtime.backends import TorchRunner
from sigec.runtime.device_mirror import DeviceMirror
from sigec.runtime.engine import Engine


def test_mirror_uploads_once_forgets_on_request_and_frees_with_the_array():
    mirror = DeviceMirror(lambda a: a.copy())
    a, b = np.zeros(4, np.float32), np.ones(4, np.float32)
    first = mirror.get(a)
    assert mirror.get(a) is first and mirror.uploads == 1
    mirror.get(b)
    assert mirror.uploads == 2 and len(mirror) == 2
    a[:] = 5.0
    assert float(mirror.get(a)[0]) == 0.0, "a changed host array keeps its stale copy until forgotten"
    mirror.forget([a])
    assert float(mirror.get(a)[0]) == 5.0 and mirror.uploads == 3
    del b
    gc.collect()
    assert len(mirror) == 1, "the copy of a collected array is dropped"


PROTO = random_local_net(5, depth=5, size=(24, 24))


@pytest.fixture
def resident_engine():
    """An exact-mode engine on the PyTorch runner with device-resident caches, always on the sparse path."""
    result = rewrite(load_onnx(PROTO), mode="exact", tile_size=4)
    graphs, weights = engine_graphs(result)
    runners = {k: TorchRunner(onnx.ModelProto.FromString(v), weights, resident_caches=True) for k, v in graphs.items()}
    engine = Engine(result.manifest, runners, dense_fallback_fraction=ALWAYS_SPARSE)
    name = engine.input_names[0]
    shape = next(i["shape"] for i in engine.manifest["inputs"] if i["name"] == name)
    return engine, name, shape


def _edited(x, rows, cols, rng):
    y = x.copy()
    y[:, :, rows, cols] += rng.standard_normal(y[:, :, rows, cols].shape).astype(np.float32)
    return y


def test_engine_reuses_device_caches_and_refreshes_them_after_update_cache(resident_engine):
    engine, name, shape = resident_engine
    oracle = ort_oracle(PROTO)
    mirror = engine._runners["sparse"].mirror
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(shape).astype(np.float32)
    engine.prime({name: x0})
    x1 = _edited(x0, slice(2, 6), slice(3, 7), rng)
    out = engine.run({name: x1})[0]
    assert engine.stats.path == "sparse"
    assert rel_err(out, oracle({name: x1})[0]) <= EXACT_TOLERANCE
    uploaded = mirror.uploads
    assert uploaded == sum(1 for c in engine.manifest["caches"]) > 0
    engine.run({name: _edited(x0, slice(10, 12), slice(10, 12), rng)})
    assert mirror.uploads == uploaded, "a second run reuses the device copies"

    # Make an edit in the top-left corner the new original, then edit only the bottom-right corner:
    # the second run reads the top-left from the caches, which must be the updated ones.
    x2 = _edited(x0, slice(0, 5), slice(0, 5), rng)
    engine.run({name: x2}, update_cache=True)
    x3 = _edited(x2, slice(19, 24), slice(19, 24), rng)
    mask = np.zeros(shape[2:], bool)
    mask[19:24, 19:24] = True
    out = engine.run({name: x3}, mask=mask)[0]
    assert engine.stats.path == "sparse"
    assert rel_err(out, oracle({name: x3})[0]) <= EXACT_TOLERANCE
    without_update = x3.copy()
    without_update[..., :5, :5] = x0[..., :5, :5]
    assert rel_err(out, oracle({name: without_update})[0]) > 100 * EXACT_TOLERANCE, "stale caches would fail here"
    assert mirror.uploads > uploaded, "the caches update_cache wrote were uploaded again"

    engine.drop()
    gc.collect()
    assert len(mirror) == 0, "dropping the key frees its device copies"
