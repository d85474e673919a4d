"""Token rules: spatial maps seen as tokens (Reshape/Transpose views), per-token ops and attention.

A Reshape/Transpose/Flatten/Squeeze/Unsqueeze of a Sparse map that keeps pixels and channels apart
is a view of the same tile grid: its active tokens are the active tiles' pixels (form Tokens,
passes/token_layout.py). Ops that act on each token alone then run on the active tokens only:
element-wise ops (operands broadcast per token: per-sample rows by batch item, positional rows by
pixel), MatMul with a weight on the feature axis (Linear), LayerNormalization, Softmax and
reductions over features, Split/Slice of a feature axis. MatMul against a per-sample matrix is
attention: each batch item's active queries against its keys/values. Keys and values that depend
only on static inputs (cross-attention on text embeddings) make it exact; keys and values of the
edited map itself (self-attention) are the cached full ones with the active tokens' rows written in
(approx mode only; exact mode keeps self-attention dense).
A view whose result is a map ``[B, C, H, W]`` again turns the tokens back into tiles.
"""

from __future__ import annotations

from math import prod
from typing import Sequence

import numpy as np
import onnx_ir as ir

from sigec.core.errors import CompileError
from sigec.passes._ir_utils import attr, const_array, static_shape
from sigec.passes.macs import dense_macs
from sigec.passes.sparse_context import RewriteContext, Unsupported, shape_of
from sigec.passes.sparse_forms import Dense, Form, MaskId, Padded, Sparse, Tokens
from sigec.passes.sparse_rules import NARY_ELEMENTWISE, PASS_THROUGH, UNARY_ELEMENTWISE, Rule
from sigec.passes.token_layout import SPATIAL, LayoutError, TokenLayout

VIEW_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")
REDUCE_OPS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare", "ReduceProd")


def _form(ctx: RewriteContext, value: ir.Value | None) -> Form | None:
    if value is None:
        return None
    try:
        return ctx.forms.get(value)
    except CompileError:
        return None


def takes_token_rule(ctx: RewriteContext, node: ir.Node) -> bool:
    """True when the node has a token rule and reads tokens (or views a sparse map as tokens)."""
    if node.op_type not in TOKEN_RULES or not node.inputs:
        return False
    if any(isinstance(_form(ctx, v), Tokens) for v in node.inputs):
        return True
    return node.op_type in VIEW_OPS and isinstance(_form(ctx, node.inputs[0]), Sparse)


# ----- forms -------------------------------------------------------------------------------------
def _tokens(ctx: RewriteContext, value: ir.Value) -> Tokens:
    """The value as tokens: its Tokens form, or a Sparse map's tiles seen as ``[M, C]`` tokens."""
    form = ctx.forms.get(value)
    if isinstance(form, Tokens):
        return form
    if not isinstance(form, Sparse):
        raise Unsupported(f"input '{value.name}' is not a sparse map or tokens")
    b, (batch, channels, height, width) = ctx.graph, shape_of(value)
    ctx.grids.token_index(form.res)  # declines when tiles do not divide the map
    moved = b.op("Transpose", [form.vals], hint=f"channels_last::{value.name}", perm=[0, 2, 3, 1])
    vals = b.op("Reshape", [moved, b.const(np.array([-1, channels], np.int64), "c:token_rows")],
                hint=f"tokens::{value.name}")
    return Tokens(form.source, vals, form.res, form.mask, TokenLayout.of_map(batch, channels, height, width))


def _set_result(ctx: RewriteContext, out: ir.Value, vals: ir.Value, src: Tokens, mask: MaskId | None,
                layout: TokenLayout, items: ir.Value | None = None) -> str:
    """Record ``out``: back to tiles when the layout is a map again, else tokens. Returns a note."""
    if layout.is_map() and ctx.grids.is_spatial(out):
        b, t = ctx.graph, src.res.tile
        rows = b.op("Reshape", [vals, b.const(np.array([-1, t, t, layout.feature_shape[0]], np.int64),
                                              "c:token_tiles")], hint=f"token_tiles::{out.name}")
        tiles = b.op("Transpose", [rows], hint=f"vals::{out.name}", perm=[0, 3, 1, 2])
        ctx.set_sparse(out, tiles, src.res, mask)
        return " (back to tiles)"
    ctx.set_tokens(out, vals, src.res, mask, layout, items)
    return ""


