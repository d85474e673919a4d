"""Token views, per-token ops and attention on the active tokens, checked against ONNX Runtime on the
original model (forced sparse path).

Exact mode: views of a map as tokens and back, LayerNorm, Linear, GEGLU (a feature Split), adaLN
modulation by a per-sample vector, a positional table and cross-attention on a static context are
exact on the active tokens; self-attention stays dense there. Approx mode: self-attention reads the
cached keys and values with the active tokens' rows written in (SIGE's rule).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from helpers import (EXACT_TOLERANCE, always_sparse, assert_approx, assert_exact, compare_with_oracle,
                     engine_from_proto, ort_oracle)
from sigec.frontends.torch_frontend import export_module
from sigec.passes.token_layout import LayoutError, TokenLayout

# ----- layouts ----------------------------------------------------------------------------------


def test_map_to_tokens_to_heads_and_back() -> None:
    tokens = TokenLayout.of_map(2, 32, 16, 16).transpose((0, 2, 3, 1)).reshape((2, 256, 32))
    assert tokens.axes == (("b",), ("y", "x"), ("c",)) and tokens.features == ("c",)
    heads = tokens.reshape((2, 256, 8, 4)).transpose((0, 2, 1, 3))
    assert heads.shape == (2, 8, 256, 4) and heads.feature_shape == (8, 4)
    folded = heads.reshape((16, 256, 4))  # batch folded with heads (older attention processors)
    assert folded.axes[0] == ("b", heads.features[0])
    keys_t = folded.transpose((0, 2, 1)).reshape((2, 8, 4, 256))
    assert keys_t.axes[-1] == ("y", "x") and keys_t.feature_shape == (8, 4)
    back = heads.transpose((0, 2, 1, 3)).reshape((2, 256, 32)).reshape((2, 16, 16, 32)).transpose((0, 3, 1, 2))
    assert back.is_map() and back.feature_shape == (32,)


def test_canonical_order_puts_pixels_first() -> None:
    layout = TokenLayout.of_map(1, 8, 4, 4).reshape((1, 8, 16))  # [B, C, HW]
    assert layout.atom_order() == ["b", "c", "y", "x"]
    assert [layout.atom_order()[p] for p in layout.to_canonical_perm()] == ["b", "y", "x", "c"]


@pytest.mark.parametrize("shape", [(2, 8, 1024), (2, 32 * 16, 16), (2, 16, 16 * 32)])
def test_reshapes_that_mix_pixels_and_channels_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(LayoutError):
        TokenLayout.of_map(2, 32, 16, 16).reshape(shape)


# ----- models -----------------------------------------------------------------------------------
C, HEADS, TOKENS_CONTEXT = 16, 2, 5


class TokenBlock(nn.Module):
    """conv -> tokens -> (+ positions) -> adaLN(LayerNorm) -> cross-attention on ``context`` -> GEGLU
    feed-forward -> (self-attention) -> map -> conv: the per-token parts of an SD/DiT block."""

    def __init__(self, size: int, self_attention: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv_in = nn.Conv2d(3, C, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, size * size, C, generator=g) * 0.5)
        self.norm = nn.LayerNorm(C)
        self.ada = nn.Linear(8, 2 * C)
        self.q, self.k, self.v, self.o = (nn.Linear(C, C) for _ in range(4))
        self.ff_in, self.ff_out = nn.Linear(C, 4 * C), nn.Linear(2 * C, C)
        self.self_attention = self_attention
        self.sq, self.sk, self.sv = (nn.Linear(C, C) for _ in range(3))
        self.conv_out = nn.Conv2d(C, 3, 3, padding=1)

    @staticmethod
    def heads(x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, HEADS, c // HEADS).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, c = q.shape
        scores = self.heads(q) @ self.heads(k).transpose(-1, -2) / math.sqrt(c // HEADS)
        out = scores.softmax(-1) @ self.heads(v)
        return out.transpose(1, 2).reshape(b, n, c)

    def forward(self, image: torch.Tensor, context: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(image)
        b, c, h, w = x.shape
        t = x.permute(0, 2, 3, 1).reshape(b, h * w, c) + self.pos
        scale, shift = self.ada(cond).unsqueeze(1).chunk(2, dim=-1)
        t = self.norm(t) * (1 + scale) + shift
        t = t + self.o(self.attend(self.q(t), self.k(context), self.v(context)))
        a, gate = self.ff_in(t).chunk(2, dim=-1)
        t = t + self.ff_out(a * nn.functional.gelu(gate))
        if self.self_attention:
            q, k, v = self.sq(t), self.sk(t), self.sv(t)
            t = t + nn.functional.scaled_dot_product_attention(self.heads(q), self.heads(k), self.heads(v)) \
                .transpose(1, 2).reshape(b, h * w, c)
        return self.conv_out(t.reshape(b, h, w, c).permute(0, 3, 1, 2))


def _inputs(size: int, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"image": rng.standard_normal((batch, 3, size, size)).astype(np.float32),
            "context": rng.standard_normal((batch, TOKENS_CONTEXT, C)).astype(np.float32),
            "cond": rng.standard_normal((batch, 8)).astype(np.float32)}


def _export(module: nn.Module, inputs: dict[str, np.ndarray]) -> onnx.ModelProto:
    torch.manual_seed(0)
    return export_module(module, {k: torch.from_numpy(v) for k, v in inputs.items()})


def _edit(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    edited = {k: v.copy() for k, v in inputs.items()}
    edited["image"][:, :, 5:8, 9:11] += 1.5
    return edited


@pytest.fixture(scope="module")
def cross_block() -> onnx.ModelProto:
    return _export(TokenBlock(16, self_attention=False), _inputs(16))


@pytest.fixture(scope="module")
def self_block() -> onnx.ModelProto:
    return _export(TokenBlock(16, self_attention=True), _inputs(16))


def _kinds(engine) -> Counter:
    return Counter((n["op_type"], n["kind"]) for n in engine.manifest["nodes"])


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_cross_attention_block_is_exact_on_the_active_tokens(cross_block: onnx.ModelProto, backend: str) -> None:
    engine = always_sparse(engine_from_proto(cross_block, mode="exact", tile_size=4, backend=backend))
    kinds = _kinds(engine)
    # every op on the edited tokens runs sparse: views, norms, linears, attention, softmax, GEGLU
    for op in ("Transpose", "Reshape", "LayerNormalization", "MatMul", "Softmax", "Split", "Erf"):
        assert kinds[(op, "sparse")] > 0, (op, kinds)
    assert not [k for k in kinds if k[1] == "dense"], kinds
    attention = [n for n in engine.manifest["nodes"] if "attention" in n.get("note", "")]
    assert len(attention) == 2 and all(n["macs_per_tile"] > 0 for n in attention)
    inputs = _inputs(16)
    c = compare_with_oracle(engine, ort_oracle(cross_block), inputs, _edit(inputs))
    assert_exact(c, context=backend)


def test_batch_items_with_different_edits_share_one_tile_set(cross_block: onnx.ModelProto) -> None:
    """Attention runs batched over the items, so a resolution it reads gives every item the union of
    the items' tiles: an edit of item 0 only is recomputed in item 1 too, and both stay exact."""
    engine = always_sparse(engine_from_proto(cross_block, mode="exact", tile_size=4, backend="ort"))
    assert [r["name"] for r in engine.manifest["resolutions"] if r.get("shared_batch")] == ["r16x16"]
    inputs = _inputs(16)
    edited = {k: v.copy() for k, v in inputs.items()}
    edited["image"][0, :, 2:4, 2:4] += 1.5
    edited["image"][1, :, 12:15, 9:11] -= 1.0
    c = compare_with_oracle(engine, ort_oracle(cross_block), inputs, edited)
    assert_exact(c)
    changed = (edited["image"] != inputs["image"]).any(axis=1)
    coords = engine.expected_macs(changed)[2]["r16x16"].coords
    assert (coords[coords[:, 0] == 0, 1:] == coords[coords[:, 0] == 1, 1:]).all()
    first_only = engine.expected_macs(np.stack([changed[0], changed[0]]))[2]["r16x16"].coords
    assert len(coords) > len(first_only)  # item 1's edit adds tiles to both items


