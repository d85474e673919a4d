"""Normalisation patterns (passes/norm_patterns.py, matched by passes/group_norm_match.py).

Each spelling built with onnx.helper is matched and its parameters reproduce ONNX Runtime's output;
near misses are not matched and say why; the GroupNorm of a rank-3 token view [B, C, L] (diffusers'
attention blocks) is matched too; on the small zoo models the matches of maps are those the former
hand-walked matcher found, plus those of the attention blocks' token views (recorded below).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from sigec.frontends.onnx_frontend import canonicalize
from sigec.passes.group_norm_match import NormMatch, find_norms, mismatch_reasons

RNG = np.random.default_rng(0)
C, G, H = 6, 2, 4  # x is [1, C, H, H]; the grouped spellings use G groups
X_SHAPE = [1, C, H, H]
EPS = 1e-3

Nodes = list[onnx.NodeProto]
Inits = dict[str, np.ndarray]


def _model(nodes: Nodes, inits: Inits, *, x_shape: list[int] = X_SHAPE, opset: int = 18,
           extra_outputs: tuple[str, ...] = ()) -> ir.Model:
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", *extra_outputs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], outputs,
                              initializer=[onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10
    return canonicalize(proto)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def _apply(match: NormMatch, x: np.ndarray) -> np.ndarray:
    """The match's formula: group statistics, then per-channel scale and shift."""
    xr = x.reshape(x.shape[0], match.groups, -1)
    mean, var = xr.mean(axis=2, keepdims=True), xr.var(axis=2, keepdims=True)
    normed = ((xr - mean) / np.sqrt(var + match.epsilon)).reshape(x.shape)
    gs, gb, gamma, beta = (a.reshape(1, -1, 1, 1) for a in match.per_channel())
    return (normed * gs + gb) * gamma + beta


def _grouped(groups: int = G, x: str = "x") -> tuple[Nodes, Inits]:
    return [helper.make_node("Reshape", [x, "shape3"], ["r"])], {"shape3": np.array([1, groups, -1], np.int64)}


def _back(src: str, shape: list[int] = X_SHAPE) -> tuple[Nodes, Inits]:
    return [helper.make_node("Reshape", [src, "shape_back"], ["n"])], {"shape_back": np.array(shape, np.int64)}


def reshape_instance_norm(groups: int = G, back: list[int] = X_SHAPE) -> tuple[Nodes, Inits]:
    """x -> Reshape [1, G, -1] -> InstanceNormalization -> Reshape back -> n."""
    nodes, inits = _grouped(groups)
    nodes.append(helper.make_node("InstanceNormalization", ["r", "gs", "gb"], ["i"], epsilon=EPS))
    inits |= {"gs": RNG.uniform(0.5, 1.5, groups).astype(np.float32),
              "gb": RNG.normal(0, 0.2, groups).astype(np.float32)}
    more, more_inits = _back("i", back)
    return nodes + more, inits | more_inits


def reduce_mean_chain(groups: int = G, axes: tuple[int, ...] = (2,), axes_attribute: bool = False,
                      square: str = "pow", exponent: float = 2.0, eps_first: bool = False,
                      eps_after_sqrt: bool = False) -> tuple[Nodes, Inits]:
    """x -> Reshape [1, G, -1] -> mean, centre, square, mean, + eps, Sqrt, Div -> Reshape back -> n."""
    nodes, inits = _grouped(groups)
    inits |= {"two": np.array(exponent, np.float32), "eps": np.array(EPS, np.float32)}

    def mean(src: str, out: str) -> onnx.NodeProto:
        if axes_attribute:
            return helper.make_node("ReduceMean", [src], [out], axes=list(axes))
        inits["axes"] = np.array(axes, np.int64)
        return helper.make_node("ReduceMean", [src, "axes"], [out])

    nodes += [mean("r", "mu"), helper.make_node("Sub", ["r", "mu"], ["d"]),
              helper.make_node("Pow", ["d", "two"], ["sq"]) if square == "pow" else
              helper.make_node("Mul", ["d", "d"], ["sq"]),
              mean("sq", "var")]
    if eps_after_sqrt:  # the epsilon in the wrong place: sqrt(var) + eps
        nodes += [helper.make_node("Sqrt", ["var"], ["sd0"]), helper.make_node("Add", ["sd0", "eps"], ["sd"])]
    else:
        nodes += [helper.make_node("Add", ["eps", "var"] if eps_first else ["var", "eps"], ["ve"]),
                  helper.make_node("Sqrt", ["ve"], ["sd"])]
    nodes.append(helper.make_node("Div", ["d", "sd"], ["q"]))
    more, more_inits = _back("q")
    return nodes + more, inits | more_inits


