"""Graph nodes for normalisation statistics: the FULL graph's frozen per-channel scale and shift and
per-group moments, and the scale and shift of given moments (shared with the SPARSE graph's updated
statistics, passes/norm_stats.py). The normalised ``x`` is a map ``[B, C, H, W]`` or a rank-3
``[B, C, L]`` (an attention block's token view): channels on axis 1, a group's statistics over its
channels times every other position."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_ir as ir

from sigec.core.names import cache_source
from sigec.passes.graph_builder import GraphBuilder
from sigec.passes.group_norm_match import NormMatch
from sigec.passes.sparse_context import StatsRequest


def _reduce_mean(b: GraphBuilder, x: ir.Value, axes: Sequence[int], opset: int, hint: str,
                 output: str | None = None) -> ir.Value:
    if opset >= 18:
        return b.op("ReduceMean", [x, b.const(np.array(axes, np.int64), "c:axes")], hint=hint, keepdims=1,
                    output=output)
    return b.op("ReduceMean", [x], hint=hint, axes=list(axes), keepdims=1, output=output)


def _group_moments(b: GraphBuilder, x: ir.Value, groups: int, batch: int, opset: int,
                   names: tuple[str | None, str | None] = (None, None)) -> tuple[ir.Value, ir.Value]:
    """Per-group mean and variance of ``x`` [B, C, ...] (rank 3 or 4) over its channels' positions: [B, G, 1]
    each."""
    xr = b.op("Reshape", [x, b.const(np.array([batch, groups, -1], np.int64), "c:group_shape")], hint="stats_grouped")
    mean = _reduce_mean(b, xr, [2], opset, "stats_mean", names[0])
    centered = b.op("Sub", [xr, mean], hint="stats_centered")
    var = _reduce_mean(b, b.op("Mul", [centered, centered], hint="stats_sq"), [2], opset, "stats_var", names[1])
    return mean, var


def affine_of_moments(b: GraphBuilder, match: NormMatch, mean: ir.Value, var: ir.Value, batch: int,
                      names: tuple[str | None, str | None] = (None, None)) -> tuple[ir.Value, ir.Value]:
    """Per-channel ``scale`` and ``shift`` [B, C] of the normalisation ``match`` from the per-group ``mean``
    and ``var`` [B, G, 1] (``names``: output names, None for generated ones).

    With the inverse deviation ``r = 1 / sqrt(var + eps)``:
    ``scale[b, c] = r[b, g] * group_scale[c] * gamma[c]`` and
    ``shift[b, c] = (group_bias[c] - m[b, g] * r[b, g] * group_scale[c]) * gamma[c] + beta[c]``.
    """
    channels, groups = int(match.gamma.shape[0]), int(match.groups)
    gs, gb, gamma, beta = match.per_channel()
    var_eps = b.op("Add", [var, b.const(np.array(match.epsilon, np.float32), "c:eps")], hint="stats_var_eps")
    inv = b.op("Reciprocal", [b.op("Sqrt", [var_eps], hint="stats_std")], hint="stats_inv")
    expand_shape = b.const(np.array([batch, groups, channels // groups], np.int64), "c:expand")
    to_channels = b.const(np.array([batch, channels], np.int64), "c:bc")
    inv_c = b.op("Reshape", [b.op("Expand", [inv, expand_shape], hint="stats_inv_e"), to_channels], hint="stats_inv_c")
    mean_c = b.op("Reshape", [b.op("Expand", [mean, expand_shape], hint="stats_mean_e"), to_channels],
                  hint="stats_mean_c")
    k = b.const((gs * gamma).astype(np.float32), "c:gs_gamma")
    scale = b.op("Mul", [inv_c, k], hint="stats_scale", output=names[0])
    shift_const = b.const((gb * gamma + beta).astype(np.float32), "c:gb_gamma_beta")
    mean_scale = b.op("Mul", [mean_c, scale], hint="stats_mean_scale")
    shift = b.op("Sub", [shift_const, mean_scale], hint="stats_shift", output=names[1])
    return scale, shift


def add_norm_statistics(b: GraphBuilder, request: StatsRequest, x: ir.Value, batch: int, opset: int) -> None:
    """Append nodes computing ``stats::scale::x`` and ``stats::shift::x`` ([B, C]) from ``x``, as outputs
    (frozen statistics)."""
    channels = int(x.shape[1])  # type: ignore[index]
    mean, var = _group_moments(b, x, int(request.match.groups), batch, opset)
    scale, shift = affine_of_moments(b, request.match, mean, var, batch,
                                     (cache_source(request.caches[0]), cache_source(request.caches[1])))
    b.output(scale, ir.DataType.FLOAT, [batch, channels])
    b.output(shift, ir.DataType.FLOAT, [batch, channels])


def add_norm_moments(b: GraphBuilder, request: StatsRequest, x: ir.Value, batch: int, opset: int) -> None:
    """Append nodes computing ``stats::mean::x`` and ``stats::var::x`` ([B, G, 1]) from ``x``, as outputs
    (the original's moments that updated statistics start from)."""
    groups = int(request.match.groups)
    moments = _group_moments(b, x, groups, batch, opset,
                             (cache_source(request.caches[0]), cache_source(request.caches[1])))
    for moment in moments:
        b.output(moment, ir.DataType.FLOAT, [batch, groups, 1])