def _items_to_rows(ctx: RewriteContext, items: ir.Value, layout: TokenLayout, hint: str) -> ir.Value:
    """``vals [M, *heads, n]`` of tokens held as ``items [B, *heads, M/B, n]`` (a Transpose that the
    pruning pass removes when every consumer reads ``items``)."""
    b, h = ctx.graph, len(layout.features) - 1
    if h:
        items = b.op("Transpose", [items], hint=f"tokens_first::{hint}", perm=[0, h + 1, *range(1, h + 1), h + 2])
    return b.op("Reshape", [items, b.const(np.array([-1, *layout.feature_shape], np.int64), "c:token_rows")],
                hint=f"vals::{hint}")


def _rows_to_items(ctx: RewriteContext, src: Tokens, hint: str) -> ir.Value:
    """``src``'s tokens as ``items [B, *heads, M/B, k]`` (needs a shared_batch resolution)."""
    if src.items is not None:
        return src.items
    b, layout = ctx.graph, src.layout
    h = len(layout.features) - 1
    items = b.op("Reshape", [src.vals, b.const(np.array([layout.size("b"), -1, *layout.feature_shape], np.int64),
                                               "c:items_shape")], hint=f"items::{hint}")
    if h:
        items = b.op("Transpose", [items], hint=f"heads_first::{hint}", perm=[0, *range(2, h + 2), 1, h + 2])
    return items


def _reshape_vals(ctx: RewriteContext, vals: ir.Value, old: TokenLayout, new: TokenLayout, hint: str) -> ir.Value:
    if old.feature_shape == new.feature_shape:
        return vals
    return ctx.graph.op("Reshape", [vals, ctx.graph.const(np.array([-1, *new.feature_shape], np.int64), "c:features")],
                        hint=hint)


def _report(ctx: RewriteContext, node: ir.Node, src: Tokens, note: str, macs_per_token: int = 0) -> None:
    t = src.res.tile
    ctx.record.report(node, "sparse", resolution=src.res.name, tile=t, note=note, dense_macs=dense_macs(node),
                      macs_per_tile=macs_per_token * t * t)


def _feature_axis(layout: TokenLayout, axis: int) -> tuple[str, int]:
    """The feature atom of original ``axis`` and its ``vals`` axis (Unsupported unless one feature atom)."""
    atoms = layout.axes[axis % len(layout.axes)]
    if len(atoms) != 1 or atoms[0] in SPATIAL:
        raise Unsupported(f"axis {axis} holds {list(atoms) or 'nothing'}, not one feature axis")
    return atoms[0], 1 + layout.features.index(atoms[0])


# ----- views -------------------------------------------------------------------------------------
def rule_token_view(ctx: RewriteContext, node: ir.Node) -> None:
    """Reshape / Flatten / Squeeze / Unsqueeze / Transpose: a new layout of the same tokens."""
    src = _tokens(ctx, node.inputs[0])
    out = node.outputs[0]
    shape = static_shape(out)
    if shape is None:
        raise Unsupported("the view's output has no static shape")
    try:
        if node.op_type == "Transpose":
            perm = attr(node, "perm") or list(range(len(src.layout.axes)))[::-1]
            layout = src.layout.transpose(tuple(int(p) for p in perm))
        else:
            layout = src.layout.reshape(tuple(shape))
    except LayoutError as exc:
        raise Unsupported(str(exc)) from None
    if layout.shape != tuple(shape):
        raise Unsupported(f"layout {list(layout.shape)} does not match the output {list(shape)}")
    vals = _reshape_vals(ctx, src.vals, src.layout, layout, f"view::{out.name}")
    _report(ctx, node, src, "token view" + _set_result(ctx, out, vals, src, src.mask, layout))