def instance_norm() -> tuple[Nodes, Inits]:
    """x -> InstanceNormalization -> n."""
    return ([helper.make_node("InstanceNormalization", ["x", "gs", "gb"], ["n"], epsilon=EPS)],
            {"gs": RNG.uniform(0.5, 1.5, C).astype(np.float32), "gb": RNG.normal(0, 0.2, C).astype(np.float32)})


def group_norm(scale_size: int) -> tuple[Nodes, Inits]:
    """x -> GroupNormalization (G groups, ``scale_size`` scale and bias values) -> n."""
    return ([helper.make_node("GroupNormalization", ["x", "sc", "bi"], ["n"], num_groups=G, epsilon=EPS)],
            {"sc": RNG.uniform(0.5, 1.5, scale_size).astype(np.float32),
             "bi": RNG.normal(0, 0.2, scale_size).astype(np.float32)})


def affine(*steps: tuple[str, bool, list[int]]) -> tuple[Nodes, Inits]:
    """n -> (op, constant first, constant shape) ... -> y; no steps: Identity."""
    nodes, inits, src = [], {}, "n"
    for k, (op, constant_first, shape) in enumerate(steps):
        name, out = f"c{k}", "y" if k == len(steps) - 1 else f"t{k}"
        inits[name] = RNG.uniform(0.5, 1.5, shape).astype(np.float32)
        nodes.append(helper.make_node(op, [name, src] if constant_first else [src, name], [out]))
        src = out
    if not steps:
        nodes.append(helper.make_node("Identity", ["n"], ["y"]))
    return nodes, inits


GAMMA_BETA = (("Mul", False, [1, C, 1, 1]), ("Add", False, [C, 1, 1]))


def _build(core: tuple[Nodes, Inits], tail: tuple[Nodes, Inits], **kw) -> ir.Model:
    return _model(core[0] + tail[0], core[1] | tail[1], **kw)


def _single(model: ir.Model) -> NormMatch:
    matches = find_norms(model)
    assert len(matches) == 1, f"expected one match, got {len(matches)}"
    return next(iter(matches.values()))


