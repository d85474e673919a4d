"""The SPARSE graph of a canonical model: one decision per node, taken by one table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import onnx_ir as ir

from sigec.core.errors import CompileError
from sigec.passes._ir_utils import node_label, static_shape
from sigec.passes.graph_builder import SIGEC_DOMAIN
from sigec.passes.group_norm_match import NormMatch, find_norms
from sigec.passes.macs import dense_macs
from sigec.passes.sparse_context import RewriteContext, Unsupported, dtype_of
from sigec.passes.sparse_forms import EMPTY_MASK, PIXEL_MASK, Dense, Form, Sparse, Tokens
from sigec.passes.global_rules import GLOBAL_RULES
from sigec.passes.norm_stats import rule_token_norm, rule_updated_norm
from sigec.passes.sparse_rules import RULES, Rule, rule_frozen_norm
from sigec.passes.token_rules import TOKEN_RULES, takes_token_rule

# Ops that are well defined as dense islands (global or layout ops) without needing --fallback.
DENSE_ISLAND_OPS = {
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MatMul", "Gemm", "Einsum", "Softmax",
    "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare",
    "GlobalAveragePool", "GlobalMaxPool", "InstanceNormalization", "GroupNormalization", "LayerNormalization",
    "Split", "Slice", "Gather", "Shape", "Expand", "Tile", "Attention", "ArgMax", "TopK", "CumSum", "Size",
    "ConstantOfShape", "Range",
}
ONNX_DOMAINS = ("", "ai.onnx")


@dataclass
class NodeWalk:
    """The walk over the canonical model's nodes: the context plus what only the walk needs."""

    ctx: RewriteContext
    norms: dict[ir.Node, NormMatch]  # approx mode: normalisations by their first node
    static: set[str]  # names of values that depend only on non-spatial inputs
    frozen: set[ir.Node] = field(default_factory=set)  # nodes of normalisations rewritten with frozen statistics
    unsupported: list[str] = field(default_factory=list)
    reason: str = ""  # why the sparse rule declined the current node

    def input_kind(self, node: ir.Node) -> str:
        """``edit`` if an input depends on the edit, else ``static`` if one is static, else ``constant``."""
        kind = "constant"
        for v in node.inputs:
            if v is None:
                continue
            if self.ctx.forms.is_edit_dependent(v):
                return "edit"
            if v.name in self.static:
                kind = "static"
        return kind

    def island_inputs(self, node: ir.Node) -> list[bool]:
        """For each edit-dependent input: is it an island output (Dense, may differ anywhere)?"""
        forms = [self.ctx.forms.get(v) for v in node.inputs if v is not None and self.ctx.forms.is_edit_dependent(v)]
        return [isinstance(f, Dense) and f.mask is None for f in forms]

    def rule(self, node: ir.Node) -> Rule | None:
        """The sparse rule of the node's op, if any."""
        return RULES.get(node.op_type) if node.domain in ONNX_DOMAINS else None

    def read_static(self, value: ir.Value) -> None:
        """A static value becomes a cache input the first time the SPARSE graph reads it."""
        if value.name in self.static and not self.ctx.forms.has(value):
            self.ctx.forms.set(value, Dense(self.ctx.caches.cache(value.name, kind="static"), EMPTY_MASK))


@dataclass(frozen=True)
class Next:
    """An action's answer when it leaves the node to the following steps (``reason``: why it declined)."""

    reason: str = ""


Predicate = Callable[[NodeWalk, ir.Node], bool]
Action = Callable[[NodeWalk, ir.Node], "Next | None"]


@dataclass(frozen=True)
class Step:
    """One row of the decision table: if ``applies``, ``act`` (None: the node is done; Next: go on)."""

    name: str
    applies: Predicate
    act: Action


# ----- actions ---------------------------------------------------------------------------------
def _dense(note: str) -> Action:
    """The node runs unchanged on full tensors (sparse inputs scattered into their caches)."""
    def act(w: NodeWalk, node: ir.Node) -> None:
        _run_dense(w.ctx, node, note)
    return act


