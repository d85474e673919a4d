"""Recognise group/instance normalisation, native or in the decomposed forms exporters produce.

The spellings are the patterns of :mod:`sigec.passes.norm_patterns`; this module matches them over a
graph and returns the records the sparse rewrite consumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchingTracer, MatchResult

from sigec.passes.norm_patterns import NORM_PATTERNS, NormParameters, NormSpelling


@dataclass(frozen=True)
class NormMatch(NormParameters):
    """A normalisation over groups of channels (GroupNorm; InstanceNorm is ``groups == C``) found in a
    graph: its parameters (:class:`NormParameters`), the matched ``nodes``, input ``x``, output ``y`` and
    the ``internal`` values only the match uses. Statistics are per batch item and group."""

    nodes: list[ir.Node] = field(default_factory=list)
    x: ir.Value | None = None
    y: ir.Value | None = None
    internal: set[ir.Value] = field(default_factory=set)

    def per_channel(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(group_scale, group_bias)`` broadcast to channels, and ``gamma``, ``beta`` ([C] each)."""
        channels = self.gamma.shape[0]
        rep = channels // self.groups
        return (np.repeat(self.group_scale, rep), np.repeat(self.group_bias, rep), self.gamma, self.beta)


def _record(model: ir.Model, spelling: NormSpelling, match: MatchResult, order: dict[ir.Node, int]) -> NormMatch:
    nodes = sorted(match.nodes, key=order.__getitem__)
    y = match.outputs[0]
    p = spelling.parameters(model, **match.bindings)
    return NormMatch(**{f.name: getattr(p, f.name) for f in fields(NormParameters)}, nodes=nodes,
                     x=match.bindings["x"], y=y, internal={n.outputs[0] for n in nodes} - {y})


def match_norm(model: ir.Model, root: ir.Node,
               tracer: MatchingTracer | None = None) -> tuple[NormSpelling, MatchResult] | None:
    """The first spelling whose pattern ends at ``root``, with its match, or None."""
    for spelling in NORM_PATTERNS:
        # The sparse rewrite drops matched nodes: the values they compute, but for the last,
        # must not be used outside the match.
        match = spelling.match(model, model.graph, root, check_nodes_are_removable=True, tracer=tracer)
        if match:
            return spelling, match
    return None


def mismatch_reasons(model: ir.Model, root: ir.Node) -> dict[str, str]:
    """Why each spelling that matched part of the graph ending at ``root`` failed (empty when one matches)."""
    tracer = MatchingTracer()
    if match_norm(model, root, tracer) is not None:
        return {}
    return {str(rule): infos[0].match_result.reason for rule, infos in tracer.best_matches_map.items() if infos}


def find_norms(model: ir.Model) -> dict[ir.Node, NormMatch]:
    """All normalisation matches, keyed by their first node (in topological order).

    Roots are tried from the graph's end so that a match takes the longest affine tail; a match's
    intermediate values are used only inside it, so matches never overlap.
    """
    nodes = list(model.graph)
    order = {node: i for i, node in enumerate(nodes)}
    found: list[NormMatch] = []
    claimed: set[ir.Node] = set()
    for root in reversed(nodes):
        if root in claimed:
            continue
        matched = match_norm(model, root)
        if matched is not None:
            found.append(_record(model, *matched, order))
            claimed.update(found[-1].nodes)
    return {m.nodes[0]: m for m in sorted(found, key=lambda m: order[m.nodes[0]])}
