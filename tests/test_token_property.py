"""Exact mode on random token blocks (tests/random_token_nets.py): a conv map viewed as tokens the
ways exporters write it, random per-token ops (Linear, LayerNorm, RMS norm, GELU, GEGLU, SiLU,
residuals, adaLN modulation, positional tables, cross-attention on a static context), back to a map
and a conv.

For every drawn net: the ONNX graph equals the PyTorch code it stands for (so the hand-written
exporter patterns mean what they claim), prime / run_dense / the sparse run equal ONNX Runtime on
the original model (forced sparse path), and, when the tile size divides the map, the token rules
really applied: no node runs dense (MatMul, LayerNormalization, Softmax, ... on the active tokens),
and the regression tests below pin the nets on which they once did not. When the tile does not
divide the map, the token rules decline, the token nodes run dense and the engine
stays exact.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import (EXACT_TOLERANCE, always_sparse, assert_exact, compare_with_oracle, engine_from_proto, examples,
                     ort_oracle, rel_err)
from random_token_nets import HEAD_VIEWS, OPS, VIEWS, TokenNetSpec, token_module, token_net, torch_reference
from sigec.frontends.torch_frontend import export_module

TILE = 4
TOKEN_OPS = ("MatMul", "LayerNormalization", "Softmax")
"""Per-token op types whose nodes must run sparse when the tile divides the map (unless static)."""

MASKS = ("pixel", "rect", "one_item", "border", "full")


def check_token_nodes(engine, spec: TokenNetSpec) -> None:
    """Tile divides the map: every node that is not static or constant runs sparse."""
    nodes = engine.manifest["nodes"]
    kinds = Counter((n["op_type"], n["kind"]) for n in nodes)
    dense = [f"{n['name']} ({n['op_type']}): {n.get('note')}" for n in nodes if n["kind"] == "dense"]
    assert not dense, f"token rules did not apply: {dense}; {spec}"
    for op in TOKEN_OPS:
        assert not kinds[(op, "dense")], (op, kinds)
    assert kinds[("Conv", "sparse")] == 2 and kinds[("Transpose", "sparse")] >= 2, kinds


# ----- strategies ---------------------------------------------------------------------------------


@st.composite
def token_specs(draw, sizes=st.sampled_from([8, 12, 16]), max_ops: int = 5) -> TokenNetSpec:
    channels = draw(st.integers(8, 16))
    return TokenNetSpec(
        batch=draw(st.sampled_from([1, 2])), channels=channels, height=draw(sizes), width=draw(sizes),
        view_in=draw(st.sampled_from(VIEWS)), view_out=draw(st.sampled_from(VIEWS)),
        heads_view=draw(st.sampled_from(HEAD_VIEWS)),
        heads=draw(st.sampled_from([h for h in (1, 2, 4) if channels % h == 0])),
        ops=tuple(draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=max_ops))),
        context_len=draw(st.integers(3, 7)), map_residual=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _edit(spec: TokenNetSpec, inputs: dict[str, np.ndarray], kind: str, rng: np.random.Generator
          ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The inputs with the image changed on a mask of ``kind`` (the static inputs unchanged), and the mask."""
    b, h, w = spec.batch, spec.height, spec.width
    mask = np.zeros((b, h, w), bool)
    y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
    if kind == "pixel":
        mask[:, y, x] = True
    elif kind == "rect":
        mask[:, y:y + int(rng.integers(1, 5)), x:x + int(rng.integers(1, 5))] = True
    elif kind == "one_item":  # the other batch item has no active token
        mask[int(rng.integers(0, b)), y, x] = True
    elif kind == "border":  # the last row and column
        mask[:, -1, x] = mask[:, y, -1] = True
    else:  # every tile active, still on the sparse path
        mask[:] = True
    edited = dict(inputs)
    edited["image"] = inputs["image"] + mask[:, None] * rng.standard_normal(inputs["image"].shape).astype(np.float32)
    return edited, mask


