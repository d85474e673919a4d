"""Token rules: spatial maps seen as tokens (Reshape/Transpose views), per-token ops and attention."""

from __future__ import annotations

import onnx_ir as ir

from sigec.passes.sparse_context import RewriteContext
from sigec.passes.sparse_rules import Rule

TOKEN_RULES: dict[str, Rule] = {}


def takes_token_rule(ctx: RewriteContext, node: ir.Node) -> bool:
    """True when the node has a token rule and reads tokens (or views a sparse map as tokens)."""
    return node.op_type in TOKEN_RULES
