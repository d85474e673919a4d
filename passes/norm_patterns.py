"""Normalisation spellings as onnxscript rewriter patterns, used for matching only.

A spelling is a pattern written as ONNX ops computing ``normalised`` from ``x`` over groups of
channels, optionally followed by the exporter's per-channel affine: ``Mul`` by ``gamma``, then
``Add`` of ``beta``, each constant on either side. ``x`` is a map ``[B, C, H, W]`` or a rank-3
``[B, C, L]`` (diffusers' attention blocks normalise the token view ``[B, C, H*W]``): channels on
axis 1, statistics per batch item over a group of channels times every other position. ``check``
fails with a reason for what the op graph cannot say (static shapes, constants, axes, group
counts); ``parameters`` reads the statistics' constants off a match. Nothing is rewritten here: the
sparse rewrite builds a new graph from the matches, so the patterns are not ``RewriteRule``s in a
``RewriteRuleSet``.

Adding a spelling: subclass :class:`NormSpelling` with ``normalise`` (the ops) and
``core_parameters`` (the check and the constants), and list it in :data:`SPELLINGS`;
:data:`NORM_PATTERNS` combines it with every affine tail.
"""

from __future__ import annotations

import abc
import itertools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchContext, MatchResult, pattern

from sigec.passes._ir_utils import attr, const_array, static_shape

# Pattern values (onnxscript's ValuePattern, which it does not export) and the op builder.
Value = Any
Op = pattern.OpsetPatternBuilder

DEFAULT_EPSILON = 1e-5  # InstanceNormalization's and GroupNormalization's default

# An affine step: (op type, whether the constant is the first operand).
AffineStep = tuple[str, bool]


@dataclass(frozen=True)
class NormParameters:
    """``y = ((x - mean_g) / sqrt(var_g + eps) * group_scale[g] + group_bias[g]) * gamma[c] + beta[c]``."""

    groups: int
    epsilon: float
    group_scale: np.ndarray
    group_bias: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray


class NotANorm(Exception):
    """A check failed; the message is the reason. (onnxscript's MatchFailureError is private.)"""


INPUT_RANKS = (3, 4)  # [B, C, L] and [B, C, H, W]


def _shape(value: ir.Value, ranks: tuple[int, ...], what: str) -> tuple[int, ...]:
    shape = static_shape(value)
    if shape is None or len(shape) not in ranks:
        wanted = " or ".join(str(r) for r in ranks)
        raise NotANorm(f"{what} '{value.name}' is not a static rank-{wanted} tensor (shape {value.shape})")
    return shape


def _constant(value: ir.Value | None, what: str) -> np.ndarray:
    arr = const_array(value)
    if arr is None:
        raise NotANorm(f"{what} is not a constant")
    return arr


def _channel_constant(value: ir.Value, channels: int, rank: int, what: str) -> np.ndarray:
    """A constant broadcasting per channel over a rank-``rank`` input (a scalar, or C on axis 1 once
    right-aligned: [C,1,1] or [1,C,1,1] for a map, [C,1] or [1,C,1] for [B, C, L]) as [C] float32."""
    arr = _constant(value, what)
    if arr.size == 1:
        return np.full(channels, float(arr.reshape(-1)[0]), np.float32)
    per_channel = (1, channels) + (1,) * (rank - 2)
    if arr.ndim <= rank and (1,) * (rank - arr.ndim) + tuple(arr.shape) == per_channel:
        return arr.reshape(-1).astype(np.float32)
    raise NotANorm(f"{what} of shape {tuple(arr.shape)} is not per channel of {channels}")


def _groups_and_channels(x: ir.Value, grouped: ir.Value, normalised: ir.Value) -> tuple[int, int]:
    """``(G, C)`` of ``Reshape(x) -> [B, G, -1] -> ... -> Reshape back to x's shape``."""
    xs = _shape(x, INPUT_RANKS, "input")
    gs = _shape(grouped, (3,), "grouped input")
    groups = gs[1]
    if gs[0] != xs[0] or groups <= 0 or xs[1] % groups:
        raise NotANorm(f"reshape {xs} -> {gs} does not split {xs[1]} channels into groups")
    if static_shape(normalised) != xs:
        raise NotANorm(f"reshape back gives {normalised.shape}, not the input's {xs}")
    return groups, xs[1]


def _check_over_last_axis(node: ir.Node) -> None:
    """A ReduceMean over the last axis of a rank-3 tensor, keeping dims (axes as attribute or input)."""
    axes = attr(node, "axes")
    if axes is None and len(node.inputs) > 1:
        arr = const_array(node.inputs[1])
        axes = None if arr is None else arr.reshape(-1).tolist()
    if not int(attr(node, "keepdims", 1)):
        raise NotANorm(f"ReduceMean '{node.name}' drops the reduced axis")
    if axes is None or [int(a) for a in axes] not in ([2], [-1]):
        raise NotANorm(f"ReduceMean '{node.name}' reduces axes {axes}, not the last of three")