def test_self_attention_stays_dense_in_exact_mode(self_block: onnx.ModelProto) -> None:
    engine = always_sparse(engine_from_proto(self_block, mode="exact", tile_size=4, backend="ort"))
    softmax = [n for n in engine.manifest["nodes"] if n["op_type"] == "Softmax"]
    assert [n["kind"] for n in softmax] == ["sparse", "dense"]  # cross-attention sparse, self-attention dense
    inputs = _inputs(16)
    assert_exact(compare_with_oracle(engine, ort_oracle(self_block), inputs, _edit(inputs)))


def test_self_attention_reads_cached_keys_in_approx_mode(self_block: onnx.ModelProto) -> None:
    engine = always_sparse(engine_from_proto(self_block, mode="approx", tile_size=4, backend="ort"))
    kinds = _kinds(engine)
    assert kinds[("Softmax", "sparse")] == 2 and not [k for k in kinds if k[1] == "dense"], kinds
    assert any("cached" in a["detail"] for a in engine.manifest["approximations"])
    whole = [u for u in engine.manifest["updates"] if u.get("whole")]
    assert whole, "the keys/values caches are updated whole"
    inputs = _inputs(16)
    c = compare_with_oracle(engine, ort_oracle(self_block), inputs, _edit(inputs))
    # self-attention spreads a change to every token; the recomputed region must still be close
    assert_approx(c, inside=0.2, whole=0.6)