# ----- per-token ops -----------------------------------------------------------------------------
def _operand(ctx: RewriteContext, value: ir.Value, layout: TokenLayout, src: Tokens, node: ir.Node,
             masks: list[MaskId | None]) -> ir.Value:
    """A non-token operand of an element-wise op, made to broadcast against ``vals [M, *features]``.

    Right-aligned with the output (``layout``), it is reshaped to atoms and put in canonical order;
    rows that vary with the batch item, the pixel or both are gathered per active token.
    """
    form = ctx.forms.get(value)
    if isinstance(form, (Sparse, Padded, Tokens)):
        raise Unsupported(f"operand '{value.name}' has another layout than the tokens")
    s = static_shape(value)
    if s is None:
        raise Unsupported(f"operand '{value.name}' has no static shape")
    b = ctx.graph
    if prod(s) == 1 and not ctx.forms.is_edit_dependent(value):
        return form.value
    rank = len(layout.axes)
    if len(s) > rank:
        raise Unsupported(f"operand '{value.name}' has more axes than the tokens")
    s = (1,) * (rank - len(s)) + tuple(s)
    atom_shape: list[int] = []
    present: set[str] = set()
    for axis, dim in zip(layout.axes, s):
        sizes = [layout.size(a) for a in axis]
        if dim == prod(sizes) and dim != 1:
            atom_shape += sizes
            present.update(axis)
        elif dim == 1:
            atom_shape += [1] * len(axis)
        else:
            raise Unsupported(f"operand '{value.name}' of shape {list(s)} does not broadcast against the tokens")
    covers_pixels = {"y", "x"} <= present
    if ctx.forms.is_edit_dependent(value):
        if form.mask is None or not covers_pixels:
            if ctx.exact:
                raise Unsupported(f"operand '{value.name}' is a global function of the edited input")
            ctx.record.approximate(node, f"'{value.name}' (recomputed densely) is read only at the active tokens")
        masks.append(form.mask if covers_pixels else None)
    x = form.value
    if list(s) != atom_shape or len(s) != len(atom_shape):
        x = b.op("Reshape", [x, b.const(np.array(atom_shape, np.int64), "c:atom_shape")], hint=f"atoms::{value.name}")
    perm = layout.to_canonical_perm()
    if perm != sorted(perm):
        x = b.op("Transpose", [x], hint=f"canonical::{value.name}", perm=perm)
    feats = [layout.size(a) if a in present else 1 for a in layout.features]
    index = ctx.grids.token_index(src.res)
    spatial = present & set(SPATIAL)
    if not spatial:
        return b.op("Reshape", [x, b.const(np.array([1, *feats], np.int64), "c:row_shape")], hint=f"row::{value.name}")
    if spatial == {"b"}:
        rows, idx = [layout.size("b"), *feats], index.batch
    elif spatial == {"y", "x"}:
        rows, idx = [layout.size("y") * layout.size("x"), *feats], index.position
    else:
        full = [layout.size(a) for a in SPATIAL] + feats
        x = b.op("Expand", [x, b.const(np.array(full, np.int64), "c:expand")], hint=f"expand::{value.name}")
        rows, idx = [prod(full[:3]), *feats], index.flat
    x = b.op("Reshape", [x, b.const(np.array(rows, np.int64), "c:rows")], hint=f"rows::{value.name}")
    return b.op("Gather", [x, idx], hint=f"per_token::{value.name}", axis=0)


