"""Normalisation rules of approx mode beyond the frozen one on tiles (passes/sparse_rules.py): updated
statistics on tiles, and frozen statistics on tokens.

Updated statistics (``norm_stats="updated"``): GroupNorm / InstanceNorm of an edited map with the
statistics of the map the SPARSE graph computes, updated from the active tiles.

The FULL graph caches the original's per-(batch, group) mean ``m0`` and variance ``v0``
(``stats::mean::<x>``, ``stats::var::<x>``, [B, G, 1], passes/stats_graph.py). Outside the active tiles
``x`` equals its cached original, so with ``n = H * W * C / G`` values per group and, on every active
tile, ``d = vals - old`` (``old``: a TileGather of x's cache; 0 past the map's bottom/right border:
:func:`sigec.passes.global_rules.tile_change`), the sums and sums of squares of ``x - m0`` are the
original's plus the active tiles' new minus old contributions::

    S1[b, g] = sum of d                                  (the original's is 0)
    S2[b, g] = sum of (vals - m0)^2 - (old - m0)^2 = sum of d * (2 * (vals - m0) - d)   (the original's: n * v0)
    mean = m0 + S1 / n,    var = v0 + S2 / n - (S1 / n)^2

over the active tiles of batch item ``b`` and the channels of group ``g``. Centring on ``m0`` (rather
than summing ``x`` and ``x^2``) keeps float32 cancellation to the size of the change. Per-tile sums
``[N, 2C]`` go to batch items with :func:`sigec.passes.global_rules.per_batch_sum`; the per-channel
scale and shift then follow as the FULL graph computes frozen ones
(:func:`sigec.passes.stats_graph.affine_of_moments`) and are applied on the tiles
(:func:`sigec.passes.sparse_rules.apply_norm`). Work is O(active tiles) plus [B, C]-sized arithmetic.

The statistics equal the dense ones of that map up to float rounding (tests/test_norm_stats.py). What
stays approximate (listed in the manifest): the normalisation's output outside the active tiles keeps
its cached value, computed with the original's statistics, where it is read from its cache (a
scatter, a dense consumer); a consumer that reads it through the fused prologue (the next gather's
halo) applies the updated scale and shift to x's cached values instead.

``run(update_cache=True)``: the new mean and variance replace the moments caches (whole-cache
updates: ``CacheRegistry.recomputed``, passes/cache_update_outputs.py) as x's tiles are written, so the
caches stay consistent for the next run.

Falls back to frozen statistics, with the reason in the node report, when ``x`` is not a float32
Sparse map on the output's resolution (e.g. a model input or a dense island's output read on tiles).

Tokens (:func:`rule_token_norm`): diffusers' attention blocks normalise the token view ``[B, C, H*W]``
of a map. On its active tokens (``vals [M, C]``) the normalisation is ``x * scale[b, c] + shift[b, c]``
with the statistics frozen by FULL, the rows of ``scale`` and ``shift`` gathered by each token's batch
item; ``y`` stays tokens, so the Q/K/V Linear layers and attention that follow run on the active
tokens. Always frozen: ``norm_stats="updated"`` keeps frozen statistics there (the note says so).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sigec.passes.global_rules import per_batch_sum, tile_change
from sigec.passes.group_norm_match import NormMatch
from sigec.passes.sparse_context import RewriteContext, Unsupported, dtype_of, shape_of
from sigec.passes.sparse_forms import Sparse, Tokens
from sigec.passes.sparse_rules import apply_norm, rule_frozen_norm
from sigec.passes.stats_graph import affine_of_moments

NOTE = "normalisation with statistics updated from the active tiles"
TOKEN_NOTE = "per token: normalisation with frozen statistics"


def rule_updated_norm(ctx: RewriteContext, match: NormMatch) -> None:
    """Group/instance normalisation (approx mode) with updated statistics (module docstring); frozen
    statistics when the input is not a float32 Sparse map."""
    x = match.x
    form = ctx.forms.get(x)
    res = ctx.grids.res_of(match.y)
    try:
        if not isinstance(form, Sparse) or form.res != res:
            raise Unsupported(f"'{x.name}' is not a sparse map of {res.name}")
        if dtype_of(x) != ir.DataType.FLOAT:
            raise Unsupported(f"'{x.name}' is {dtype_of(x)}, not float32")
        mean0, var0 = ctx.caches.group_moments(match, ctx.batch, res.name)
    except Unsupported as exc:
        rule_frozen_norm(ctx, match, reason=f"no updated statistics: {exc}")
        return
    mean, var = _updated_moments(ctx, match, form, mean0, var0)
    ctx.caches.recomputed[mean0.name] = mean
    ctx.caches.recomputed[var0.name] = var
    scale, shift = affine_of_moments(ctx.graph, match, mean, var, ctx.batch)
    apply_norm(ctx, match, form, scale, shift, NOTE)
    ctx.record.approximate(match.nodes[0], f"normalisation of '{x.name}' uses statistics updated from the "
                                           f"active tiles; outside them its output keeps the original's values")


def _updated_moments(ctx: RewriteContext, match: NormMatch, form: Sparse, mean0: ir.Value, var0: ir.Value
                     ) -> tuple[ir.Value, ir.Value]:
    """The per-group mean and variance [B, G, 1] of the map: the cached ``mean0`` and ``var0`` plus the
    active tiles' change."""
    b, name = ctx.graph, match.x.name
    batch, channels, height, width = shape_of(match.x)
    groups = int(match.groups)
    f32 = np.dtype(np.float32)
    d = tile_change(ctx, form, f32, name)  # [N, C, T, T]
    per_group = b.const(np.array([batch, groups, channels // groups], np.int64), "c:expand")
    mean0_c = b.op("Reshape", [b.op("Expand", [mean0, per_group], hint="mean0_e"),
                               b.const(np.array([batch, channels], np.int64), "c:bc")], hint=f"mean0_c::{name}")
    mean0_t = b.op("Reshape", [b.op("Gather", [mean0_c, ctx.grids.batch_index(form.res)], hint="mean0_per_tile",
                                    axis=0),
                               b.const(np.array([-1, channels, 1, 1], np.int64), "c:per_tile_shape")],
                   hint=f"mean0_tiles::{name}")
    centred = b.op("Sub", [form.vals, mean0_t], hint=f"centred_tiles::{name}")  # vals - m0
    twice_less_d = b.op("Sub", [b.op("Add", [centred, centred], hint="twice_centred"), d], hint="new_plus_old")
    square_change = b.op("Mul", [d, twice_less_d], hint=f"square_change::{name}")  # (vals-m0)^2 - (old-m0)^2
    axes = b.const(np.array([2, 3], np.int64), "c:axes23")
    per_tile = b.op("Concat", [b.op("ReduceSum", [d, axes], hint="tile_sum", keepdims=0),
                               b.op("ReduceSum", [square_change, axes], hint="tile_square_sum", keepdims=0)],
                    hint=f"tile_sums::{name}", axis=1)  # [N, 2C]
    per_item = per_batch_sum(ctx, form.res, per_tile, f32, f"moment_change::{name}")  # [B, 2C]
    grouped = b.op("Reshape", [per_item, b.const(np.array([batch, 2, groups, channels // groups], np.int64),
                                                 "c:two_groups")], hint="moment_change_grouped")
    change = b.op("Mul", [b.op("ReduceSum", [grouped, b.const(np.array([3], np.int64), "c:axis3")],
                               hint="moment_change_sum", keepdims=1),
                          b.const(np.array(1.0 / (height * width * channels // groups), np.float32), "c:inv_count")],
                  hint=f"moment_change_mean::{name}")  # [B, 2, G, 1]: S1 / n, S2 / n
    mean_change = b.op("Gather", [change, b.const(np.array(0, np.int64), "c:zero")], hint="mean_change", axis=1)
    square_mean = b.op("Gather", [change, b.const(np.array(1, np.int64), "c:one")], hint="square_change_mean",
                       axis=1)
    mean = b.op("Add", [mean0, mean_change], hint=f"updated_mean::{name}")
    var = b.op("Sub", [b.op("Add", [var0, square_mean], hint="var_plus"),
                       b.op("Mul", [mean_change, mean_change], hint="mean_change_sq")], hint="var_unclipped")
    var = b.op("Max", [var, b.const(np.array(0.0, np.float32), "c:zero_f")], hint=f"updated_var::{name}")
    return mean, var


def rule_token_norm(ctx: RewriteContext, match: NormMatch, reason: str = "") -> None:
    """Group/instance normalisation (approx mode) of tokens whose axis 1 holds the channels alone, batch
    items on axis 0 (``[B, C, H*W]``): ``y = x * scale[b, c] + shift[b, c]`` per active token, statistics
    frozen by FULL; ``y`` is tokens of ``x``'s layout. ``reason``: why updated statistics were not used,
    for the report. Unsupported when ``x`` is not such tokens."""
    x, y = match.x, match.y
    src = ctx.forms.get(x)
    if not isinstance(src, Tokens):
        raise Unsupported(f"'{x.name}' is not tokens")
    layout = src.layout
    if layout.axes[0] != ("b",) or len(layout.axes[1]) != 1 or layout.features != layout.axes[1]:
        raise Unsupported(f"tokens '{x.name}' hold {[list(a) for a in layout.axes]}, not [batch, channels, "
                          f"positions] with the channels as their only feature")
    scale, shift = ctx.caches.frozen_stats(match, ctx.batch, layout.size(layout.features[0]))  # [B, C]
    b = ctx.graph
    if ctx.batch > 1:  # one row per token (M, C); a single batch item's [1, C] broadcasts as it is
        batch_of = ctx.grids.token_index(src.res).batch
        scale = b.op("Gather", [scale, batch_of], hint=f"scale_per_token::{x.name}", axis=0)
        shift = b.op("Gather", [shift, batch_of], hint=f"shift_per_token::{x.name}", axis=0)
    vals = b.op("Add", [b.op("Mul", [src.vals, scale], hint="token_norm_mul"), shift], hint=f"vals::{y.name}")
    ctx.set_tokens(y, vals, src.res, src.mask, layout)
    note = TOKEN_NOTE + (f" ({reason})" if reason else "")
    for node in match.nodes:
        ctx.record.report(node, "approx", resolution=src.res.name, tile=src.res.tile, note=note)
    ctx.record.approximate(match.nodes[0], f"normalisation of '{x.name}' uses statistics frozen from the original")