def _run_dense(ctx: RewriteContext, node: ir.Node, note: str, resolution: str | None = None) -> None:
    outs = ctx.graph.copy(node, [None if v is None else ctx.to_dense(v) for v in node.inputs])
    for out, new in zip(node.outputs, outs):
        if out.name:
            ctx.forms.set(out, Dense(new, None))
    ctx.record.report(node, "dense", dense_macs=dense_macs(node), note=note,
                      **({"resolution": resolution} if resolution else {}))


def _on_dense_resolution(w: NodeWalk, node: ir.Node) -> None:
    res = w.ctx.grids.dense_resolution_of(node)
    _run_dense(w.ctx, node, f"resolution {res} runs dense (dense_resolutions)", res)


def _freeze_norm(w: NodeWalk, node: ir.Node) -> None:
    rule = rule_updated_norm if w.ctx.options.norm_stats == "updated" else rule_frozen_norm
    rule(w.ctx, w.norms[node])
    w.frozen.update(w.norms[node].nodes)


def _freeze_token_norm(w: NodeWalk, node: ir.Node) -> Next | None:
    """Per active token with frozen statistics (updated ones are for maps only); a declining rule
    leaves the node to the next steps."""
    match = w.norms[node]
    try:
        rule_token_norm(w.ctx, match, "no updated statistics for tokens" if w.ctx.options.norm_stats == "updated"
                        else "")
    except Unsupported as exc:
        return Next(str(exc))
    w.frozen.update(match.nodes)
    return None


def _skip(w: NodeWalk, node: ir.Node) -> None:
    return None


def _copy_constant(w: NodeWalk, node: ir.Node) -> None:
    ctx = w.ctx
    inputs = [None if v is None else ctx.forms.get(v).value for v in node.inputs]  # type: ignore[union-attr]
    outs = ctx.graph.copy(node, inputs)
    for out, new in zip(node.outputs, outs):
        ctx.forms.set(out, Dense(new, EMPTY_MASK))
    ctx.record.report(node, "constant")


def _mark_static(w: NodeWalk, node: ir.Node) -> None:
    w.static.update(o.name for o in node.outputs)  # type: ignore[misc]
    w.ctx.record.report(node, "static", dense_macs=dense_macs(node))


def _read_static_inputs(w: NodeWalk, node: ir.Node) -> Next:
    for v in node.inputs:
        if v is not None:
            w.read_static(v)
    return Next()


def _apply(table: dict[str, Rule]) -> Action:
    """Run the node's rule from ``table``; a declining rule leaves the node to the next steps."""
    def act(w: NodeWalk, node: ir.Node) -> Next | None:
        try:
            table[node.op_type](w.ctx, node)
        except Unsupported as exc:
            return Next(str(exc))
        return None
    return act


def _apply_rule(w: NodeWalk, node: ir.Node) -> Next | None:
    return _apply(RULES)(w, node)


def _fallback(w: NodeWalk, node: ir.Node) -> None:
    reason = w.reason or "no sparse rule for this op"
    if w.ctx.options.fallback == "dense":
        _run_dense(w.ctx, node, f"fallback: {reason}")
        if not w.ctx.exact:
            w.ctx.record.approximate(node, f"kept dense (--fallback dense): {reason}")
        return
    w.unsupported.append(f"{node_label(node)}: {reason}")
    for out in node.outputs:  # keep walking so that every unsupported node is reported
        w.ctx.forms.set(out, Dense(ir.Value(name=out.name), None))


# ----- predicates ------------------------------------------------------------------------------
def _norm_input(w: NodeWalk, node: ir.Node) -> Form | None:
    """The form of the input of the normalisation that starts at ``node``, when one does."""
    match = w.norms.get(node)
    if match is None or not w.ctx.forms.has(match.x):  # type: ignore[arg-type]
        return None
    return w.ctx.forms.get(match.x)  # type: ignore[arg-type]


def _starts_frozen_norm(w: NodeWalk, node: ir.Node) -> bool:
    match = w.norms.get(node)
    return (match is not None and w.ctx.forms.is_edit_dependent(match.x)
            and len(static_shape(match.x) or ()) == 4  # type: ignore[arg-type]
            and not isinstance(_norm_input(w, node), Tokens)
            and w.ctx.grids.dense_resolution_of(match.y.producer()) is None)  # type: ignore[arg-type]