def _broadcasts(operand: Tokens, main: Tokens) -> bool:
    """True when ``operand.vals`` broadcasts against ``main.vals`` as the original tensors do: the same
    grid and layout, each feature of the same size or 1 (an RMS norm's ``x / rms(x)``)."""
    if operand.res != main.res or len(operand.layout.features) != len(main.layout.features):
        return False
    rename = dict(zip(operand.layout.features, main.layout.features))
    axes = tuple(tuple(rename.get(a, a) for a in axis) for axis in operand.layout.axes)
    sizes = zip(operand.layout.feature_shape, main.layout.feature_shape)
    return axes == main.layout.axes and all(n in (1, m) for n, m in sizes)


def rule_token_elementwise(ctx: RewriteContext, node: ir.Node) -> None:
    """Element-wise ops: tokens operands of the output's layout, other operands broadcast per token."""
    out_shape = static_shape(node.outputs[0])
    forms = [_form(ctx, v) for v in node.inputs]
    main = next((f for f, v in zip(forms, node.inputs) if isinstance(f, Tokens) and static_shape(v) == out_shape), None)
    if main is None:
        raise Unsupported("no tokens operand has the output's shape")
    operands: list[ir.Value | None] = []
    masks: list[MaskId | None] = []
    for i, (value, form) in enumerate(zip(node.inputs, forms)):
        if value is None:
            operands.append(None)
        elif isinstance(form, Tokens):
            if not _broadcasts(form, main):
                raise Unsupported(f"tokens operand '{value.name}' has another layout")
            operands.append(form.vals)
            masks.append(form.mask)
        elif node.op_type == "Clip" and i > 0:
            operands.append(form.value)  # type: ignore[union-attr]  # min and max are scalars
        else:
            operands.append(_operand(ctx, value, main.layout, main, node, masks))
    out = node.outputs[0]
    items = None
    scalars = [v is None or f is main or (not isinstance(f, Tokens) and prod(static_shape(v) or (0,)) == 1
                                          and not ctx.forms.is_edit_dependent(v))
               for v, f in zip(node.inputs, forms)]
    if main.items is not None and all(scalars) and sum(f is main for f in forms) == 1:
        # a scale or offset of attention scores: the same op on the batched-attention layout
        items = ctx.graph.op(node.op_type, [main.items if f is main else o for f, o in zip(forms, operands)],
                             hint=f"items::{out.name}", attributes=node.attributes)
        vals = _items_to_rows(ctx, items, main.layout, out.name)
    else:
        vals = ctx.graph.op(node.op_type, operands, hint=f"vals::{out.name}", attributes=node.attributes)
    _report(ctx, node, main, "per token" + _set_result(ctx, out, vals, main, ctx.masks.union(masks), main.layout,
                                                       items))


def rule_token_pass_through(ctx: RewriteContext, node: ir.Node) -> None:
    """Identity / Dropout / same-type Cast: the output has the input's form."""
    if node.op_type == "Cast" and node.inputs[0].dtype != node.outputs[0].dtype:
        rule_token_elementwise(ctx, node)
        return
    form = ctx.forms.get(node.inputs[0])
    if not isinstance(form, Tokens):
        raise Unsupported("pass-through of a non-token input")
    ctx.forms.set(node.outputs[0], form)
    _report(ctx, node, form, "pass-through")


def rule_token_softmax(ctx: RewriteContext, node: ir.Node) -> None:
    """Softmax / LogSoftmax over one feature axis: the same on the active tokens."""
    src = _tokens(ctx, node.inputs[0])
    _, vaxis = _feature_axis(src.layout, int(attr(node, "axis", -1)))
    out = node.outputs[0]
    if src.items is not None and vaxis == len(src.layout.features):  # the last axis in both layouts
        items = ctx.graph.op(node.op_type, [src.items], hint=f"items::{out.name}", axis=-1)
        vals = _items_to_rows(ctx, items, src.layout, out.name)
    else:
        items, vals = None, ctx.graph.op(node.op_type, [src.vals], hint=f"vals::{out.name}", axis=vaxis)
    _report(ctx, node, src, "per token" + _set_result(ctx, out, vals, src, src.mask, src.layout, items))