@pytest.mark.parametrize("name,core,tail,opset,ops", [
    ("reshape_instance_norm", reshape_instance_norm, GAMMA_BETA, 18,
     ["Reshape", "InstanceNormalization", "Reshape", "Mul", "Add"]),
    ("reduce_mean_pow", reduce_mean_chain, GAMMA_BETA, 18,
     ["Reshape", "ReduceMean", "Sub", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Reshape", "Mul", "Add"]),
    ("reduce_mean_mul_eps_first_axes_attribute",
     lambda: reduce_mean_chain(square="mul", eps_first=True, axes=(-1,), axes_attribute=True), (), 13,
     ["Reshape", "ReduceMean", "Sub", "Mul", "ReduceMean", "Add", "Sqrt", "Div", "Reshape"]),
    ("instance_norm_constants_first", instance_norm, (("Mul", True, [C, 1, 1]), ("Add", True, [1])), 18,
     ["InstanceNormalization", "Mul", "Add"]),
    ("group_norm_per_group_opset18", lambda: group_norm(G), (("Mul", False, [1]),), 18, ["GroupNormalization", "Mul"]),
    ("group_norm_per_channel_opset21", lambda: group_norm(C), GAMMA_BETA, 21, ["GroupNormalization", "Mul", "Add"]),
])
def test_each_spelling_is_matched_and_its_parameters_reproduce_the_graph(name, core, tail, opset, ops):
    model = _build(core(), affine(*tail), opset=opset)
    match = _single(model)
    assert [n.op_type for n in match.nodes] == ops
    assert match.x is model.graph.inputs[0] and match.y is model.graph.outputs[0]
    assert match.internal == {n.outputs[0] for n in match.nodes} - {match.y}
    assert match.groups == (C if name.startswith("instance") else G) and match.epsilon == pytest.approx(EPS)
    assert list(find_norms(model)) == [match.nodes[0]]
    x = RNG.standard_normal(X_SHAPE).astype(np.float32)
    assert np.abs(_apply(match, x) - _run(model, x)).max() < 1e-4


def _reasons(model: ir.Model) -> str:
    """The mismatch reasons at the node computing the graph output."""
    root = model.graph.outputs[0].producer()
    return " | ".join(mismatch_reasons(model, root).values())


@pytest.mark.parametrize("name,core,reason", [
    ("mean over the channel groups", lambda: reduce_mean_chain(axes=(1,)), "reduces axes [1], not the last of three"),
    ("epsilon after the square root", lambda: reduce_mean_chain(eps_after_sqrt=True), "expected Sqrt, got Add"),
    ("cube instead of square", lambda: reduce_mean_chain(exponent=3.0), "is not the constant 2"),
    ("reshape to 4 groups of 6 channels", lambda: reshape_instance_norm(groups=4),
     "does not split 6 channels into groups"),
    ("reduce chain to 4 groups", lambda: reduce_mean_chain(groups=4), "does not split 6 channels into groups"),
    ("reshape back to another shape", lambda: reshape_instance_norm(back=[1, C, H * H, 1]),
     "not the input's (1, 6, 4, 4)"),
    ("per-channel GroupNormalization scale before opset 21", lambda: group_norm(C), "per channel (6) needs opset 21"),
])
def test_near_misses_are_not_matched_and_say_why(name, core, reason):
    model = _build(core(), affine(*GAMMA_BETA))
    # At most the InstanceNormalization of the grouped [1, G', L] tensor, a rank-3 normalisation by itself
    assert all([n.op_type for n in m.nodes] == ["InstanceNormalization"] and m.x.name == "r"
               for m in find_norms(model).values()), name
    assert reason in _reasons(model), name


def _token_view_group_norm(gamma_shape: list[int]) -> ir.Model:
    """diffusers' attention-block GroupNorm of the token view x [1, C, L]: Reshape [1, G, -1],
    InstanceNormalization, Reshape back to [1, C, L], Mul gamma, Add beta (both ``gamma_shape``)."""
    nodes, inits = reshape_instance_norm(back=[1, C, H * H])
    tail, tail_inits = affine(("Mul", False, gamma_shape), ("Add", True, gamma_shape))
    return _model(nodes + tail, inits | tail_inits, x_shape=[1, C, H * H])


@pytest.mark.parametrize("gamma_shape", [[C, 1], [1, C, 1]])
def test_group_norm_of_a_rank_3_tensor_is_matched(gamma_shape):
    """diffusers' attention blocks normalise [B, C, HW]: channels on axis 1, statistics over a group of
    channels times L; the affine constants are per channel as [C, 1] or [1, C, 1]."""
    model = _token_view_group_norm(gamma_shape)
    match = _single(model)
    assert [n.op_type for n in match.nodes] == ["Reshape", "InstanceNormalization", "Reshape", "Mul", "Add"]
    assert match.x is model.graph.inputs[0] and match.y is model.graph.outputs[0] and match.groups == G
    x = RNG.standard_normal((1, C, H * H)).astype(np.float32)
    assert np.abs(_apply(match, x[..., None])[..., 0] - _run(model, x)).max() < 1e-4


def test_a_rank_3_tail_constant_along_the_positions_ends_the_match():
    """A [C] constant broadcasts along L on [B, C, L], not per channel: the match stops before it."""
    nodes, inits = reshape_instance_norm(back=[1, C, H * H])
    tail, tail_inits = affine(("Mul", False, [H * H]))
    model = _model(nodes + tail, inits | tail_inits, x_shape=[1, C, H * H])
    match = _single(model)
    assert [n.op_type for n in match.nodes] == ["Reshape", "InstanceNormalization", "Reshape"]
    assert "gamma of shape (16,) is not per channel of 6" in _reasons(model)


@pytest.mark.parametrize("x_shape", [[1, C], [1, C, H, H, 1]])
def test_instance_norm_of_other_ranks_is_not_matched(x_shape):
    model = _build(instance_norm(), affine(), x_shape=x_shape)
    assert find_norms(model) == {}
    assert "is not a static rank-3 or 4 tensor" in _reasons(model)


def test_a_tail_constant_that_is_not_per_channel_ends_the_match():
    model = _build(reshape_instance_norm(), affine(("Mul", False, [1, C, 1, 1]), ("Add", False, [1, C, H, H])))
    match = _single(model)
    assert [n.op_type for n in match.nodes][-1] == "Mul" and match.y.name == "t0"
    assert "beta of shape (1, 6, 4, 4) is not per channel of 6" in _reasons(model)


def test_an_intermediate_used_outside_is_not_matched():
    """The sparse rewrite drops matched nodes: a value they compute must not be needed elsewhere."""
    model = _build(reduce_mean_chain(), affine(*GAMMA_BETA), extra_outputs=("mu",))
    assert find_norms(model) == {}
    assert "other uses" in _reasons(model)


# The matches the former hand-walked matcher found on the small zoo models (torch.onnx dynamo
# exporter): count, first node of each, (groups, epsilon) pairs, and a digest of every field
# (node, x, y and internal value names, groups, epsilon, and the parameter arrays' float32 bytes).
# That matcher saw maps [B, C, H, W] only: these are the matches of rank-4 inputs.
ZOO_EXPECTED = {
    "ddpm_unet": (23, [19, 46, 72, 96, 121, 145, 263, 287, 402, 426, 449, 473, 588, 612, 728, 752, 775, 799, 823, 847,
                       870, 894, 917], {(8, "9.999999974752427e-07")}, "b198761036ebc8ef"),
    "sd_vae_decoder": (21, [5, 29, 148, 171, 194, 217, 241, 264, 288, 311, 334, 357, 381, 404, 427, 450, 474, 497, 520,
                            543, 566], {(8, "9.999999974752427e-07")}, "8dba495bab506a5f"),
    "spade": (0, [], set(), "e3b0c44298fc1c14"),
    "resnet9": (23, list(range(23)), {(8, "9.999999747378752e-06"), (16, "9.999999747378752e-06"),
                                      (32, "9.999999747378752e-06")}, "fa7de62c79316406"),
    "tiny_local": (0, [], set(), "e3b0c44298fc1c14"),
}
# The GroupNorms of diffusers' attention blocks (the token view [B, C, H*W]), found since rank-3
# inputs are matched: first node of each and the digest of those matches.
ZOO_TOKEN_VIEW = {
    "ddpm_unet": ([173, 315, 501, 640], "6c1f943856b96dd8"),
    "sd_vae_decoder": ([58], "46bbf1648e13ae74"),
}


def _first_node_name(model: str, index: int) -> str:
    if model == "resnet9":  # the exporter names InstanceNorm after the aten op
        return "node_instance_norm" + (f"_{index}" if index else "")
    return f"node_Reshape_{index}"


def zoo_digest(matches: dict[ir.Node, NormMatch]) -> str:
    """A digest of every field of every match, in order."""
    h = hashlib.sha256()
    for key, m in matches.items():
        names = [key.name, *(n.name for n in m.nodes), m.x.name, m.y.name, *sorted(v.name for v in m.internal)]
        h.update(repr((names, int(m.groups), repr(m.epsilon))).encode())
        for arr in (m.group_scale, m.group_bias, m.gamma, m.beta):
            h.update(str(arr.dtype).encode() + np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("name", list(ZOO_EXPECTED))
def test_zoo_models_match_as_before(name):
    from sigec.apps.zoo import build
    from sigec.frontends.onnx_frontend import load_onnx
    from sigec.frontends.torch_frontend import export_module

    module, example = build(name, small=True)
    found = find_norms(load_onnx(export_module(module, example)))
    matches = {k: m for k, m in found.items() if len(m.x.shape) == 4}
    count, first_nodes, groups_eps, digest = ZOO_EXPECTED[name]
    assert len(matches) == count
    assert [k.name for k in matches] == [_first_node_name(name, i) for i in first_nodes]
    assert {(m.groups, repr(m.epsilon)) for m in matches.values()} == groups_eps
    assert zoo_digest(matches) == digest
    token_view = {k: m for k, m in found.items() if k not in matches}
    first_token_nodes, token_digest = ZOO_TOKEN_VIEW.get(name, ([], "e3b0c44298fc1c14"))
    assert [k.name for k in token_view] == [_first_node_name(name, i) for i in first_token_nodes]
    assert all(m.x.shape[1] == m.gamma.shape[0] and [n.op_type for n in m.nodes][-2:] == ["Mul", "Add"]
               for m in token_view.values())
    assert zoo_digest(token_view) == token_digest
