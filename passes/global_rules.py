"""Rules for global reductions of sparse maps (spatial pooling), tried before such nodes become dense islands.

Each rule receives the rewrite context and an original node whose input is a Sparse map and whose
output is not a feature map (e.g. GlobalAveragePool's [B, C, 1, 1]); it raises ``Unsupported`` to
leave the node to the later steps of the decision table.
"""

from __future__ import annotations

from sigec.passes.sparse_rules import Rule

GLOBAL_RULES: dict[str, Rule] = {}
