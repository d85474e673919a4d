"""MAC accounting from the manifest's node reports: dense cost and cost for a set of active tiles.

The rule, in ``CostModel`` only: a sparse or approx node with ``macs_per_tile`` and a resolution
executes ``macs_per_tile`` per active tile of that resolution; a dense node (a dense island)
executes its ``dense_macs`` on every sparse run; every other node (static: computed once per key
by ``prime``, constant, ...) executes nothing.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from sigec.core.mask_program import TileIndex


class CostModel:
    """Precomputed MAC totals so that a run's cost is a few multiplications (used on every ``run``)."""

    def __init__(self, nodes: Sequence[Mapping[str, Any]]) -> None:
        self.dense = sum(int(n.get("dense_macs", 0)) for n in nodes if n["kind"] != "static")
        self.fixed = sum(int(n.get("dense_macs", 0)) for n in nodes if n["kind"] == "dense")
        self.per_tile: dict[str, int] = {}
        for n in nodes:
            if n["kind"] in ("sparse", "approx") and n.get("macs_per_tile") and n.get("resolution"):
                self.per_tile[n["resolution"]] = self.per_tile.get(n["resolution"], 0) + int(n["macs_per_tile"])

    def executed(self, tiles: Mapping[str, TileIndex]) -> int:
        """MACs of a sparse run with the given active tiles per resolution."""
        return self.fixed + sum(m * tiles[r].count for r, m in self.per_tile.items() if r in tiles)


def dense_macs(nodes: Sequence[Mapping[str, Any]]) -> int:
    """MACs of one dense run of the model (static nodes, computed once per key, excluded)."""
    return CostModel(nodes).dense


def node_macs(node: Mapping[str, Any], tiles: Mapping[str, TileIndex]) -> int:
    """MACs one node executes in a sparse run with the given active tiles."""
    return CostModel([node]).executed(tiles)


def executed_macs(nodes: Sequence[Mapping[str, Any]], tiles: Mapping[str, TileIndex]) -> int:
    """MACs of a sparse run with the given active tiles."""
    return CostModel(nodes).executed(tiles)