def _check_square(node: ir.Node) -> None:
    """Mul(d, d), or Pow(d, 2) (the first element of a constant; exporters write a scalar)."""
    if node.op_type == "Pow":
        arr = const_array(node.inputs[1])
        if arr is None or arr.size == 0 or float(arr.reshape(-1)[0]) != 2.0:
            raise NotANorm(f"exponent '{node.inputs[1].name}' is not the constant 2")


class NormSpelling(pattern.PatternBase):
    """One spelling of a normalisation over channel groups, followed by an affine tail."""

    def __init__(self, tail: tuple[AffineStep, ...] = ()) -> None:
        steps = "".join(f"+{op}{'(c,y)' if first else '(y,c)'}" for op, first in tail)
        super().__init__(name=f"{type(self).__name__}{steps}")
        self.tail = tail

    @abc.abstractmethod
    def normalise(self, op: Op, x: Value, scale: Value, bias: Value, epsilon: Value) -> Value:
        """The spelling's ops; the last one's output is named ``normalised``."""

    @abc.abstractmethod
    def core_parameters(self, model: ir.Model, **bindings: Any) -> NormParameters:
        """The spelling's parameters (no affine tail) from a match's bindings; raises NotANorm."""

    def pattern(self, op: Op, x: Value, scale: Value, bias: Value, epsilon: Value, gamma: Value,
                beta: Value) -> Value:
        y = self.normalise(op, x, scale, bias, epsilon)
        for op_type, constant_first in self.tail:
            constant = gamma if op_type == "Mul" else beta
            operands = (constant, y) if constant_first else (y, constant)
            y = op.Mul(*operands) if op_type == "Mul" else op.Add(*operands)
        return y

    def check(self, context: MatchContext, **bindings: Any) -> MatchResult:
        try:
            self.parameters(context.model, **bindings)
        except NotANorm as reason:
            return MatchResult().fail(str(reason))
        return MatchResult()

    def parameters(self, model: ir.Model, gamma: ir.Value | None = None, beta: ir.Value | None = None,
                   **bindings: Any) -> NormParameters:
        """The parameters of a match, the affine tail folded into ``gamma`` and ``beta``; raises NotANorm."""
        p = self.core_parameters(model, **bindings)
        channels, rank = p.gamma.shape[0], len(static_shape(bindings["x"]) or ())  # checked by core_parameters
        for op_type, _ in self.tail:
            if op_type == "Mul":
                factor = _channel_constant(gamma, channels, rank, "gamma")
                p = replace(p, gamma=p.gamma * factor, beta=p.beta * factor)
            else:
                p = replace(p, beta=p.beta + _channel_constant(beta, channels, rank, "beta"))
        return p


def _identity_affine(groups: int, channels: int, epsilon: float, group_scale: np.ndarray | None = None,
                     group_bias: np.ndarray | None = None) -> NormParameters:
    """Parameters with gamma = 1, beta = 0 (and group scale 1, bias 0 unless given)."""
    return NormParameters(
        groups=groups, epsilon=epsilon,
        group_scale=np.ones(groups, np.float32) if group_scale is None else group_scale,
        group_bias=np.zeros(groups, np.float32) if group_bias is None else group_bias,
        gamma=np.ones(channels, np.float32), beta=np.zeros(channels, np.float32))


class ReshapeInstanceNorm(NormSpelling):
    """GroupNorm as torch exports it: Reshape [B, G, -1], InstanceNormalization, Reshape back."""

    def normalise(self, op: Op, x: Value, scale: Value, bias: Value, epsilon: Value) -> Value:
        grouped = op.Reshape(x, pattern.ANY_VALUE, _outputs=["grouped"])
        instance = op.InstanceNormalization(grouped, scale, bias, _outputs=["instance_normalised"])
        return op.Reshape(instance, pattern.ANY_VALUE, _outputs=["normalised"])

    def core_parameters(self, model: ir.Model, *, x: ir.Value, grouped: ir.Value, normalised: ir.Value,
                        instance_normalised: ir.Value, scale: ir.Value, bias: ir.Value, **_: Any) -> NormParameters:
        groups, channels = _groups_and_channels(x, grouped, normalised)
        gs, gb = _constant(scale, "instance scale"), _constant(bias, "instance bias")
        epsilon = float(attr(instance_normalised.producer(), "epsilon", DEFAULT_EPSILON))
        return _identity_affine(groups, channels, epsilon, gs.astype(np.float32).reshape(-1),
                                gb.astype(np.float32).reshape(-1))


