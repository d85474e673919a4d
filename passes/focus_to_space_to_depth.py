"""Rewrite the "Focus" layer (strided spatial slices concatenated on channels) as ``SpaceToDepth``."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sigec.passes._ir_utils import attr, const_array, make_initializer, static_shape

Offset = tuple[int, int]  # (row, column) start of one strided slice


class FocusToSpaceToDepthPass(ir.passes.InPlacePass):
    """Replace ``Concat`` of strided slices of one image by ``SpaceToDepth`` (YOLOv5 / YOLOX "Focus").

    Rewrite rules:
    1. ``Concat(axis=1)`` whose inputs are each a chain of ``Slice`` nodes of one 4-D source ``x``
       that take every ``r``-th row and column (step ``r`` on axes 2 and 3, starts in ``[0, r)``,
       ends at or past the border, no other axis sliced), covering each of the ``r * r`` offsets
       once, with ``H`` and ``W`` divisible by ``r``, is ``SpaceToDepth(x, r)`` up to the order of
       its channel blocks: SpaceToDepth puts offset ``(dy, dx)`` at block ``dy * r + dx``.
    2. The channel order is folded into the consumers: when the blocks are already in that order
       the Concat's consumers read the SpaceToDepth directly; otherwise every consumer must be a
       ``Conv`` with ``group = 1`` and a constant weight, whose input channels are permuted
       accordingly (exact up to the order of the sum).
    3. Anything else is left as is (the slices then run as a dense island).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type == "Concat" and node.domain == "":
                modified |= _rewrite(model.graph, node)
        return ir.passes.PassResult(model, modified)


def _slice_steps(node: ir.Node, rank: int) -> dict[int, tuple[int, int, int]] | None:
    """{axis: (start, end, step)} of a Slice with constant arguments, or None."""
    args = [const_array(v) if v is not None else None for v in node.inputs[1:]]
    if len(args) < 2 or args[0] is None or args[1] is None or any(
            v is not None and a is None for v, a in zip(node.inputs[3:], args[2:])):
        return None
    starts, ends = args[0].tolist(), args[1].tolist()
    axes = args[2].tolist() if len(args) > 2 and args[2] is not None else list(range(len(starts)))
    steps = args[3].tolist() if len(args) > 3 and args[3] is not None else [1] * len(starts)
    return {int(a) % rank: (int(s), int(e), int(t)) for a, s, e, t in zip(axes, starts, ends, steps)}


def _focus_offset(value: ir.Value) -> tuple[ir.Value, int, Offset] | None:
    """(source, r, (dy, dx)) when ``value`` is a chain of Slices taking every r-th row and column."""
    per_axis: dict[int, tuple[int, int, int]] = {}
    node = value.producer()
    while node is not None and node.op_type == "Slice" and node.domain == "":
        source = node.inputs[0]
        shape = static_shape(source)
        steps = _slice_steps(node, len(shape)) if shape is not None and len(shape) == 4 else None
        if steps is None or set(steps) & set(per_axis):
            return None
        for axis, (start, end, step) in steps.items():
            size = shape[axis]
            start = start + size if start < 0 else start
            if axis in (2, 3) and step > 1 and 0 <= start < step and end >= size:
                per_axis[axis] = (start, end, step)
            elif start == 0 and end >= size and step == 1:
                continue  # a no-op slice of this axis
            else:
                return None
        node = source.producer()
        value = source
    if set(per_axis) != {2, 3} or per_axis[2][2] != per_axis[3][2]:
        return None
    return value, per_axis[2][2], (per_axis[2][0], per_axis[3][0])


def _rewrite(graph: ir.Graph, concat: ir.Node) -> bool:
    if attr(concat, "axis") not in (1, -3) or concat.outputs[0].is_graph_output():
        return False
    found = [_focus_offset(v) for v in concat.inputs]
    if not found or any(f is None for f in found):
        return False
    sources = {f[0] for f in found}
    r = found[0][1]
    offsets = [f[2] for f in found]
    source = found[0][0]
    shape = static_shape(source)
    if len(sources) != 1 or any(f[1] != r for f in found) or sorted(offsets) != [
            (dy, dx) for dy in range(r) for dx in range(r)] or shape[2] % r or shape[3] % r:
        return False
    channels = shape[1]
    # Concat channel k * C + c holds SpaceToDepth channel (dy_k * r + dx_k) * C + c.
    order = np.array([(dy * r + dx) * channels + c for dy, dx in offsets for c in range(channels)])
    consumers = list(concat.outputs[0].uses())
    identity = bool((order == np.arange(order.size)).all())
    if not identity:
        for use in consumers:
            conv = use.node
            weight = const_array(conv.inputs[1]) if conv.op_type == "Conv" and len(conv.inputs) > 1 else None
            if use.idx != 0 or weight is None or int(attr(conv, "group", 1)) != 1 or conv.domain != "":
                return False
    s2d = ir.Node("", "SpaceToDepth", [source], attributes=[ir.AttrInt64("blocksize", r)],
                  name=f"{concat.name}_space_to_depth", num_outputs=1)
    graph.insert_before(concat, s2d)
    out = s2d.outputs[0]
    out.name = f"{concat.outputs[0].name}_space_to_depth"
    out.type = concat.outputs[0].type
    out.shape = ir.Shape([shape[0], channels * r * r, shape[2] // r, shape[3] // r])
    for use in consumers:
        conv = use.node
        if not identity:
            weight = const_array(conv.inputs[1])
            permuted = np.empty_like(weight)
            permuted[:, order] = weight  # input channel k*C+c of the Concat is channel order[...] of s2d
            conv.replace_input_with(1, make_initializer(graph, f"{conv.inputs[1].name}_s2d", permuted))
        conv.replace_input_with(use.idx, out)
    graph.remove(concat, safe=True)
    return True
