"""Approx mode on a small UNet (GroupNorm, residuals, attention): bounded error that vanishes with the edit."""

import numpy as np
import onnx
import pytest

from helpers import engine_from_proto, rel_l2

# Relative L2 error bounds of sparse vs dense for a square noise edit of the given side on the
# 32x32 input. Measured (random weights, seed 0): 0.287, 0.130, 0.051, 0.014. Most of the error is
# the attention island's global change outside the active tiles, which SIGE-style approx mode
# deliberately ignores; frozen GroupNorm statistics alone cost 0.003 (full mask).
ERROR_BOUNDS = {8: 0.40, 4: 0.20, 2: 0.08, 1: 0.025}


@pytest.fixture(scope="module")
def unet_engine(small_unet_onnx):
    engine = engine_from_proto(onnx.load(small_unet_onnx), mode="approx")
    engine.dense_fallback_fraction = 2.0  # always take the sparse path: the error is what is measured
    return engine


def _edit(x0, side, rng):
    x1 = x0.copy()
    x1[:, :, 10:10 + side, 12:12 + side] += rng.standard_normal((1, 3, side, side)).astype(np.float32)
    return x1


def test_approx_error_is_bounded_and_shrinks_with_the_edit(unet_engine):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    unet_engine.prime({"x": x0})
    errors = {}
    for side in (8, 4, 2, 1):
        x1 = _edit(x0, side, np.random.default_rng(side))
        sparse = unet_engine.run({"x": x1})[0]
        dense = unet_engine.run_dense({"x": x1})[0]
        change = rel_l2(dense, unet_engine.run_dense({"x": x0})[0])
        errors[side] = rel_l2(sparse, dense)
        assert errors[side] <= ERROR_BOUNDS[side], (side, errors[side])
        assert errors[side] < change, "the sparse result must be closer to dense than the primed one"
    assert errors[1] <= errors[8]
    same = unet_engine.run({"x": x0.copy()})[0]
    np.testing.assert_array_equal(same, unet_engine.prime({"x": x0})[0])


def test_approx_engine_reports_its_approximations(unet_engine):
    approximations = unet_engine.manifest["approximations"]
    details = " ".join(a["detail"] for a in approximations)
    assert "frozen" in details
    assert any(n["kind"] == "dense" for n in unet_engine.manifest["nodes"]), "attention must be a dense island"


def test_dense_resolutions_run_dense_and_stay_accurate(small_unet_onnx):
    """Nodes on a resolution listed in ``dense_resolutions`` run dense (GroupNorm with its true
    statistics); the result stays as close to dense as the all-sparse engine's."""
    proto = onnx.load(small_unet_onnx)
    sparse_everywhere = engine_from_proto(proto, mode="approx")
    low_res_dense = engine_from_proto(proto, mode="approx", dense_resolutions=("r8x8",))
    for engine in (sparse_everywhere, low_res_dense):
        engine.dense_fallback_fraction = 2.0
    forced = [n for n in low_res_dense.manifest["nodes"] if "dense_resolutions" in (n.get("note") or "")]
    assert forced and all(n["kind"] == "dense" for n in forced)
    assert not any(n.get("resolution") == "r8x8" and n["kind"] in ("sparse", "approx")
                   for n in low_res_dense.manifest["nodes"])
    assert "r8x8" not in {r["name"] for r in low_res_dense.manifest["resolutions"]}
    assert any(n.get("resolution") == "r8x8" for n in sparse_everywhere.manifest["nodes"]), "the UNet reaches 8x8"

    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    x1 = _edit(x0, 4, rng)
    errors = {}
    for name, engine in (("sparse", sparse_everywhere), ("low-res dense", low_res_dense)):
        engine.prime({"x": x0})
        errors[name] = rel_l2(engine.run({"x": x1})[0], engine.run_dense({"x": x1})[0])
    assert errors["low-res dense"] <= ERROR_BOUNDS[4], errors
    assert errors["low-res dense"] <= errors["sparse"] * 1.1 + 1e-4, errors


@pytest.mark.parametrize("options, message", [
    ({"mode": "exact", "dense_resolutions": ("r8x8",)}, "needs mode='approx'"),
    ({"mode": "approx", "dense_resolutions": ("8x8",)}, "not a resolution name"),
])
def test_dense_resolutions_are_checked(small_unet_onnx, options, message):
    from sigec.core.errors import CompileError

    with pytest.raises(CompileError, match=message):
        engine_from_proto(onnx.load(small_unet_onnx), **options)


def test_expected_macs_match_what_a_run_executes(unet_engine):
    """``expected_macs`` (and so ``sigec inspect --mask`` and the bench tables) dilate the mask as ``run`` does."""
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    unet_engine.prime({"x": x0})
    mask = np.zeros((32, 32), bool)
    mask[8:10, 16:18] = True
    for dilation in (None, 0, 9):
        unet_engine.run({"x": _edit(x0, 4, rng)}, mask=mask, dilation=dilation)
        _, executed, tiles = unet_engine.expected_macs(mask, dilation=dilation)
        assert executed == unet_engine.stats.executed_macs, dilation
        assert {k: t.count for k, t in tiles.items()} == unet_engine.stats.active_tiles
    assert unet_engine.expected_macs(mask, dilation=0)[1] < unet_engine.expected_macs(mask, dilation=9)[1]
