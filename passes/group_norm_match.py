"""Recognise group/instance normalisation, native or in the decomposed forms exporters produce."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from sigec.passes._ir_utils import attr, const_array, static_shape


@dataclass
class NormMatch:
    """A normalisation over groups of channels (GroupNorm; InstanceNorm is ``groups == C``).

    ``y = ((x - mean_g) / sqrt(var_g + eps) * group_scale[g] + group_bias[g]) * gamma[c] + beta[c]``
    with statistics per batch item and group ``g`` of channel ``c``.
    """

    nodes: list[ir.Node]
    x: ir.Value
    y: ir.Value
    groups: int
    epsilon: float
    group_scale: np.ndarray
    group_bias: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    internal: set[ir.Value] = field(default_factory=set)

    def per_channel(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(group_scale, group_bias)`` broadcast to channels, and ``gamma``, ``beta`` ([C] each)."""
        channels = self.gamma.shape[0]
        rep = channels // self.groups
        return (np.repeat(self.group_scale, rep), np.repeat(self.group_bias, rep), self.gamma, self.beta)


def _single_consumer(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _channel_const(value: ir.Value, channels: int) -> np.ndarray | None:
    """A constant that broadcasts per channel over NCHW (scalar, [C,1,1] or [1,C,1,1]) as [C]."""
    arr = const_array(value)
    if arr is None:
        return None
    if arr.size == 1:
        return np.full(channels, float(arr.reshape(-1)[0]), np.float32)
    if tuple(arr.shape) in ((channels, 1, 1), (1, channels, 1, 1)):
        return arr.reshape(-1).astype(np.float32)
    return None


def _extend_affine(match: NormMatch, channels: int) -> None:
    """Absorb a following per-channel Mul and Add (the exporter's gamma and beta) into the match."""
    for op in ("Mul", "Add"):
        nxt = _single_consumer(match.y)
        if nxt is None or nxt.op_type != op or nxt.domain != "":
            return
        other = nxt.inputs[1] if nxt.inputs[0] is match.y else nxt.inputs[0]
        arr = _channel_const(other, channels)
        if arr is None:
            return
        if op == "Mul":
            match.gamma = match.gamma * arr
            match.beta = match.beta * arr
        else:
            match.beta = match.beta + arr
        match.internal.add(match.y)
        match.nodes.append(nxt)
        match.y = nxt.outputs[0]


def _match_reshape_instance_norm(reshape: ir.Node) -> NormMatch | None:
    x = reshape.inputs[0]
    xs = static_shape(x) if x is not None else None
    if xs is None or len(xs) != 4:
        return None
    xr = reshape.outputs[0]
    xrs = static_shape(xr)
    if xrs is None or len(xrs) != 3 or xrs[0] != xs[0]:
        return None
    groups = xrs[1]
    if groups <= 0 or xs[1] % groups:
        return None
    inorm = _single_consumer(xr)
    if inorm is None or inorm.op_type != "InstanceNormalization":
        return None
    back = _single_consumer(inorm.outputs[0])
    if back is None or back.op_type != "Reshape" or static_shape(back.outputs[0]) != xs:
        return None
    gs, gb = const_array(inorm.inputs[1]), const_array(inorm.inputs[2])
    if gs is None or gb is None:
        return None
    channels = xs[1]
    match = NormMatch(nodes=[reshape, inorm, back], x=x, y=back.outputs[0], groups=groups,
                      epsilon=float(attr(inorm, "epsilon", 1e-5)),
                      group_scale=gs.astype(np.float32).reshape(-1), group_bias=gb.astype(np.float32).reshape(-1),
                      gamma=np.ones(channels, np.float32), beta=np.zeros(channels, np.float32),
                      internal={xr, inorm.outputs[0]})
    _extend_affine(match, channels)
    return match


def _reduce_axes_last(node: ir.Node) -> bool:
    """True for a ReduceMean over the last axis of a rank-3 tensor, keeping dims."""
    if node.op_type != "ReduceMean" or not int(attr(node, "keepdims", 1)):
        return False
    axes = attr(node, "axes")
    if axes is None and len(node.inputs) > 1:
        arr = const_array(node.inputs[1])
        axes = None if arr is None else arr.reshape(-1).tolist()
    return axes is not None and [int(a) for a in axes] in ([2], [-1])


def _match_reduce_mean_chain(reshape: ir.Node) -> NormMatch | None:
    """Reshape[B,G,-1] -> ReduceMean, Sub, Pow 2 (or Mul), ReduceMean, Add eps, Sqrt, Div -> Reshape."""
    x = reshape.inputs[0]
    xs = static_shape(x) if x is not None else None
    xr = reshape.outputs[0]
    xrs = static_shape(xr)
    if xs is None or len(xs) != 4 or xrs is None or len(xrs) != 3 or xrs[0] != xs[0] or xs[1] % xrs[1]:
        return None
    users = {u.node.op_type: u.node for u in xr.uses()}
    mean_node, sub = users.get("ReduceMean"), users.get("Sub")
    if len(xr.uses()) != 2 or mean_node is None or sub is None or not _reduce_axes_last(mean_node):
        return None
    if sub.inputs[0] is not xr or sub.inputs[1] is not mean_node.outputs[0]:
        return None
    d = sub.outputs[0]
    d_users = [u.node for u in d.uses()]
    sq = next((n for n in d_users if n.op_type in ("Pow", "Mul")), None)
    div = next((n for n in d_users if n.op_type == "Div"), None)
    if sq is None or div is None or len(d_users) != 2:
        return None
    if sq.op_type == "Pow":
        exponent = const_array(sq.inputs[1])
        if exponent is None or float(exponent.reshape(-1)[0]) != 2.0:
            return None
    elif not (sq.inputs[0] is d and sq.inputs[1] is d):
        return None
    var_node = _single_consumer(sq.outputs[0])
    if var_node is None or not _reduce_axes_last(var_node):
        return None
    add_eps = _single_consumer(var_node.outputs[0])
    if add_eps is None or add_eps.op_type != "Add":
        return None
    eps = const_array(add_eps.inputs[1]) if add_eps.inputs[0] is var_node.outputs[0] else const_array(add_eps.inputs[0])
    sqrt = _single_consumer(add_eps.outputs[0])
    if eps is None or eps.size != 1 or sqrt is None or sqrt.op_type != "Sqrt" or _single_consumer(sqrt.outputs[0]) is not div:
        return None
    if div.inputs[0] is not d or div.inputs[1] is not sqrt.outputs[0]:
        return None
    back = _single_consumer(div.outputs[0])
    if back is None or back.op_type != "Reshape" or static_shape(back.outputs[0]) != xs:
        return None
    groups, channels = xrs[1], xs[1]
    nodes = [reshape, mean_node, sub, sq, var_node, add_eps, sqrt, div, back]
    internal = {xr, mean_node.outputs[0], d, sq.outputs[0], var_node.outputs[0], add_eps.outputs[0],
                sqrt.outputs[0], div.outputs[0]}
    match = NormMatch(nodes=nodes, x=x, y=back.outputs[0], groups=groups, epsilon=float(eps.reshape(-1)[0]),
                      group_scale=np.ones(groups, np.float32), group_bias=np.zeros(groups, np.float32),
                      gamma=np.ones(channels, np.float32), beta=np.zeros(channels, np.float32), internal=internal)
    _extend_affine(match, channels)
    return match


def _match_instance_norm(node: ir.Node) -> NormMatch | None:
    xs = static_shape(node.inputs[0])
    gs, gb = const_array(node.inputs[1]), const_array(node.inputs[2])
    if xs is None or len(xs) != 4 or gs is None or gb is None:
        return None
    channels = xs[1]
    match = NormMatch(nodes=[node], x=node.inputs[0], y=node.outputs[0], groups=channels,
                      epsilon=float(attr(node, "epsilon", 1e-5)),
                      group_scale=gs.astype(np.float32).reshape(-1), group_bias=gb.astype(np.float32).reshape(-1),
                      gamma=np.ones(channels, np.float32), beta=np.zeros(channels, np.float32))
    _extend_affine(match, channels)
    return match


def _match_group_normalization(node: ir.Node, opset: int) -> NormMatch | None:
    xs = static_shape(node.inputs[0])
    scale, bias = const_array(node.inputs[1]), const_array(node.inputs[2])
    groups = attr(node, "num_groups")
    if xs is None or len(xs) != 4 or scale is None or bias is None or not groups:
        return None
    channels = xs[1]
    ones_g, zeros_g = np.ones(groups, np.float32), np.zeros(groups, np.float32)
    if scale.size == channels and (opset >= 21 or channels == groups):
        gs, gb, gamma, beta = ones_g, zeros_g, scale.astype(np.float32), bias.astype(np.float32)
    elif scale.size == groups:
        gs, gb = scale.astype(np.float32), bias.astype(np.float32)
        gamma, beta = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    else:
        return None
    match = NormMatch(nodes=[node], x=node.inputs[0], y=node.outputs[0], groups=int(groups),
                      epsilon=float(attr(node, "epsilon", 1e-5)), group_scale=gs, group_bias=gb, gamma=gamma, beta=beta)
    _extend_affine(match, channels)
    return match


def find_norms(model: ir.Model) -> dict[ir.Node, NormMatch]:
    """All normalisation matches, keyed by their first node (in topological order)."""
    opset = model.opset_imports.get("", 18)
    found: dict[ir.Node, NormMatch] = {}
    claimed: set[ir.Node] = set()
    for node in model.graph:
        if node in claimed or node.domain != "":
            continue
        match = None
        if node.op_type == "Reshape":
            match = _match_reshape_instance_norm(node) or _match_reduce_mean_chain(node)
        elif node.op_type == "InstanceNormalization":
            match = _match_instance_norm(node)
        elif node.op_type == "GroupNormalization":
            match = _match_group_normalization(node, opset)
        if match is not None:
            found[node] = match
            claimed.update(match.nodes)
    return found