def test_whole_cache_updates_make_the_edit_the_new_original(self_block: onnx.ModelProto) -> None:
    """Exact mode with a token output: its token cache is updated whole; later runs match the oracle."""

    class TokensOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = TokenBlock(16, self_attention=False)

        def forward(self, image: torch.Tensor, context: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            x = self.block.conv_in(image)
            b, c, h, w = x.shape
            t = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
            return self.block.ff_out(self.block.ff_in(self.block.norm(t))[..., :2 * C])

    inputs = _inputs(16)
    proto = _export(TokensOut(), inputs)
    engine = always_sparse(engine_from_proto(proto, mode="exact", tile_size=4, backend="ort"))
    assert [u for u in engine.manifest["updates"] if u.get("whole")]
    oracle = ort_oracle(proto)
    engine.prime(inputs)
    first = _edit(inputs)
    engine.run(first, update_cache=True)
    second = {k: v.copy() for k, v in first.items()}
    second["image"][:, :, 12:14, 1:3] -= 2.0
    out = engine.run(second)[0]
    want = oracle(second)[0]
    assert engine.stats.path == "sparse"
    assert np.abs(out - want).max() <= EXACT_TOLERANCE * np.abs(want).max()
    stale = oracle(first)[0]
    assert np.abs(stale - want).max() > 100 * EXACT_TOLERANCE * np.abs(want).max()


@pytest.mark.parametrize("layout_of", ["keys_t", "values", "tokens"])
def test_scatter_in_place_layout_equals_the_canonical_scatter(layout_of: str) -> None:
    """With batch items sharing one tile set, the ScatterElements scatter (original layout) writes
    exactly what the canonical-row ScatterND scatter writes, for the layouts attention reads."""
    import onnx_ir as ir
    import onnxruntime as ort

    from sigec.passes.graph_builder import GraphBuilder
    from sigec.passes.sparse_forms import Resolution
    from sigec.passes.token_graph import build_token_index, scatter_items, scatter_tokens

    batch, heads, dim, side, tile = 2, 2, 3, 8, 2
    tokens = TokenLayout.of_map(batch, heads * dim, side, side).transpose((0, 2, 3, 1)).reshape(
        (batch, side * side, heads * dim))
    layout = {"tokens": tokens,
              "values": tokens.reshape((batch, side * side, heads, dim)).transpose((0, 2, 1, 3)),
              "keys_t": tokens.reshape((batch, side * side, heads, dim)).transpose((0, 2, 3, 1))}[layout_of]
    cells = [(1, 2), (3, 0), (0, 3)]
    coords = np.array([(b, y, x) for b in range(batch) for y, x in cells], np.int64)
    m = len(coords) * tile * tile
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 18})
    g = GraphBuilder(graph)
    cache = g.input("cache", ir.DataType.FLOAT, list(layout.shape))
    vals = g.input("vals", ir.DataType.FLOAT, [m, *layout.feature_shape])
    index = build_token_index(g, g.input("coords", ir.DataType.INT64, [len(coords), 3]), Resolution(side, side, tile))
    in_place = scatter_items(g, cache, vals, layout, index, "in_place")
    assert in_place is not None
    g.output(in_place, ir.DataType.FLOAT, list(layout.shape))
    g.output(scatter_tokens(g, cache, vals, layout, index, "rows"), ir.DataType.FLOAT, list(layout.shape))
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    rng = np.random.default_rng(0)
    feeds = {"cache": rng.standard_normal(layout.shape).astype(np.float32),
             "vals": rng.standard_normal((m, *layout.feature_shape)).astype(np.float32), "coords": coords}
    a, b = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(a, b)
    assert (a != feeds["cache"]).sum() == m * int(np.prod(layout.feature_shape))  # every active token written
