"""SPARSE-graph pieces for token forms: token indices of a tile grid and the token scatter."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sigec.passes.graph_builder import GraphBuilder
from sigec.passes.sparse_forms import Resolution
from sigec.passes.token_layout import TokenLayout


@dataclass(frozen=True)
class TokenIndex:
    """Per active token of a tile grid (``M = N * T * T`` rows, tile by tile, row-major in a tile):
    ``flat`` = b*H*W + y*W + x, ``batch`` = b, ``position`` = y*W + x (all int64 [M]); ``rows`` =
    ``flat`` as [M, 1] for ScatterND."""

    flat: ir.Value
    batch: ir.Value
    position: ir.Value
    rows: ir.Value


def build_token_index(b: GraphBuilder, coords: ir.Value, res: Resolution) -> TokenIndex:
    """The token index of ``res`` from its coords [N, 3] (b, tile row, tile column)."""
    t, w = res.tile, res.width
    col = lambda k: b.op("Slice", [coords, b.const(np.array([k], np.int64), "c:tok_k"),  # noqa: E731
                                   b.const(np.array([k + 1], np.int64), "c:tok_k1"),
                                   b.const(np.array([1], np.int64), "c:axis1")], hint=f"tok_coord{k}::{res.name}")
    tile_b, tile_y, tile_x = col(0), col(1), col(2)
    origin = b.op("Add", [b.op("Mul", [tile_y, b.const(np.array(t * w, np.int64), "c:tok_row")], hint="tok_y0"),
                          b.op("Mul", [tile_x, b.const(np.array(t, np.int64), "c:tok_col")], hint="tok_x0")],
                  hint=f"tok_origin::{res.name}")
    inside = (np.arange(t)[:, None] * w + np.arange(t)[None, :]).reshape(1, t * t).astype(np.int64)
    flat_shape = b.const(np.array([-1], np.int64), "c:flat")
    position = b.op("Reshape", [b.op("Add", [origin, b.const(inside, "c:tok_inside")], hint="tok_pos2"), flat_shape],
                    hint=f"tok_position::{res.name}")
    per_token = b.op("Add", [tile_b, b.const(np.zeros((1, t * t), np.int64), "c:tok_zeros")], hint="tok_b2")
    batch_of = b.op("Reshape", [per_token, flat_shape], hint=f"tok_batch::{res.name}")
    flat = b.op("Add", [b.op("Mul", [batch_of, b.const(np.array(res.height * w, np.int64), "c:tok_hw")],
                             hint="tok_b_hw"), position], hint=f"tok_flat::{res.name}")
    rows = b.op("Unsqueeze", [flat, b.const(np.array([1], np.int64), "c:axis1")], hint=f"tok_rows::{res.name}")
    return TokenIndex(flat, batch_of, position, rows)


def to_canonical(b: GraphBuilder, full: ir.Value, layout: TokenLayout, hint: str) -> ir.Value:
    """A full tensor of ``layout`` as canonical rows ``[B*H*W, *features]`` (b, y, x major)."""
    atoms = layout.atom_order()
    x = full
    atom_shape = [layout.size(a) for a in atoms]
    if list(layout.shape) != atom_shape:
        x = b.op("Reshape", [x, b.const(np.array(atom_shape, np.int64), "c:atom_shape")], hint=f"atoms::{hint}")
    perm = layout.to_canonical_perm()
    if perm != sorted(perm):
        x = b.op("Transpose", [x], hint=f"canonical::{hint}", perm=perm)
    rows = [-1, *layout.feature_shape]
    return b.op("Reshape", [x, b.const(np.array(rows, np.int64), "c:rows_shape")], hint=f"rows::{hint}")


def from_canonical(b: GraphBuilder, rows: ir.Value, layout: TokenLayout, hint: str) -> ir.Value:
    """The inverse of :func:`to_canonical`: canonical rows back to the original tensor's shape."""
    order = layout.canonical_order()
    x = b.op("Reshape", [rows, b.const(np.array([layout.size(a) for a in order], np.int64), "c:canon_shape")],
             hint=f"canon::{hint}")
    perm = layout.to_canonical_perm()
    if perm != sorted(perm):
        x = b.op("Transpose", [x], hint=f"uncanonical::{hint}", perm=[perm.index(i) for i in range(len(perm))])
    return b.op("Reshape", [x, b.const(np.array(layout.shape, np.int64), "c:orig_shape")], hint=hint)


def scatter_tokens(b: GraphBuilder, cache: ir.Value, vals: ir.Value, layout: TokenLayout, index: TokenIndex,
                   hint: str) -> ir.Value:
    """The full tensor: ``cache`` (the original, in ``layout``) with the active tokens replaced by ``vals``."""
    rows = to_canonical(b, cache, layout, f"cache::{hint}")
    new = b.op("ScatterND", [rows, index.rows, vals], hint=f"scatter::{hint}")
    return from_canonical(b, new, layout, hint)


def scatter_items(b: GraphBuilder, cache: ir.Value, vals: ir.Value, layout: TokenLayout, index: TokenIndex,
                  hint: str) -> ir.Value | None:
    """:func:`scatter_tokens` without leaving the original layout, for a resolution whose batch items
    share one tile set (each item holds M/B tokens at the same positions): one ScatterElements along
    the token axis. None when the layout is not ``b`` first, one ``y, x`` axis, single features."""
    axes = layout.axes
    token_axes = [i for i, axis in enumerate(axes) if axis == ("y", "x")]
    if axes[0] != ("b",) or len(token_axes) != 1 or len(axes) != len(layout.features) + 2:
        return None
    t = token_axes[0]
    if any(len(axis) != 1 for i, axis in enumerate(axes) if i != t):
        return None
    batch = layout.size("b")
    where = [0 if i == 0 else 1 if i == t else 2 + layout.features.index(axis[0]) for i, axis in enumerate(axes)]
    items = b.op("Reshape", [vals, b.const(np.array([batch, -1, *layout.feature_shape], np.int64), "c:items_shape")],
                 hint=f"items::{hint}")
    if where != sorted(where):
        items = b.op("Transpose", [items], hint=f"layout::{hint}", perm=where)
    shape = [1] * len(axes)
    shape[0], shape[t] = batch, -1
    positions = b.op("Reshape", [index.position, b.const(np.array(shape, np.int64), "c:pos_shape")],
                     hint=f"positions::{hint}")
    positions = b.op("Expand", [positions, b.op("Shape", [items], hint=f"items_shape::{hint}")],
                     hint=f"pos_expand::{hint}")
    return b.op("ScatterElements", [cache, positions, items], hint=hint, axis=t)
