"""Run 5-D operations over a singleton depth axis (``[N, C, 1, H, W]``) as their 2-D versions."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_ir as ir

from sigec.passes._ir_utils import attr, const_array, make_initializer, static_shape

DEPTH = 2  # the axis a 5-D NCDHW tensor loses when it is run as NCHW

ELEMENTWISE = {
    # unary
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Floor",
    "Ceil", "Round", "Sign", "Sin", "Cos", "Identity", "Dropout", "Clip", "Cast", "ThresholdedRelu",
    # n-ary (broadcasting)
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where",
    # per-channel: axis 1 keeps its meaning, statistics over (1, H, W) equal those over (H, W)
    "BatchNormalization", "InstanceNormalization",
}
POOLS = {"MaxPool", "AveragePool", "LpPool"}
GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool"}
RESHAPES = {"Reshape", "Squeeze", "Unsqueeze", "Flatten"}  # row-major data unchanged, only the shape


class SqueezeSingletonAxesPass(ir.passes.InPlacePass):
    """Rewrite 5-D convolutions (and what surrounds them) over a depth-1 axis into 2-D ones.

    A *flat* value is 5-D ``[N, C, 1, H, W]``; its *twin* is a 4-D ``[N, C, H, W]`` value with the
    same data (the pass also follows 4-D values with the same row-major data through reshapes).
    Every rule is exact: dropping a size-1 axis that no kernel, pad or stride reaches changes no
    number.

    Rewrite rules (nodes in topological order):
    1. ``Unsqueeze`` / ``Reshape`` / ``Squeeze`` / ``Flatten``, and a ``Transpose`` that moves only
       size-1 axes, from a 4-D value to a 5-D one, or from a value that has a twin: the output has
       the same data as that 4-D value (no node changes). Such a node whose output has exactly the
       twin's 4-D shape is bypassed: its consumers read the twin.
    2. ``Conv`` / ``ConvTranspose`` on a flat input with a constant ``[.., .., 1, kh, kw]`` weight,
       no depth padding (and no depth output padding) and a flat output becomes the 2-D op on the
       twin with the depth entry dropped from every attribute; the weight is squeezed.
    3. ``MaxPool`` / ``AveragePool`` / ``LpPool`` with depth kernel 1 and no depth padding,
       ``GlobalAveragePool`` / ``GlobalMaxPool``, ``Resize`` with constant scales or sizes of 1 on
       the depth axis (no ``axes``, no roi), and ``Concat`` on axis 1 likewise become 2-D.
    4. Element-wise ops, ``BatchNormalization`` and ``InstanceNormalization`` with a flat output run
       on twins; other operands are kept when of rank <= 2 (they broadcast against H, W alike) or
       are constants reshaped to drop the depth axis.
    5. A flat input without a twin gets one from ``Squeeze(axes=[2])``; a rewritten node's output
       stays available as 5-D through ``Unsqueeze(axes=[2])`` for consumers that were not
       rewritten and for graph outputs (which keep their names). Unused leftovers are removed by
       the unused-node pass that follows.
    Anything else (depth kernels > 1, depth padding, 5-D values with depth > 1) is left as is.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if not any(_is_flat(v) for node in graph for v in node.outputs) and not any(
                _is_flat(v) for v in graph.inputs):
            return ir.passes.PassResult(model, False)
        rewriter = _Rewriter(graph)
        for node in list(graph):
            if node.domain == "":
                rewriter.visit(node)
        return ir.passes.PassResult(model, rewriter.modified)


def _is_flat(value: ir.Value | None) -> bool:
    shape = static_shape(value) if value is not None else None
    return shape is not None and len(shape) == 5 and shape[DEPTH] == 1


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(shape[:DEPTH]) + tuple(shape[DEPTH + 1:])


def _drop_depth(values: Sequence[int] | None, axis: int = 0) -> list[int] | None:
    return None if values is None else [int(v) for i, v in enumerate(values) if i != axis]


