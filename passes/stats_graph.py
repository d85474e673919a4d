"""FULL-graph nodes that compute frozen normalisation statistics as per-channel scale and shift."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_ir as ir

from sigec.core.names import cache_source
from sigec.passes.graph_builder import GraphBuilder
from sigec.passes.sparse_context import StatsRequest


def _reduce_mean(b: GraphBuilder, x: ir.Value, axes: Sequence[int], opset: int, hint: str) -> ir.Value:
    if opset >= 18:
        return b.op("ReduceMean", [x, b.const(np.array(axes, np.int64), "c:axes")], hint=hint, keepdims=1)
    return b.op("ReduceMean", [x], hint=hint, axes=list(axes), keepdims=1)


def add_norm_statistics(b: GraphBuilder, request: StatsRequest, x: ir.Value, batch: int, opset: int) -> None:
    """Append nodes computing ``stats::scale::x`` and ``stats::shift::x`` ([B, C]) from ``x``, as outputs.

    With per-group mean ``m`` and inverse deviation ``r = 1 / sqrt(var + eps)``:
    ``scale[b, c] = r[b, g] * group_scale[c] * gamma[c]`` and
    ``shift[b, c] = (group_bias[c] - m[b, g] * r[b, g] * group_scale[c]) * gamma[c] + beta[c]``.
    """
    match = request.match
    channels, groups = int(x.shape[1]), int(match.groups)  # type: ignore[index]
    gs, gb, gamma, beta = match.per_channel()
    xr = b.op("Reshape", [x, b.const(np.array([batch, groups, -1], np.int64), "c:group_shape")], hint="stats_grouped")
    mean = _reduce_mean(b, xr, [2], opset, "stats_mean")
    centered = b.op("Sub", [xr, mean], hint="stats_centered")
    var = _reduce_mean(b, b.op("Mul", [centered, centered], hint="stats_sq"), [2], opset, "stats_var")
    var_eps = b.op("Add", [var, b.const(np.array(match.epsilon, np.float32), "c:eps")], hint="stats_var_eps")
    inv = b.op("Reciprocal", [b.op("Sqrt", [var_eps], hint="stats_std")], hint="stats_inv")
    expand_shape = b.const(np.array([batch, groups, channels // groups], np.int64), "c:expand")
    to_channels = b.const(np.array([batch, channels], np.int64), "c:bc")
    inv_c = b.op("Reshape", [b.op("Expand", [inv, expand_shape], hint="stats_inv_e"), to_channels], hint="stats_inv_c")
    mean_c = b.op("Reshape", [b.op("Expand", [mean, expand_shape], hint="stats_mean_e"), to_channels],
                  hint="stats_mean_c")
    k = b.const((gs * gamma).astype(np.float32), "c:gs_gamma")
    scale = b.op("Mul", [inv_c, k], hint="stats_scale", output=cache_source(request.scale_cache))
    shift_const = b.const((gb * gamma + beta).astype(np.float32), "c:gb_gamma_beta")
    mean_scale = b.op("Mul", [mean_c, scale], hint="stats_mean_scale")
    shift = b.op("Sub", [shift_const, mean_scale], hint="stats_shift", output=cache_source(request.shift_cache))
    b.output(scale, ir.DataType.FLOAT, [batch, channels])
    b.output(shift, ir.DataType.FLOAT, [batch, channels])
