"""ONNX reductions: Reduce* (axes as attribute or input), ArgMax/ArgMin."""

from __future__ import annotations

from typing import Callable

import torch

from .torch_onnx_ops_common import Inputs, NodeAttrs, OpFn, normalize_axis, opt, to_ints

# A reduction over explicit axes (possibly none): (data, axes, keepdims) -> reduced.
Reducer = Callable[[torch.Tensor, list[int], bool], torch.Tensor]


def _reduce_axes(attrs: NodeAttrs, x: Inputs) -> list[int]:
    """The axes to reduce: the ``axes`` input (or attribute before opset 18); empty means all
    axes unless ``noop_with_empty_axes``, in which case nothing is reduced."""
    data = x[0]
    axes_input = opt(x, 1)
    axes = to_ints(axes_input) if axes_input is not None else attrs.ints("axes", [])
    if not axes:
        return [] if attrs.get("noop_with_empty_axes", 0) else list(range(data.dim()))
    return sorted({normalize_axis(a, data.dim()) for a in axes})


def _reduction(reducer: Reducer) -> OpFn:
    """Wrap a reducer into an ONNX Reduce* op (``keepdims`` defaults to 1)."""

    def op(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
        return reducer(x[0], _reduce_axes(attrs, x), bool(attrs.get("keepdims", 1)))

    return op


def _sum(data: torch.Tensor, axes: list[int], keepdims: bool) -> torch.Tensor:
    # torch.sum treats dim=[] as "all axes": an empty reduction is the identity instead.
    return torch.sum(data, dim=axes, keepdim=keepdims, dtype=data.dtype) if axes else data


def _mean(data: torch.Tensor, axes: list[int], keepdims: bool) -> torch.Tensor:
    if not axes:
        return data
    if data.is_floating_point():
        return torch.mean(data, dim=axes, keepdim=keepdims)
    count = 1
    for a in axes:
        count *= data.shape[a]
    return torch.div(_sum(data, axes, keepdims), count, rounding_mode="trunc")


def _max(data: torch.Tensor, axes: list[int], keepdims: bool) -> torch.Tensor:
    return torch.amax(data, dim=axes, keepdim=keepdims) if axes else data


def _min(data: torch.Tensor, axes: list[int], keepdims: bool) -> torch.Tensor:
    return torch.amin(data, dim=axes, keepdim=keepdims) if axes else data


def _prod(data: torch.Tensor, axes: list[int], keepdims: bool) -> torch.Tensor:
    for axis in sorted(axes, reverse=True):
        data = torch.prod(data, dim=axis, keepdim=keepdims, dtype=data.dtype)
    return data


REDUCE_OPS: dict[str, OpFn] = {
    "ReduceSum": _reduction(_sum),
    "ReduceMean": _reduction(_mean),
    "ReduceMax": _reduction(_max),
    "ReduceMin": _reduction(_min),
    "ReduceProd": _reduction(_prod),
    "ReduceSumSquare": _reduction(lambda d, a, k: _sum(d * d, a, k)),
    "ReduceL1": _reduction(lambda d, a, k: _sum(d.abs(), a, k)),
    "ReduceL2": _reduction(lambda d, a, k: torch.sqrt(_sum(d * d, a, k))),
    "ReduceLogSum": _reduction(lambda d, a, k: torch.log(_sum(d, a, k))),
    "ReduceLogSumExp": _reduction(lambda d, a, k: torch.logsumexp(d, dim=a, keepdim=k) if a else d),
}


def _arg_extreme(largest: bool) -> OpFn:
    """ArgMax/ArgMin along ``axis`` (0); ``keepdims`` 1; ``select_last_index`` picks the last tie."""

    def op(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
        data = x[0]
        axis = normalize_axis(attrs.get("axis", 0), data.dim())
        keepdims = bool(attrs.get("keepdims", 1))
        find = torch.argmax if largest else torch.argmin
        if not attrs.get("select_last_index", 0):
            return find(data, dim=axis, keepdim=keepdims)
        flipped = find(data.flip(axis), dim=axis, keepdim=keepdims)
        return data.shape[axis] - 1 - flipped

    return op


REDUCE_OPS["ArgMax"] = _arg_extreme(largest=True)
REDUCE_OPS["ArgMin"] = _arg_extreme(largest=False)