class _Rewriter:
    """The twins found so far and the node builders; one instance per graph."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.twins: dict[ir.Value, ir.Value] = {}
        self.modified = False
        self._names = {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs} | set(
            graph.initializers) | {n.name for n in graph}
        self._axes: ir.Value | None = None

    # -- helpers

    def _fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def _depth_axes(self) -> ir.Value:
        if self._axes is None:
            self._axes = make_initializer(self.graph, "depth_axis", np.array([DEPTH], np.int64))
        return self._axes

    def _add(self, before: ir.Node, op_type: str, inputs: Sequence[ir.Value | None], attrs: Sequence[ir.Attr],
             shape: Sequence[int], like: ir.Value, name: str) -> ir.Value:
        """Insert a single-output node before ``before``; its output gets ``like``'s type and ``shape``."""
        node = ir.Node("", op_type, inputs, attributes=attrs, name=self._fresh(f"{name}_node"), num_outputs=1)
        self.graph.insert_before(before, node)
        out = node.outputs[0]
        out.name = self._fresh(name)
        out.type = like.type
        out.shape = ir.Shape(list(shape))
        return out

    def _twin(self, value: ir.Value, before: ir.Node) -> ir.Value:
        """The 4-D twin of a flat value (a new ``Squeeze`` when it has none yet)."""
        shape = _squeezed(static_shape(value))
        twin = self.twins.get(value)
        if twin is None or static_shape(twin) != shape:
            twin = self._add(before, "Squeeze", [value, self._depth_axes()], [], shape, value, f"{value.name}_2d")
            self.twins[value] = twin
        return twin

    def _constant(self, value: ir.Value, array: np.ndarray) -> ir.Value:
        return make_initializer(self.graph, f"{value.name or 'const'}_2d", array)

    def _replace(self, node: ir.Node, op_type: str, inputs: Sequence[ir.Value | None],
                 attrs: Sequence[ir.Attr]) -> None:
        """Replace ``node`` (one flat output) by the 2-D op on ``inputs``; keep a 5-D copy for the rest."""
        old = node.outputs[0]
        name, node_name = old.name, node.name
        flat_out = self._add(node, op_type, inputs, attrs, _squeezed(static_shape(old)), old, f"{name}_2d")
        restored = self._add(node, "Unsqueeze", [flat_out, self._depth_axes()], [], static_shape(old), old,
                             f"{name}_5d")
        old.replace_all_uses_with(restored, replace_graph_outputs=True)
        self.graph.remove(node, safe=True)
        # The 2-D node takes over the original names (reports and caches refer to them), except a
        # graph output, which must keep its name and 5-D shape.
        flat_out.producer().name = node_name
        if restored.is_graph_output():
            restored.name = name
        else:
            flat_out.name = name
        self.twins[restored] = flat_out
        self.modified = True

    # -- rules

    def visit(self, node: ir.Node) -> None:
        """Apply the first rule that fits ``node``."""
        op = node.op_type
        outs = [o for o in node.outputs if o.uses() or o.is_graph_output()]
        if len(outs) != 1 or outs[0] is not node.outputs[0] or static_shape(node.outputs[0]) is None:
            return
        if op in RESHAPES or op == "Transpose":
            self._reshape_like(node)
        elif not _is_flat(node.outputs[0]):
            return
        elif op in ("Conv", "ConvTranspose"):
            self._conv(node)
        elif op in POOLS or op in GLOBAL_POOLS:
            self._pool(node)
        elif op == "Resize":
            self._resize(node)
        elif op == "Concat":
            if attr(node, "axis") in (1, -4) and all(_is_flat(v) for v in node.inputs):
                self._replace(node, "Concat", [self._twin(v, node) for v in node.inputs],
                              [ir.AttrInt64("axis", 1)])
        elif op in ELEMENTWISE:
            self._elementwise(node)

    def _reshape_like(self, node: ir.Node) -> None:
        src, out = node.inputs[0], node.outputs[0]
        src_shape, out_shape = static_shape(src), static_shape(out)
        if src_shape is None or out_shape is None:
            return
        if _reorders(node, src_shape):
            return
        base = self.twins.get(src)
        if base is None and len(src_shape) == 4 and len(out_shape) == 5:
            base = src  # entering a 5-D region, e.g. [N, C, H, W] -> [N, C, 1, H, W]
        if base is None:
            return
        if out_shape == static_shape(base):
            self._bypass(node, base)
        else:
            self.twins[out] = base

    def _bypass(self, node: ir.Node, base: ir.Value) -> None:
        out = node.outputs[0]
        if out.is_graph_output():
            name, node_name = out.name, node.name
            same = self._add(node, "Identity", [base], [], static_shape(base), out, f"{name}_2d")
            out.replace_all_uses_with(same, replace_graph_outputs=True)
            self.graph.remove(node, safe=True)
            same.name = name
            same.producer().name = node_name
        else:
            out.replace_all_uses_with(base)
        self.modified = True

    def _conv(self, node: ir.Node) -> None:
        x = node.inputs[0]
        weight = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if not _is_flat(x) or weight is None or weight.ndim != 5 or weight.shape[DEPTH] != 1:
            return
        pads = attr(node, "pads")
        if pads is not None and (pads[0] or pads[3]):
            return
        output_padding = attr(node, "output_padding")
        output_shape = attr(node, "output_shape")
        if output_padding is not None and output_padding[0] or output_shape is not None and output_shape[0] != 1:
            return
        attrs: list[ir.Attr] = []
        for name, a in node.attributes.items():
            if name in ("kernel_shape", "strides", "dilations", "output_padding", "output_shape"):
                attrs.append(ir.AttrInt64s(name, _drop_depth(a.value)))
            elif name == "pads":
                attrs.append(ir.AttrInt64s(name, [int(v) for v in (pads[1], pads[2], pads[4], pads[5])]))
            else:
                attrs.append(a)
        w2 = self._constant(node.inputs[1], weight.squeeze(DEPTH))
        self._replace(node, node.op_type, [self._twin(x, node), w2, *node.inputs[2:]], attrs)

    def _pool(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if not _is_flat(x):
            return
        if node.op_type in GLOBAL_POOLS:
            self._replace(node, node.op_type, [self._twin(x, node)], list(node.attributes.values()))
            return
        kernel, pads = attr(node, "kernel_shape"), attr(node, "pads")
        if kernel is None or kernel[0] != 1 or pads is not None and (pads[0] or pads[3]):
            return
        attrs: list[ir.Attr] = []
        for name, a in node.attributes.items():
            if name in ("kernel_shape", "strides", "dilations"):
                attrs.append(ir.AttrInt64s(name, _drop_depth(a.value)))
            elif name == "pads":
                attrs.append(ir.AttrInt64s(name, [int(v) for v in (pads[1], pads[2], pads[4], pads[5])]))
            else:
                attrs.append(a)
        self._replace(node, node.op_type, [self._twin(x, node)], attrs)

    def _resize(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if not _is_flat(x) or "axes" in node.attributes:
            return
        inputs = list(node.inputs) + [None] * (4 - len(node.inputs))
        roi = const_array(inputs[1]) if inputs[1] is not None else None
        if inputs[1] is not None and (roi is None or roi.size):
            return
        new: list[ir.Value | None] = [self._twin(x, node), None, None, None]
        for i in (2, 3):
            if inputs[i] is None:
                continue
            array = const_array(inputs[i])
            if array is None:
                return
            if array.size == 0:
                new[i] = inputs[i]
                continue
            if array.shape != (5,) or array[DEPTH] != 1:
                return
            new[i] = self._constant(inputs[i], np.delete(array, DEPTH))
        while new and new[-1] is None:
            new.pop()
        self._replace(node, "Resize", new, list(node.attributes.values()))

    def _elementwise(self, node: ir.Node) -> None:
        if not any(_is_flat(v) for v in node.inputs):
            return
        inputs: list[ir.Value | None] = []
        for v in node.inputs:
            shape = static_shape(v) if v is not None else None
            if v is None or shape is not None and len(shape) <= 2:
                inputs.append(v)  # rank <= 2 operands broadcast against (H, W) in 4-D and 5-D alike
            elif _is_flat(v):
                inputs.append(v)
            else:
                array = const_array(v)
                axis = DEPTH - (5 - array.ndim) if array is not None else -1
                if axis < 0 or array.shape[axis] != 1:
                    return
                inputs.append(self._constant(v, array.squeeze(axis)))
        inputs = [self._twin(v, node) if _is_flat(v) else v for v in inputs]
        self._replace(node, node.op_type, inputs, list(node.attributes.values()))


def _reorders(node: ir.Node, src_shape: Sequence[int]) -> bool:
    """True when a reshape-like node reorders elements (a Transpose that moves an axis of size > 1)."""
    if node.op_type != "Transpose":
        return node.op_type not in RESHAPES
    perm = attr(node, "perm") or list(reversed(range(len(src_shape))))
    moved = [p for p in perm if src_shape[p] != 1]
    return moved != sorted(moved)