def check_spec(spec: TokenNetSpec, kind: str, backend: str = "ort", proto: onnx.ModelProto | None = None) -> None:
    """Compile ``spec`` (or its given export ``proto``) in exact mode and check it."""
    own = proto is None
    proto = token_net(spec) if own else proto
    rng = np.random.default_rng(spec.seed)
    inputs = spec.random_inputs(rng)
    oracle = ort_oracle(proto)
    if own:  # the ONNX patterns compute what the PyTorch code does
        assert rel_err(oracle(inputs)[0], torch_reference(spec)(inputs)) <= EXACT_TOLERANCE
    engine = always_sparse(engine_from_proto(proto, mode="exact", tile_size=TILE, backend=backend))
    edited, mask = _edit(spec, inputs, kind, rng)
    c = compare_with_oracle(engine, oracle, inputs, edited, mask)
    assert_exact(c, context=str(spec))
    if spec.height % TILE or spec.width % TILE:
        # the token rules decline at the first view: only the input conv runs sparse
        sparse = [n["name"] for n in engine.manifest["nodes"] if n["kind"] == "sparse"]
        assert len(sparse) == 1 and sparse[0] == proto.graph.node[0].name, sparse
        return
    check_token_nodes(engine, spec)


# ----- property tests -----------------------------------------------------------------------------


@settings(max_examples=examples(30))
@example(spec=TokenNetSpec(2, 16, 16, 8, "permute", "reshape_transpose", "none", 2,
                           ("layer_norm", "modulate", "pos", "cross_sdpa", "geglu", "residual", "silu"), seed=1),
         kind="rect", backend="ort")
@example(spec=TokenNetSpec(1, 12, 8, 12, "flatten_transpose", "permute", "heads", 2,
                           ("linear_nobias", "layer_norm", "cross_softmax", "gelu_tanh", "pos", "modulate"), seed=2,
                           map_residual=True), kind="border", backend="torch")
@given(spec=token_specs(), kind=st.sampled_from(MASKS), backend=st.sampled_from(["ort", "ort", "torch"]))
def test_random_token_nets_are_exact_and_sparse(spec: TokenNetSpec, kind: str, backend: str) -> None:
    check_spec(spec, kind, backend)


@settings(max_examples=examples(3))
@example(spec=TokenNetSpec(2, 8, 10, 12, "permute", "permute", "heads", 2,
                           ("layer_norm", "cross_sdpa", "modulate", "pos", "geglu", "linear"), seed=3), kind="rect")
@given(spec=token_specs(sizes=st.sampled_from([9, 10, 11, 13, 14, 15]), max_ops=4), kind=st.sampled_from(MASKS))
def test_token_maps_the_tile_does_not_divide_run_dense_and_exact(spec: TokenNetSpec, kind: str) -> None:
    check_spec(spec, kind)


# ----- real exports -------------------------------------------------------------------------------
EXPORTED = {
    "tokens": TokenNetSpec(2, 12, 8, 8, "permute", "flatten_transpose", "none", 2,
                           ("pos", "layer_norm", "modulate", "cross_sdpa", "geglu", "linear_nobias", "residual"),
                           seed=5),
    "heads": TokenNetSpec(1, 16, 8, 12, "reshape_transpose", "permute", "heads", 4,
                          ("layer_norm", "cross_softmax", "gelu_erf", "linear", "pos", "silu", "modulate"),
                          map_residual=True, seed=6),
}


@pytest.mark.parametrize("name", list(EXPORTED))
def test_exported_token_nets_are_exact_and_sparse(name: str) -> None:
    """The same nets exported from PyTorch by sigec's frontend (the generator's patterns are the exporter's)."""
    spec = EXPORTED[name]
    example_inputs = {k: torch.from_numpy(v) for k, v in spec.random_inputs(np.random.default_rng(0)).items()}
    proto = export_module(token_module(spec), example_inputs)
    inputs = spec.random_inputs(np.random.default_rng(1))
    assert rel_err(ort_oracle(proto)(inputs)[0], ort_oracle(token_net(spec))(inputs)[0]) <= EXACT_TOLERANCE
    check_spec(spec, "rect", proto=proto)


# ----- regressions: nets on which the token rules once declined or failed -----------------------


def _minimal(**changes) -> TokenNetSpec:
    return replace(TokenNetSpec(1, 8, 8, 8, heads=2, ops=("rms_norm",)), **changes)


@pytest.mark.parametrize("heads_view", ["none", "folded", "heads"])
def test_rms_norm_runs_sparse(heads_view: str) -> None:
    """RMS norm multiplies tokens [..., C] by tokens [..., 1] (a broadcasting tokens operand); on heads
    [B, h, HW, d] its declined Mul once reached the map rules and failed the compile."""
    check_spec(_minimal(heads_view=heads_view), "rect")


@pytest.mark.parametrize("ops", [("linear",), ("cross_softmax",)])
def test_folded_heads_matmul_runs_sparse(ops: tuple[str, ...]) -> None:
    """Linear and attention on batch-folded heads [B*h, HW, d] (older attention processors)."""
    check_spec(_minimal(heads_view="folded", ops=ops), "rect")
