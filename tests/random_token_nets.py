"""Random token blocks for the exact-mode property tests (tests/test_token_property.py).

A token net is ``conv -> tokens -> per-token ops -> map -> conv``: a conv feature map ``[B, C, H, W]``
is viewed as tokens the ways exporters write it, a sequence of per-token ops runs on them, the
inverse views turn them back into a map and a conv makes the output. A :class:`TokenNetSpec` says
which views and ops; :func:`token_net` writes it as an ONNX graph with onnx.helper (fast: no export)
and :func:`token_module` as the PyTorch code those graphs stand for. Both are written by one
function, :func:`_build`, against two op sets, so they hold the same weights and structure:

- ``_OnnxOps`` writes the node patterns that torch's dynamo exporter (opset 18, sigec's frontend)
  writes for the PyTorch calls: Linear as ``MatMul`` (+ ``Add``; ``Gemm`` on a matrix),
  ``x.pow(2)`` as ``Pow``, rsqrt as ``Sqrt`` + ``Reciprocal``, GELU (erf: ``Div, Erf, Add, Mul,
  Mul``; tanh: ``Pow, Mul, Add, Mul, Tanh, Add, Mul, Mul``), SiLU as ``Sigmoid`` + ``Mul``, chunk
  as ``Split(num_outputs)`` on a positive axis, ``Reshape(allowzero=1)`` with constant shapes,
  scaled_dot_product_attention as ``Mul(q, sqrt(s))``, k transposed by Reshape/Transpose/Reshape,
  ``Mul(k^T, sqrt(s))``, MatMul, Softmax, MatMul. (The exporter also merges consecutive views,
  e.g. the two Reshapes of ``t.transpose(1, 2).reshape(B, HW, C).reshape(B, H, W, C)``; the
  generator keeps them, a tokens-to-tokens view.)
- ``_TorchOps`` calls the PyTorch functions (``F.linear``, ``F.layer_norm``, ``F.gelu``,
  ``F.scaled_dot_product_attention``, ``permute``/``reshape``/``transpose``, ...).

The tests check that the two agree numerically on every drawn spec and compile a few specs from a
real export of :func:`token_module`.

Views into tokens (``view_in``, the inverse ``view_out`` drawn independently):
``permute``: ``x.permute(0, 2, 3, 1).reshape(B, HW, C)``; ``reshape_transpose``:
``x.reshape(B, C, HW).transpose(1, 2)``; ``flatten_transpose``: ``x.flatten(2).transpose(1, 2)``
(written as ``Reshape [0, 0, -1]``, allowzero 0, as hand-written and converted graphs do). Then
optionally (``heads_view``) attention heads ``reshape(B, HW, h, d).transpose(1, 2)`` (``heads``)
or batch-folded heads ``... .reshape(B * h, HW, d)`` (``folded``); every op then acts on the
stream's last axis (``C``, or ``d`` per head).

Per-token ops (``OPS``): Linear with / without bias, LayerNorm, RMS norm (pow / mean / rsqrt),
GELU (erf, tanh), GEGLU (Linear, chunk along the last axis, ``a * gelu(gate)``, Linear), SiLU, a
residual add of an earlier stream value, adaLN modulation ``t * (1 + scale) + shift`` with scale
and shift a Linear of the static vector input ``cond [B, C]`` (``[B, 1, C]``; on heads per head
``[B, h, 1, d]`` or shared ``[B, 1, 1, d]``; folded ``[B * h, 1, d]``), a positional constant
(``[1, HW, C]``; on heads ``[1, h, HW, d]`` or shared ``[1, 1, HW, d]``; folded ``[1, HW, d]``),
cross-attention on the static input ``context [B, L, C]`` with ``scaled_dot_product_attention``
(``cross_sdpa``) or ``softmax(q @ k^T * scale) @ v`` (``cross_softmax``; ``/ sqrt(d)`` in some
draws), with or without a residual; on tokens ``[B, HW, C]`` the queries are split into ``h`` heads
and merged back, on head layouts the stream is the queries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

VIEWS = ("permute", "reshape_transpose", "flatten_transpose")
HEAD_VIEWS = ("none", "heads", "folded")
OPS = ("linear", "linear_nobias", "layer_norm", "gelu_erf", "gelu_tanh", "silu", "residual", "pos", "modulate",
       "geglu", "rms_norm", "cross_sdpa", "cross_softmax")
"""Per-token ops, simplest first (Hypothesis shrinks towards the first)."""


@dataclass(frozen=True)
class TokenNetSpec:
    """One token net: ``image [B, 3, H, W] -> conv -> tokens -> ops -> map (+ conv map) -> conv -> [B, 3, H, W]``."""

    batch: int
    channels: int
    height: int
    width: int
    view_in: str = "permute"
    view_out: str = "permute"
    heads_view: str = "none"
    heads: int = 1  # head count of the head views and of cross-attention
    ops: tuple[str, ...] = ("linear",)
    context_len: int = 5
    map_residual: bool = False  # add the conv map to the map made from the tokens
    seed: int = 0  # weights and the choices inside ops (residual source, GEGLU width, scale form, ...)

    def __post_init__(self) -> None:
        assert self.view_in in VIEWS and self.view_out in VIEWS and self.heads_view in HEAD_VIEWS
        assert self.channels % self.heads == 0 and all(op in OPS for op in self.ops)

    @property
    def inputs(self) -> dict[str, list[int]]:
        """The model inputs and their shapes (``cond`` and ``context`` only when an op reads them)."""
        shapes = {"image": [self.batch, 3, self.height, self.width]}
        if "modulate" in self.ops:
            shapes["cond"] = [self.batch, self.channels]
        if any(op.startswith("cross") for op in self.ops):
            shapes["context"] = [self.batch, self.context_len, self.channels]
        return shapes

    def random_inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {k: rng.standard_normal(s).astype(np.float32) for k, s in self.inputs.items()}


# ----- the two op sets ----------------------------------------------------------------------------


class _OnnxOps:
    """Writes nodes in the dynamo exporter's patterns; values are tensor names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.params: dict[str, np.ndarray] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.count = 0

    def _name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def _node(self, op: str, inputs: list[str], n_out: int = 1, **attrs: Any) -> Any:
        outs = [self._name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self._name(f"node_{op}"), **attrs))
        return outs[0] if n_out == 1 else outs

    def _const(self, array: np.ndarray, hint: str = "val") -> str:
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name=name))
        return name

    def _scalar(self, v: float, shape: tuple[int, ...] = ()) -> str:
        return self._const(np.full(shape, v, np.float32), "scalar")

    def _ints(self, values: list[int]) -> str:
        return self._const(np.array(values, np.int64), "shape")

    def input(self, name: str, shape: list[int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        return name

    def param(self, name: str, array: np.ndarray) -> str:
        self.params[name] = array  # an initializer once a node reads it (Linear reads its transpose)
        return name

    def initializers(self) -> list[onnx.TensorProto]:
        read = {i for n in self.nodes for i in n.input}
        return [*self.inits, *(numpy_helper.from_array(a, name=k) for k, a in self.params.items() if k in read)]

    def conv(self, x: str, w: str, b: str) -> str:
        k = self.params[w].shape[-1]
        return self._node("Conv", [x, w, b], kernel_shape=[k, k], pads=[k // 2] * 4, strides=[1, 1], dilations=[1, 1],
                          group=1)

    def linear(self, x: str, w: str, b: str | None, rank: int) -> str:
        if rank == 2:  # F.linear of a matrix
            return self._node("Gemm", [x, w] + ([b] if b else []), transB=1)
        y = self._node("MatMul", [x, self._const(np.ascontiguousarray(self.params[w].T), "weight_t")])
        return y if b is None else self._node("Add", [y, b])

    def layer_norm(self, x: str, g: str, b: str, eps: float) -> str:
        return self._node("LayerNormalization", [x, g, b], axis=-1, epsilon=eps, stash_type=1)

    def gelu(self, x: str, approximate: str) -> str:
        if approximate == "none":
            e = self._node("Erf", [self._node("Div", [x, self._scalar(math.sqrt(2.0))])])
            half = self._node("Mul", [self._scalar(0.5), self._node("Add", [e, self._scalar(1.0)])])
            return self._node("Mul", [x, half])
        cube = self._node("Mul", [self._scalar(0.044715), self._node("Pow", [x, self._scalar(3.0)])])
        inner = self._node("Mul", [self._scalar(math.sqrt(2 / math.pi)), self._node("Add", [x, cube])])
        one = self._node("Add", [self._node("Tanh", [inner]), self._scalar(1.0)])
        return self._node("Mul", [x, self._node("Mul", [self._scalar(0.5), one])])

    def silu(self, x: str) -> str:
        return self._node("Mul", [x, self._node("Sigmoid", [x])])

    def add(self, a: str | float, b: str | float) -> str:
        return self._node("Add", [self._value(a), self._value(b)])

    def mul(self, a: str | float, b: str | float) -> str:
        return self._node("Mul", [self._value(a), self._value(b)])

    def div(self, a: str, b: float) -> str:
        return self._node("Div", [a, self._scalar(b)])

    def _value(self, v: str | float) -> str:
        return self._scalar(v) if isinstance(v, (int, float)) else v

    def pow(self, x: str, p: float) -> str:
        return self._node("Pow", [x, self._scalar(p)])

    def mean_last(self, x: str) -> str:  # x.mean(-1, keepdim=True)
        return self._node("ReduceMean", [x, self._ints([-1])], keepdims=1, noop_with_empty_axes=0)

    def rsqrt(self, x: str) -> str:
        return self._node("Reciprocal", [self._node("Sqrt", [x])])

    def softmax(self, x: str) -> str:
        return self._node("Softmax", [x], axis=-1)

    def matmul(self, a: str, b: str) -> str:
        return self._node("MatMul", [a, b])

    def reshape(self, x: str, shape: list[int], *, flatten: bool = False) -> str:
        if flatten:  # x.flatten(2) without static sizes: copy B, C, infer the rest
            return self._node("Reshape", [x, self._ints([0, 0, -1])], allowzero=0)
        return self._node("Reshape", [x, self._ints(shape)], allowzero=1)

    def transpose(self, x: str, perm: list[int]) -> str:
        return self._node("Transpose", [x], perm=perm)

    def chunk2(self, x: str, rank: int) -> list[str]:  # x.chunk(2, dim=-1)
        return self._node("Split", [x], n_out=2, axis=rank - 1, num_outputs=2)

    def unsqueeze(self, x: str, axis: int) -> str:
        return self._node("Unsqueeze", [x, self._ints([axis])])

    def sdpa(self, q: str, k: str, v: str, k_shape: tuple[int, ...]) -> str:
        *lead, length, d = k_shape
        root = self._scalar(math.sqrt(1 / math.sqrt(d)), (1,))
        qs = self._node("Mul", [q, root])
        if len(lead) == 1:
            kt = self.transpose(k, [0, 2, 1])
        else:  # the exporter moves the last two axes of a 4-D k through 3-D
            kt = self.reshape(self.transpose(self._node("Reshape", [k, self._ints([-1, length, d])], allowzero=0),
                                             [0, 2, 1]), [*lead, d, length])
        scores = self._node("MatMul", [qs, self._node("Mul", [kt, root])])
        return self._node("MatMul", [self.softmax(scores), v])


class _TorchOps:
    """The PyTorch calls the ONNX patterns stand for; parameters from ``params`` by name."""

    def __init__(self, params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
        self.params = params
        self.given = inputs

    def input(self, name: str, shape: list[int]) -> torch.Tensor:
        x = self.given[name]
        assert list(x.shape) == shape, (name, x.shape, shape)
        return x

    def param(self, name: str, array: np.ndarray) -> torch.Tensor:
        return self.params[name]

    def conv(self, x, w, b):
        return F.conv2d(x, w, b, padding=w.shape[-1] // 2)

    def linear(self, x, w, b, rank):
        return F.linear(x, w, b)

    def layer_norm(self, x, g, b, eps):
        return F.layer_norm(x, x.shape[-1:], g, b, eps)

    def gelu(self, x, approximate):
        return F.gelu(x, approximate=approximate)

    def silu(self, x):
        return F.silu(x)

    def add(self, a, b):
        return a + b

    def mul(self, a, b):
        return a * b

    def div(self, a, b):
        return a / b

    def pow(self, x, p):
        return x.pow(p)

    def mean_last(self, x):
        return x.mean(-1, keepdim=True)

    def rsqrt(self, x):
        return torch.rsqrt(x)

    def softmax(self, x):
        return x.softmax(-1)

    def matmul(self, a, b):
        return a @ b

    def reshape(self, x, shape, *, flatten=False):
        return x.flatten(2) if flatten else x.reshape(shape)

    def transpose(self, x, perm):
        return x.permute(*perm)

    def chunk2(self, x, rank):
        return list(x.chunk(2, dim=-1))

    def unsqueeze(self, x, axis):
        return x.unsqueeze(axis)

    def sdpa(self, q, k, v, k_shape):
        return F.scaled_dot_product_attention(q, k, v)


# ----- the net ------------------------------------------------------------------------------------


def _build(spec: TokenNetSpec, ops: Any) -> Any:
    """Write ``spec`` with ``ops`` (either op set); returns the output value."""
    rng = np.random.default_rng(spec.seed)
    B, C, H, W = spec.batch, spec.channels, spec.height, spec.width
    N, h = H * W, spec.heads
    d = C // h
    names: dict[str, int] = {}

    def p(hint: str, shape: tuple[int, ...], scale: float, offset: float = 0.0) -> Any:
        names[hint] = names.get(hint, 0) + 1
        array = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
        return ops.param(f"{hint}{names[hint]}", array)

    def linear(x: Any, fin: int, fout: int, bias: bool = True, rank: int = 3) -> Any:
        return ops.linear(x, p("w", (fout, fin), 1 / math.sqrt(fin)), p("b", (fout,), 0.1) if bias else None, rank)

    image = ops.input("image", spec.inputs["image"])
    cond = ops.input("cond", spec.inputs["cond"]) if "cond" in spec.inputs else None
    context = ops.input("context", spec.inputs["context"]) if "context" in spec.inputs else None
    x = ops.conv(image, p("conv", (C, 3, 3, 3), 1 / math.sqrt(27)), p("conv_b", (C,), 0.1))

    # map -> tokens [B, N, C] -> heads
    if spec.view_in == "permute":
        t = ops.reshape(ops.transpose(x, [0, 2, 3, 1]), [B, N, C])
    else:
        t = ops.transpose(ops.reshape(x, [B, C, N], flatten=spec.view_in == "flatten_transpose"), [0, 2, 1])
    if spec.heads_view == "none":
        shape: tuple[int, ...] = (B, N, C)
    else:
        t = ops.transpose(ops.reshape(t, [B, N, h, d]), [0, 2, 1, 3])
        shape = (B, h, N, d)
        if spec.heads_view == "folded":
            t = ops.reshape(t, [B * h, N, d])
            shape = (B * h, N, d)
    f = shape[-1]
    history = [t]

    def per_sample(vec: Any, width: int) -> Any:
        """A [B, width] vector (width C, or d when shared by the heads) shaped to broadcast per sample."""
        if spec.heads_view == "none":
            return ops.unsqueeze(vec, 1)
        if spec.heads_view == "heads" and width == d:  # one row for every head
            return ops.unsqueeze(ops.unsqueeze(vec, 1), 1)
        if spec.heads_view == "heads":
            return ops.reshape(vec, [B, h, 1, d])
        return ops.reshape(vec, [B * h, 1, d])

    def attention(q: Any, k: Any, v: Any, k_shape: tuple[int, ...], form: str) -> Any:
        if form == "sdpa":
            return ops.sdpa(q, k, v, k_shape)
        rank = len(k_shape)
        scores = ops.matmul(q, ops.transpose(k, [*range(rank - 2), rank - 1, rank - 2]))
        dh = k_shape[-1]
        scores = ops.mul(scores, 1 / math.sqrt(dh)) if rng.random() < 0.5 else ops.div(scores, math.sqrt(dh))
        return ops.matmul(ops.softmax(scores), v)

    def context_heads(kv: Any) -> tuple[Any, tuple[int, ...]]:
        L = spec.context_len
        kv = ops.transpose(ops.reshape(kv, [B, L, h, d]), [0, 2, 1, 3])
        if spec.heads_view == "folded":
            return ops.reshape(kv, [B * h, L, d]), (B * h, L, d)
        return kv, (B, h, L, d)

    for op in spec.ops:
        if op in ("linear", "linear_nobias"):
            t = linear(t, f, f, bias=op == "linear")
        elif op == "layer_norm":
            t = ops.layer_norm(t, p("ln_g", (f,), 0.1, 1.0), p("ln_b", (f,), 0.1), 1e-5)
        elif op == "rms_norm":
            inv = ops.rsqrt(ops.add(ops.mean_last(ops.pow(t, 2.0)), 1e-6))
            t = ops.mul(ops.mul(t, inv), p("rms_g", (f,), 0.1, 1.0))
        elif op in ("gelu_erf", "gelu_tanh"):
            t = ops.gelu(t, "none" if op == "gelu_erf" else "tanh")
        elif op == "silu":
            t = ops.silu(t)
        elif op == "geglu":
            inner = f * int(rng.integers(1, 3))
            a, gate = ops.chunk2(linear(t, f, 2 * inner), len(shape))
            t = linear(ops.mul(a, ops.gelu(gate, str(rng.choice(["none", "tanh"])))), inner, f)
        elif op == "residual":
            earlier = history[int(rng.integers(0, len(history)))]
            t = ops.add(t, earlier) if rng.random() < 0.5 else ops.add(earlier, t)
        elif op == "pos":
            shared = rng.random() < 0.3  # one table for every head
            table = {"none": (1, N, C), "heads": (1, 1 if shared else h, N, d), "folded": (1, N, d)}[spec.heads_view]
            t = ops.add(t, p("pos", table, 0.5))
        elif op == "modulate":  # adaLN: scale and shift from the static vector, per sample
            c = ops.silu(cond) if rng.random() < 0.5 else cond
            width = d if spec.heads_view == "heads" and rng.random() < 0.3 else C
            scale, shift = ops.chunk2(linear(c, C, 2 * width, rank=2), 2)
            t = ops.add(ops.mul(t, ops.add(per_sample(scale, width), 1.0)), per_sample(shift, width))
        elif op in ("cross_sdpa", "cross_softmax"):
            k, k_shape = context_heads(linear(context, C, C, bias=rng.random() < 0.5))
            v, _ = context_heads(linear(context, C, C))
            if spec.heads_view == "none":  # split the queries into heads and merge the result back
                q = ops.transpose(ops.reshape(linear(t, C, C), [B, N, h, d]), [0, 2, 1, 3])
                o = attention(q, k, v, k_shape, op[6:])
                o = linear(ops.reshape(ops.transpose(o, [0, 2, 1, 3]), [B, N, C]), C, C)
            else:  # the stream already holds the heads: it is the queries
                o = attention(t, k, v, k_shape, op[6:])
            t = ops.add(t, o) if rng.random() < 0.5 else o
        history.append(t)

    # heads -> tokens [B, N, C] -> map
    if spec.heads_view == "folded":
        t = ops.reshape(t, [B, h, N, d])
    if spec.heads_view != "none":
        t = ops.reshape(ops.transpose(t, [0, 2, 1, 3]), [B, N, C])
    if spec.view_out == "permute":
        m = ops.transpose(ops.reshape(t, [B, H, W, C]), [0, 3, 1, 2])
    else:
        m = ops.reshape(ops.transpose(t, [0, 2, 1]), [B, C, H, W])
    if spec.map_residual:
        m = ops.add(m, x)
    return ops.conv(m, p("conv_out", (3, C, 3, 3), 1 / math.sqrt(9 * C)), p("conv_out_b", (3,), 0.1))


def token_net(spec: TokenNetSpec) -> onnx.ModelProto:
    """``spec`` as an ONNX model (opset 18) in the dynamo exporter's node patterns; output ``output``."""
    ops = _OnnxOps()
    out = _build(spec, ops)
    ops.nodes.append(helper.make_node("Identity", [out], ["output"], name="node_output"))
    graph = helper.make_graph(ops.nodes, "random_token_net", ops.inputs,
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                                             [spec.batch, 3, spec.height, spec.width])],
                              initializer=ops.initializers())
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


class TokenNetModule(nn.Module):
    """``spec`` as PyTorch code (the same weights as :func:`token_net`); keyword inputs by name."""

    def __init__(self, spec: TokenNetSpec) -> None:
        super().__init__()
        self.spec = spec
        recorder = _OnnxOps()
        _build(spec, recorder)
        self.weights = nn.ParameterDict({k: nn.Parameter(torch.from_numpy(v), requires_grad=False)
                                         for k, v in recorder.params.items()})

    def forward(self, image: torch.Tensor, cond: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        given = {k: v for k, v in {"image": image, "cond": cond, "context": context}.items() if v is not None}
        return _build(self.spec, _TorchOps(dict(self.weights), given))


def token_module(spec: TokenNetSpec) -> nn.Module:
    """``spec`` as an ``nn.Module`` in eval mode."""
    return TokenNetModule(spec).eval()


def torch_reference(spec: TokenNetSpec) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """The PyTorch module run eagerly on numpy inputs."""
    module = token_module(spec)

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return module(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()

    return run