def _starts_token_norm(w: NodeWalk, node: ir.Node) -> bool:
    return isinstance(_norm_input(w, node), Tokens)


def _has_static_input(w: NodeWalk, node: ir.Node) -> bool:
    return any(v is not None and v.name in w.static and not w.ctx.forms.has(v) for v in node.inputs)


def _reads_tokens(w: NodeWalk, node: ir.Node) -> bool:
    return any(v is not None and w.ctx.forms.has(v) and isinstance(w.ctx.forms.get(v), Tokens) for v in node.inputs)


def _reduces_a_sparse_map(w: NodeWalk, node: ir.Node) -> bool:
    return (node.domain in ONNX_DOMAINS and node.op_type in GLOBAL_RULES and bool(node.inputs)
            and isinstance(w.ctx.forms.get(node.inputs[0]), Sparse))


def _without_feature_map_output(w: NodeWalk, node: ir.Node) -> bool:
    return w.rule(node) is not None and not any(w.ctx.grids.is_spatial(o) for o in node.outputs)


def _inside_island(w: NodeWalk, node: ir.Node) -> bool:
    # Only island values in, and no feature map of a resolution the edit reaches out (e.g.
    # [B, heads, tokens, dim] tensors inside attention): the island continues.
    return (w.rule(node) is not None and all(w.island_inputs(node))
            and not any(w.ctx.grids.on_known_resolution(o) for o in node.outputs))


DECISIONS: tuple[Step, ...] = (
    Step("frozen normalisation of tokens", _starts_token_norm, _freeze_token_norm),
    Step("frozen normalisation", _starts_frozen_norm, _freeze_norm),
    Step("inside a frozen normalisation", lambda w, n: n in w.frozen, _skip),
    Step("constant", lambda w, n: w.input_kind(n) == "constant", _copy_constant),
    Step("static", lambda w, n: w.input_kind(n) == "static", _mark_static),
    Step("static inputs read as caches", _has_static_input, _read_static_inputs),
    Step("downstream of a dense island (exact)", lambda w, n: w.ctx.exact and any(w.island_inputs(n)),
         _dense("downstream of a global op (exact mode)")),
    Step("token rule", lambda w, n: n.domain in ONNX_DOMAINS and takes_token_rule(w.ctx, n), _apply(TOKEN_RULES)),
    Step("token rule declined", _reads_tokens, _dense("a token rule declined: dense island")),
    Step("global reduction", _reduces_a_sparse_map, _apply(GLOBAL_RULES)),
    Step("no feature-map output", _without_feature_map_output, _dense("non-spatial values: part of a dense island")),
    Step("inside a dense island", _inside_island, _dense("inside a dense island")),
    Step("dense resolution", lambda w, n: w.rule(n) is not None and w.ctx.grids.dense_resolution_of(n) is not None,
         _on_dense_resolution),
    Step("sparse rule", lambda w, n: w.rule(n) is not None, _apply_rule),
    # also a Split or Slice whose rule declined (e.g. one along a spatial axis)
    Step("global op", lambda w, n: n.op_type in DENSE_ISLAND_OPS and n.domain in ONNX_DOMAINS,
         _dense("global op: dense island")),
    Step("unsupported", lambda w, n: True, _fallback),
)


def decide(w: NodeWalk, node: ir.Node) -> str:
    """Take the first step that applies and finishes the node; return its name."""
    w.reason = ""
    for step in DECISIONS:
        if step.applies(w, node):
            outcome = step.act(w, node)
            if outcome is None:
                return step.name
            w.reason = outcome.reason or w.reason
    raise AssertionError("the last step applies to every node")