def rule_token_layer_norm(ctx: RewriteContext, node: ir.Node) -> None:
    """LayerNormalization over trailing feature axes stored last in ``vals``: exact per token."""
    src = _tokens(ctx, node.inputs[0])
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        raise Unsupported("LayerNormalization's mean or inverse deviation is used")
    rank = len(src.layout.axes)
    first = int(attr(node, "axis", -1)) % rank
    atoms = [_feature_axis(src.layout, a)[0] for a in range(first, rank)]
    if list(src.layout.features[-len(atoms):]) != atoms:
        raise Unsupported("the normalised axes are not the last stored features")
    for v in node.inputs[1:]:
        if v is not None and ctx.forms.is_edit_dependent(v):
            raise Unsupported(f"LayerNormalization parameter '{v.name}' depends on the edit")
    params = [None if v is None else ctx.forms.get(v).value for v in node.inputs[1:]]  # type: ignore[union-attr]
    out = node.outputs[0]
    attrs = {k: v for k, v in node.attributes.items() if k != "axis"}
    vals = ctx.graph.op("LayerNormalization", [src.vals, *params], hint=f"vals::{out.name}", attributes=attrs,
                        axis=-len(atoms))
    _report(ctx, node, src, "per token" + _set_result(ctx, out, vals, src, src.mask, src.layout))