class ReduceMeanChain(NormSpelling):
    """GroupNorm written out: Reshape [B, G, -1], ReduceMean, Sub, Pow 2 (or Mul), ReduceMean, Add eps,
    Sqrt, Div, Reshape back."""

    # The node checks live in core_parameters, on named outputs: onnxscript (0.7) drops the node- and
    # value-level checks (``_check=``) of nodes matched inside an OrValue alternative.
    def normalise(self, op: Op, x: Value, scale: Value, bias: Value, epsilon: Value) -> Value:
        grouped = op.Reshape(x, pattern.ANY_VALUE, _outputs=["grouped"])
        mean = op.ReduceMean(grouped, _allow_other_inputs=True, _outputs=["mean"])
        centred = op.Sub(grouped, mean)
        square = pattern.OrValue([op.Pow(centred, pattern.ANY_VALUE, _outputs=["square"]),
                                  op.Mul(centred, centred, _outputs=["square"])])
        variance = op.ReduceMean(square, _allow_other_inputs=True, _outputs=["variance"])
        shifted = pattern.OrValue([op.Add(variance, epsilon), op.Add(epsilon, variance)])
        return op.Reshape(op.Div(centred, op.Sqrt(shifted)), pattern.ANY_VALUE, _outputs=["normalised"])

    def core_parameters(self, model: ir.Model, *, x: ir.Value, grouped: ir.Value, normalised: ir.Value,
                        mean: ir.Value, square: ir.Value, variance: ir.Value, epsilon: ir.Value,
                        **_: Any) -> NormParameters:
        groups, channels = _groups_and_channels(x, grouped, normalised)
        _check_over_last_axis(mean.producer())
        _check_square(square.producer())
        _check_over_last_axis(variance.producer())
        eps = _constant(epsilon, "epsilon")
        if eps.size != 1:
            raise NotANorm(f"epsilon of shape {tuple(eps.shape)} is not a scalar")
        return _identity_affine(groups, channels, float(eps.reshape(-1)[0]))


class InstanceNorm(NormSpelling):
    """InstanceNormalization of ``[B, C, H, W]`` or ``[B, C, L]`` (groups == channels)."""

    def normalise(self, op: Op, x: Value, scale: Value, bias: Value, epsilon: Value) -> Value:
        return op.InstanceNormalization(x, scale, bias, _outputs=["normalised"])

    def core_parameters(self, model: ir.Model, *, x: ir.Value, normalised: ir.Value, scale: ir.Value,
                        bias: ir.Value, **_: Any) -> NormParameters:
        channels = _shape(x, INPUT_RANKS, "input")[1]
        gs, gb = _constant(scale, "scale"), _constant(bias, "bias")
        epsilon = float(attr(normalised.producer(), "epsilon", DEFAULT_EPSILON))
        return _identity_affine(channels, channels, epsilon, gs.astype(np.float32).reshape(-1),
                                gb.astype(np.float32).reshape(-1))


class GroupNorm(NormSpelling):
    """GroupNormalization of ``[B, C, H, W]`` or ``[B, C, L]``: per-group scale and bias (opset 18),
    per-channel from opset 21."""

    def normalise(self, op: Op, x: Value, scale: Value, bias: Value, epsilon: Value) -> Value:
        return op.GroupNormalization(x, scale, bias, _outputs=["normalised"])

    def core_parameters(self, model: ir.Model, *, x: ir.Value, normalised: ir.Value, scale: ir.Value,
                        bias: ir.Value, **_: Any) -> NormParameters:
        channels = _shape(x, INPUT_RANKS, "input")[1]
        sc, bi = _constant(scale, "scale"), _constant(bias, "bias")
        node = normalised.producer()
        groups = attr(node, "num_groups")
        if not groups:
            raise NotANorm("num_groups is missing")
        epsilon = float(attr(node, "epsilon", DEFAULT_EPSILON))
        # Before opset 21 the scale was per group; a [C] scale is per channel only from 21 (or when G == C).
        if sc.size == channels and (model.opset_imports.get("", 18) >= 21 or channels == groups):
            p = _identity_affine(int(groups), channels, epsilon)
            return replace(p, gamma=sc.astype(np.float32), beta=bi.astype(np.float32))
        if sc.size == groups:
            return _identity_affine(int(groups), channels, epsilon, sc.astype(np.float32), bi.astype(np.float32))
        raise NotANorm(f"scale of {sc.size} values: per group needs {groups}, per channel ({channels}) needs opset 21")


def _affine_tails() -> list[tuple[AffineStep, ...]]:
    """The exporter's affine tails, longest first: Mul by gamma then Add beta, each constant on either side."""
    muls, adds = [("Mul", False), ("Mul", True)], [("Add", False), ("Add", True)]
    return [*itertools.product(muls, adds), *((m,) for m in muls), ()]


SPELLINGS: tuple[type[NormSpelling], ...] = (ReshapeInstanceNorm, ReduceMeanChain, InstanceNorm, GroupNorm)

# Every spelling with every affine tail, longest first; at a node the first that matches wins.
NORM_PATTERNS: tuple[NormSpelling, ...] = tuple(
    spelling(tail) for tail in _affine_tails() for spelling in SPELLINGS)
