"""Element-wise ONNX ops: activations, math, arithmetic, comparison, logic, casts."""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from .torch_onnx_ops_common import Inputs, NodeAttrs, OpFn, opt, torch_dtype


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> OpFn:
    """An op whose single output is ``fn`` of its single input."""
    return lambda attrs, x: fn(x[0])


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    """An op whose output is ``fn`` of its two (broadcast) inputs."""
    return lambda attrs, x: fn(x[0], x[1])


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    """An op folding ``fn`` over all its (broadcast) inputs, left to right."""
    return lambda attrs, x: functools.reduce(fn, [t for t in x if t is not None])


# -- activations -------------------------------------------------------------------------------


def leaky_relu(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``x if x >= 0 else alpha * x`` (alpha 0.01)."""
    alpha = attrs.get("alpha", 0.01)
    return torch.where(x[0] >= 0, x[0], x[0] * alpha)


def prelu(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``x if x >= 0 else slope * x`` with ``slope`` broadcast to ``x``."""
    return torch.where(x[0] >= 0, x[0], x[0] * x[1])


def elu(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``x if x >= 0 else alpha * (exp(x) - 1)`` (alpha 1)."""
    alpha = attrs.get("alpha", 1.0)
    return torch.where(x[0] >= 0, x[0], alpha * torch.expm1(x[0]))


def selu(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``gamma * (x if x > 0 else alpha * exp(x) - alpha)``."""
    alpha = attrs.get("alpha", 1.67326319217681884765625)
    gamma = attrs.get("gamma", 1.05070102214813232421875)
    return torch.where(x[0] > 0, gamma * x[0], gamma * alpha * torch.expm1(x[0]))


def hard_sigmoid(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``max(0, min(1, alpha * x + beta))`` (alpha 0.2, beta 0.5)."""
    return torch.clamp(x[0] * attrs.get("alpha", 0.2) + attrs.get("beta", 0.5), 0.0, 1.0)


def hard_swish(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``x * max(0, min(1, x / 6 + 1 / 2))``."""
    return x[0] * torch.clamp(x[0] * (1.0 / 6.0) + 0.5, 0.0, 1.0)


def softplus(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``log(exp(x) + 1)``, computed without overflow."""
    return F.softplus(x[0])


def softsign(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``x / (1 + |x|)``."""
    return x[0] / (1 + x[0].abs())


def gelu(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Gaussian error linear unit, exact (``approximate="none"``) or the tanh approximation."""
    return F.gelu(x[0], approximate=attrs.get("approximate", "none"))


def mish(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``x * tanh(softplus(x))``."""
    return x[0] * torch.tanh(F.softplus(x[0]))


def clip(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``min(max(x, min), max)``; bounds are inputs (opset >= 11) or attributes (older)."""
    v = x[0]
    if attrs.opset < 11:
        lo, hi = attrs.get("min"), attrs.get("max")
    else:
        lo, hi = opt(x, 1), opt(x, 2)
        lo = None if lo is None else lo.to(v.dtype)
        hi = None if hi is None else hi.to(v.dtype)
    if lo is not None:
        v = torch.maximum(v, torch.as_tensor(lo, dtype=v.dtype, device=v.device))
    if hi is not None:
        v = torch.minimum(v, torch.as_tensor(hi, dtype=v.dtype, device=v.device))
    return v


def is_inf(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Whether each element is +inf (``detect_positive``) or -inf (``detect_negative``)."""
    positive = torch.isposinf(x[0]) & bool(attrs.get("detect_positive", 1))
    negative = torch.isneginf(x[0]) & bool(attrs.get("detect_negative", 1))
    return positive | negative


# -- arithmetic ------------------------------------------------------------------------------


def div(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``a / b``; integer division truncates toward zero."""
    a, b = x[0], x[1]
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def mod(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Remainder: sign of the divisor (``fmod`` 0, integers) or of the dividend (``fmod`` 1)."""
    a, b = x[0], x[1]
    if attrs.get("fmod", 0) or a.is_floating_point():
        return torch.fmod(a, b)
    return torch.remainder(a, b)


def pow_(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``a ** b``, of ``a``'s dtype."""
    return torch.pow(x[0], x[1]).to(x[0].dtype)


def mean(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Element-wise mean of all inputs (broadcast)."""
    tensors = [t for t in x if t is not None]
    return functools.reduce(torch.add, tensors) / len(tensors)


def where(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``a if cond else b`` element-wise."""
    return torch.where(x[0].to(torch.bool), x[1], x[2])


# -- casts -------------------------------------------------------------------------------------


def cast(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Convert to the element type of attribute ``to`` (float -> int truncates)."""
    return x[0].to(torch_dtype(attrs["to"]))


def cast_like(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Convert the first input to the dtype of the second."""
    return x[0].to(x[1].dtype)


def identity(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """The input itself."""
    return x[0]


def dropout(attrs: NodeAttrs, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference-mode dropout: the input, and an all-true mask."""
    return x[0], torch.ones_like(x[0], dtype=torch.bool)


ELEMENTWISE_OPS: dict[str, OpFn] = {
    # activations
    "Relu": _unary(torch.relu),
    "LeakyRelu": leaky_relu,
    "PRelu": prelu,
    "Elu": elu,
    "Selu": selu,
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "HardSigmoid": hard_sigmoid,
    "HardSwish": hard_swish,
    "Softplus": softplus,
    "Softsign": softsign,
    "Gelu": gelu,
    "Mish": mish,
    "Clip": clip,
    # unary math
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Sign": _unary(torch.sign),
    "Erf": _unary(torch.erf),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Tan": _unary(torch.tan),
    "Atan": _unary(torch.atan),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Round": _unary(torch.round),  # half to even, as ONNX
    "IsNaN": _unary(torch.isnan),
    "IsInf": is_inf,
    # arithmetic
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": div,
    "Mod": mod,
    "Pow": pow_,
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Mean": mean,
    "Where": where,
    # comparison and logic
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "Not": _unary(torch.logical_not),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor),
    # casts and pass-through
    "Cast": cast,
    "CastLike": cast_like,
    "Identity": identity,
    "Dropout": dropout,
}
