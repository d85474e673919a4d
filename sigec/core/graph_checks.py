"""Checks that an engine graph is self-contained and uses only operators sigec can run.

ONNX lets any tensor keep its bytes in a file next to the model (``data_location = EXTERNAL`` with
an ``external_data`` location). ONNX Runtime reads such files for initializers and for tensor
attributes (a Constant's ``value``), in subgraphs too, resolving a relative location against the
model's folder, or the working directory for a model given as bytes. A crafted engine could thus
copy a local file into a model output. Engine graphs keep their weights in weights.bin, so any
external data is refused, wherever it is:

- tensors: graph initializers and sparse initializers (of subgraphs too: the top-level graph may
  hold none at all, see ``sigec.core.engine_file``), and every tensor, tensor list, sparse tensor
  or sparse tensor list a node attribute holds, whatever type the attribute declares;
- subgraphs: the graph and graph list attributes of any node (If, Loop, Scan), recursively;
- operators: node domains other than ONNX's standard ones, ONNX Runtime's built-in contrib domain
  and ``ai.sigec`` (anything else would name a function or a library the file cannot bring);
- model-local functions and training information, which sigec never writes.

Opset imports are not checked: importing a domain runs nothing (the compiler keeps the source
model's imports, which may name domains no node uses).
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

from sigec.core.ops import DOMAIN

# "" and "ai.onnx" are the standard operator set, "ai.onnx.ml" ONNX's classical-ML operators,
# "com.microsoft" ONNX Runtime's built-in contrib operators (sigec writes none, but a model compiled
# with fallback="dense" keeps such nodes of its source model as they are).
ALLOWED_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", DOMAIN)

_MAX_SHOWN = 200  # characters of a name or location shown in a message


def model_problem(model: onnx.ModelProto) -> str | None:
    """Why ``model`` is not a self-contained engine graph (see the module docstring), or None.

    The answer names where the fault is, e.g. ``node 'if0' (If) attribute 'then_branch': node 'c'
    (Constant) attribute 'value': tensor 'c' keeps its data in an external file ...``.
    """
    if len(model.functions):
        names = ", ".join(_shown(f"{f.domain}:{f.name}") for f in model.functions[:5])
        return f"holds {len(model.functions)} model-local function(s) ({names}); engine graphs hold none"
    if len(model.training_info):
        return "holds training information; engine graphs hold none"
    return _graph_problem(model.graph, "")


def _graph_problem(graph: onnx.GraphProto, where: str) -> str | None:
    """The first problem in ``graph`` or its subgraphs, in document order, prefixed by ``where``.

    Recursion is bounded: the protobuf parser refuses messages nested more than ~100 levels deep.
    """
    for tensor_where, tensor in _graph_tensors(graph):
        problem = _tensor_problem(tensor)
        if problem:
            return f"{where}{tensor_where}{problem}"
    for node in graph.node:
        plain = node.op_type.isidentifier() and len(node.op_type) <= _MAX_SHOWN
        op_type = node.op_type if plain else _shown(node.op_type)
        label = f"{where}node {_shown(node.name)} ({op_type})"
        if node.domain not in ALLOWED_DOMAINS:
            allowed = ", ".join(repr(domain) for domain in ALLOWED_DOMAINS)
            return f"{label} has domain {_shown(node.domain)}; allowed: {allowed}"
        for attribute in node.attribute:
            attribute_where = f"{label} attribute {_shown(attribute.name)}: "
            for tensor_where, tensor in _attribute_tensors(attribute):
                problem = _tensor_problem(tensor)
                if problem:
                    return f"{attribute_where}{tensor_where}{problem}"
            subgraphs = [attribute.g] if attribute.HasField("g") else []
            for subgraph in [*subgraphs, *attribute.graphs]:
                problem = _graph_problem(subgraph, attribute_where)
                if problem:
                    return problem
    return None


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """The tensors a graph itself holds (initializers), each with where it is."""
    for tensor in graph.initializer:
        yield f"initializer {_shown(tensor.name)}: ", tensor
    for sparse in graph.sparse_initializer:
        yield from _sparse_tensors(sparse, "sparse initializer ")


def _attribute_tensors(attribute: onnx.AttributeProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor an attribute holds, whatever its declared type (a reader may look at any field)."""
    if attribute.HasField("t"):
        yield "", attribute.t
    for tensor in attribute.tensors:
        yield "", tensor
    if attribute.HasField("sparse_tensor"):
        yield from _sparse_tensors(attribute.sparse_tensor, "sparse tensor ")
    for sparse in attribute.sparse_tensors:
        yield from _sparse_tensors(sparse, "sparse tensor ")


def _sparse_tensors(sparse: onnx.SparseTensorProto, kind: str) -> Iterator[tuple[str, onnx.TensorProto]]:
    yield f"{kind}{_shown(sparse.values.name)} values: ", sparse.values
    yield f"{kind}{_shown(sparse.values.name)} indices: ", sparse.indices


def _tensor_problem(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL and not len(tensor.external_data):
        return None
    location = next((entry.value for entry in tensor.external_data if entry.key == "location"), None)
    return (
        f"tensor {_shown(tensor.name)} keeps its data in an external file (location "
        f"{_shown(location) if location is not None else 'not given'}); engine graphs must be self-contained"
    )


def _shown(text: str) -> str:
    """``repr(text)``, cut to a readable length (names in a crafted file can be huge)."""
    return repr(text) if len(text) <= _MAX_SHOWN else f"{text[:_MAX_SHOWN]!r}..."