class BuildSparseGraphPass(ir.passes.FunctionalPass):
    """Build the SPARSE graph of a canonical model (a new model; the canonical one is not modified).

    Every node, in topological order, takes the first step of :data:`DECISIONS` that applies:

    1. frozen normalisation of tokens (approx mode): a group/instance normalisation of tokens whose
       axis 1 holds the channels (``[B, C, H*W]``, attention blocks) is ``x * scale + shift`` per
       active token with statistics frozen by FULL (passes/norm_stats.py); a rule that declines
       leaves the node to the next steps;
    2. frozen normalisation (approx mode): a group/instance normalisation of an edit-dependent map
       not on a dense resolution is ``x * scale + shift`` on tiles, with statistics frozen by FULL
       (``norm_stats="frozen"``) or updated from the active tiles (``"updated"``, passes/norm_stats.py);
       a ``[B, C, L]`` input that is no tokens takes the next steps;
    3. inside a frozen normalisation: the match's other nodes are done;
    4. constant: no input depends on any model input: copied unchanged;
    5. static: depends only on non-spatial inputs (a timestep): FULL computes it per cache key and
       the SPARSE graph reads it as a cache;
    6. static inputs read as caches: an edit node's static inputs become cache inputs (then go on);
    7. downstream of a dense island (exact mode): dense, so exactness is kept;
    8. token rule (passes/token_rules.py): a view of a sparse map as tokens, or an op on such
       tokens (per-token ops, attention), computed on the active tiles' tokens; a rule that
       declines leaves the node to the next steps;
    9. token rule declined: any other node reading tokens runs dense on full tensors (its token
       inputs scattered into their caches): tokens are no feature maps for the later rules;
    10. global reduction (passes/global_rules.py): a spatial reduction of a sparse map, updated
        from the active tiles (declining: next steps);
    11. no feature-map output (a node with a rule): dense, part of an island;
    12. inside a dense island (a node with a rule whose inputs are all island outputs and whose
        outputs lie on no resolution the edit reaches): dense;
    13. dense resolution (approx mode, ``dense_resolutions``): dense on full maps;
    14. sparse rule (passes/sparse_rules.py): computed on the active tiles; a rule that declines
        (``Unsupported``) leaves the node to steps 15 and 16 with its reason;
    15. global op (attention, reductions, reshapes, global pooling, a Split or Slice whose rule
        declined): a dense island; in approx mode downstream tiles read its output only on active
        tiles (recorded as an approximation);
    16. unsupported: dense with ``fallback="dense"``, else listed in one CompileError.

    Finally model outputs that are sparse are scattered into their cached original (the one
    full-size write); other outputs are copied under their names. ``decisions`` maps each node's
    name to the step that took it.
    """

    def __init__(self, ctx: RewriteContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.decisions: dict[str, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ctx = self.ctx
        static: set[str] = set()
        for value in model.graph.inputs:
            if value in ctx.spatial.values:
                ctx.forms.set(value, Dense(ctx.graph.input(value.name, dtype_of(value),  # type: ignore[arg-type]
                                                           static_shape(value)), PIXEL_MASK))  # type: ignore[arg-type]
            else:
                static.add(value.name)  # type: ignore[arg-type]
        walk = NodeWalk(ctx, find_norms(model) if not ctx.exact else {}, static)
        for node in model.graph:
            self.decisions[node.name] = decide(walk, node)  # type: ignore[index]
        if walk.unsupported:
            raise CompileError("unsupported nodes (use --fallback dense to keep them dense):\n  "
                               + "\n  ".join(walk.unsupported))
        for out in model.graph.outputs:
            walk.read_static(out)
        _emit_outputs(ctx, model)
        sparse = ir.Model(ctx.graph.graph, ir_version=10, producer_name="sigec")
        return ir.passes.PassResult(sparse, modified=True)


def _emit_outputs(ctx: RewriteContext, model: ir.Model) -> None:
    """Model outputs of the SPARSE graph (scattered into their cached original when sparse)."""
    b = ctx.graph
    for out in model.graph.outputs:
        form = ctx.forms.get(out)
        if isinstance(form, Sparse):
            cache = ctx.caches.cache(form.source, resolution=form.res.name)
            value = b.op("TileScatter", [cache, form.vals, ctx.grids.coords(form.res)], hint=out.name,
                         output=out.name, domain=SIGEC_DOMAIN)  # type: ignore[arg-type]
        elif isinstance(form, Tokens):
            value = b.op("Identity", [ctx.to_dense(out)], hint=out.name, output=out.name)  # type: ignore[arg-type]
        elif form.value.name != out.name:  # type: ignore[union-attr]
            value = b.op("Identity", [form.value], hint=out.name, output=out.name)  # type: ignore[union-attr]
        else:
            value = form.value  # type: ignore[union-attr]
        b.output(value, dtype_of(out), list(static_shape(out) or []))