def _constant_axes(node: ir.Node, rank: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const_array(node.inputs[1])
        if axes is None:
            raise Unsupported("reduction axes are not constant")
        return [int(a) % rank for a in np.ravel(axes)]
    given = attr(node, "axes")
    return None if given is None else [int(a) % rank for a in given]


def rule_token_reduce(ctx: RewriteContext, node: ir.Node) -> None:
    """Reductions over feature axes only (RMS norm's mean of squares, LayerNorm spelled out)."""
    src = _tokens(ctx, node.inputs[0])
    layout, rank = src.layout, len(src.layout.axes)
    axes = _constant_axes(node, rank)
    if not axes:
        raise Unsupported("reduction over all axes")
    found = [_feature_axis(layout, a) for a in axes]
    keep = int(attr(node, "keepdims", 1))
    b = ctx.graph
    vals = b.op(node.op_type, [src.vals, b.const(np.array([v for _, v in found], np.int64), "c:reduce_axes")],
                hint=f"vals::{node.outputs[0].name}", keepdims=keep)
    for atom, _ in found:
        layout = layout.with_feature(atom, 1)
    if not keep:
        gone = {a for a, _ in found}
        layout = TokenLayout(tuple(ax for ax in layout.axes if not set(ax) & gone),
                             tuple(f for f in layout.features if f not in gone),
                             tuple((a, n) for a, n in layout.sizes if a not in gone))
    _report(ctx, node, src, "per token" + _set_result(ctx, node.outputs[0], vals, src, src.mask, layout))


def _slice_features(ctx: RewriteContext, node: ir.Node, src: Tokens, atom: str, vaxis: int,
                    ranges: Sequence[tuple[int, int, int]]) -> None:
    b = ctx.graph
    for out, (start, stop, step) in zip(node.outputs, ranges):
        vals = b.op("Slice", [src.vals, b.const(np.array([start], np.int64), "c:f_start"),
                              b.const(np.array([stop], np.int64), "c:f_stop"),
                              b.const(np.array([vaxis], np.int64), "c:f_axis"),
                              b.const(np.array([step], np.int64), "c:f_step")], hint=f"vals::{out.name}")
        _set_result(ctx, out, vals, src, src.mask, src.layout.with_feature(atom, len(range(start, stop, step))))
    _report(ctx, node, src, "feature ranges of the tokens")


def rule_token_split(ctx: RewriteContext, node: ir.Node) -> None:
    """Split along a feature axis (GEGLU's halves, q/k/v chunks): ranges of ``vals``."""
    src = _tokens(ctx, node.inputs[0])
    axis = int(attr(node, "axis", 0)) % len(src.layout.axes)
    atom, vaxis = _feature_axis(src.layout, axis)
    shapes = [static_shape(o) for o in node.outputs]
    if any(s is None for s in shapes):
        raise Unsupported("Split outputs without static shapes")
    sizes = [s[axis] for s in shapes]  # type: ignore[index]
    starts = np.cumsum([0, *sizes[:-1]])
    _slice_features(ctx, node, src, atom, vaxis, [(int(a), int(a) + n, 1) for a, n in zip(starts, sizes)])


def rule_token_slice(ctx: RewriteContext, node: ir.Node) -> None:
    """Slice of one feature axis with constant parameters and positive steps."""
    from sigec.passes.sparse_rules import _slice_params  # the one reading of Slice parameters

    src = _tokens(ctx, node.inputs[0])
    shape = src.layout.shape
    picked = None
    for axis, start, end, step in _slice_params(node):
        axis %= len(shape)
        if step < 1:
            raise Unsupported(f"Slice with step {step}")
        bounds = slice(start, end, step).indices(shape[axis])
        if bounds == (0, shape[axis], 1):
            continue
        if picked is not None:
            raise Unsupported("Slice of more than one axis")
        picked = (axis, bounds)
    if picked is None:
        rule_token_pass_through(ctx, node)
        return
    atom, vaxis = _feature_axis(src.layout, picked[0])
    _slice_features(ctx, node, src, atom, vaxis, [picked[1]])


# ----- MatMul: Linear layers and attention ---------------------------------------------------------
def rule_token_matmul(ctx: RewriteContext, node: ir.Node) -> None:
    """MatMul of tokens ``[..., tokens, k]`` by a matrix ``[..., k, n]``.

    A weight (constant or static ``[k, n]``, or per head) multiplies ``vals`` directly. A matrix
    with a batch axis (attention's keys or values) is applied per batch item to that item's active
    tokens, as one batched MatMul: the resolution's batch items share one tile set (the union of
    theirs), so each item has M / B tokens. A matrix that depends on the edit (self-attention) is its full value: the cache with the
    active tokens written in (approx mode; exact mode declines, so the node stays dense).
    """
    a, m = node.inputs[0], node.inputs[1]
    src = ctx.forms.get(a)
    if not isinstance(src, Tokens):
        raise Unsupported("the left operand of MatMul is not tokens")
    layout = src.layout
    rank = len(layout.axes)
    if rank < 2 or layout.axes[-2] not in (("y", "x"), ("b", "y", "x")):
        raise Unsupported("the rows of the MatMul are not the tokens")
    k, _ = _feature_axis(layout, rank - 1)
    lead = layout.axes[:-2]  # each (), (b,), (head,) or (b, head) (heads folded into the batch)
    if any(len(ax) > 2 or (len(ax) == 2 and ax[0] != "b") for ax in lead):
        raise Unsupported("a batch axis of the MatMul merges atoms other than batch and one head axis")
    heads = [ax[-1] for ax in lead if ax and ax[-1] != "b"]
    if list(layout.features) != [*heads, k]:
        raise Unsupported("the token features are not stored as [heads..., k]")
    ms = static_shape(m)
    if ms is None or len(ms) < 2 or ms[-2] != layout.size(k) or len(ms) - 2 > len(lead):
        raise Unsupported(f"the right operand's shape {ms} does not multiply the tokens")
    m_lead = (1,) * (len(lead) - (len(ms) - 2)) + tuple(ms[:-2])
    per_item = any("b" in ax and d > 1 for ax, d in zip(lead, m_lead))
    per_head = [d > 1 for ax, d in zip(lead, m_lead) if ax and ax[-1] != "b"]
    if any(per_head) and not all(per_head):
        raise Unsupported("the right operand varies over some heads only")
    if per_item and (not lead or "b" not in lead[0] or len(ms) != rank):
        raise Unsupported("a per-sample matrix whose batch axis does not lead")
    if per_item:  # before the matrix is made full: its scatter may then keep the original layout
        ctx.grids.shared_batch.add(src.res.name)
    matrix = _right_operand(ctx, node, m)
    b = ctx.graph
    n = ms[-1]
    head_sizes = [layout.size(h) for h in heads] if any(per_head) else []

    if per_item:
        # The batch items share one tile set (the resolution is marked so), so each item has M / B
        # tokens: one batched MatMul [B, heads..., M/B, k] x [B, heads..., k, n].
        batch, h = layout.size("b"), len(heads)
        mat_shape = [batch, *(head_sizes or [1] * h), ms[-2], n]
        mat = b.op("Reshape", [matrix, b.const(np.array(mat_shape, np.int64), "c:mat_shape")], hint=f"mat::{node.name}")
        items = b.op("MatMul", [_rows_to_items(ctx, src, node.name), mat], hint=f"items::{node.outputs[0].name}")
    else:
        items, vals = None, _weight_product(ctx, src.vals, matrix, head_sizes, ms[-2], n, node.name)
    n_atom = layout.fresh()
    out_layout = TokenLayout((*lead, layout.axes[-2], (n_atom,)), (*heads, n_atom),
                             (*((a, s) for a, s in layout.sizes if a != k), (n_atom, n)))
    if items is not None:
        vals = _items_to_rows(ctx, items, out_layout, node.outputs[0].name)
    note = "attention: active queries" if len(ms) > 2 else "per token: linear"
    _report(ctx, node, src, note + _set_result(ctx, node.outputs[0], vals, src, src.mask, out_layout, items),
            prod(layout.feature_shape) * n)


def _weight_product(ctx: RewriteContext, rows: ir.Value, matrix: ir.Value, head_sizes: list[int], k: int, n: int,
                    hint: str) -> ir.Value:
    """``rows [M, *heads, k]`` times a weight ``[k, n]`` (or one per head, ``[*heads, k, n]``)."""
    b = ctx.graph
    mat = b.op("Reshape", [matrix, b.const(np.array([*head_sizes, k, n], np.int64), "c:mat_shape")], hint=f"mat::{hint}")
    if not head_sizes:
        return b.op("MatMul", [rows, mat], hint=f"mm::{hint}")
    h = len(head_sizes)
    moved = b.op("Transpose", [rows], hint=f"heads_first::{hint}", perm=[*range(1, h + 1), 0, h + 1])
    out = b.op("MatMul", [moved, mat], hint=f"mm::{hint}")
    return b.op("Transpose", [out], hint=f"tokens_first::{hint}", perm=[h, *range(h), h + 1])


def _right_operand(ctx: RewriteContext, node: ir.Node, m: ir.Value) -> ir.Value:
    """The MatMul's matrix as a full tensor (cached keys/values with active rows written in, approx)."""
    form = ctx.forms.get(m)
    if not ctx.forms.is_edit_dependent(m):
        return form.value  # type: ignore[union-attr]
    if ctx.exact:
        raise Unsupported(f"'{m.name}' depends on the edit everywhere (self-attention stays dense in exact mode)")
    ctx.record.approximate(node, f"'{m.name}' is the original's (cached) with only the active tokens recomputed")
    return ctx.to_dense(m)


TOKEN_RULES: dict[str, Rule] = {
    **{op: rule_token_view for op in VIEW_OPS},
    **{op: rule_token_elementwise for op in UNARY_ELEMENTWISE | NARY_ELEMENTWISE},
    **{op: rule_token_pass_through for op in (*PASS_THROUGH, "Cast")},
    "Softmax": rule_token_softmax,
    "LogSoftmax": rule_token_softmax,
    "LayerNormalization": rule_token_layer_norm,
    **{op: rule_token_reduce for op in REDUCE_OPS},
    "Split": rule_token_split,
    "Slice": rule_token_slice,
    "MatMul": rule_token_matmul,
}
