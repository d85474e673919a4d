"""The PyTorch reference executor against ONNX Runtime (CPU) on tiny single-op graphs, plus its
own contract: sigec op dispatch, errors, external weights, partial runs and a dynamo export."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from helpers import sparse_input
from sigec.core.errors import BackendError, InputError
from sigec.core import reference_ops
from sigec.runtime.torch_executor import TorchExecutor

RTOL = ATOL = 1e-5
INT64_MAX = np.iinfo(np.int64).max


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _randn(*shape: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return _rng(seed).standard_normal(shape).astype(dtype)


def _i64(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _f32(*values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def _model(nodes, feeds, outputs, opset=18, initializers=None, extra_opsets=()) -> onnx.ModelProto:
    """A model whose graph inputs are typed after ``feeds`` and whose outputs are left untyped."""
    inputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for name, v in feeds.items()
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [onnx.ValueInfoProto(name=name) for name in outputs],
        [numpy_helper.from_array(v, name) for name, v in (initializers or {}).items()],
    )
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _ort(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _check(nodes, feeds, outputs=("y",), opset=18, initializers=None, rtol=RTOL, atol=ATOL):
    """Run one graph with both executors and compare every output (values, dtype, shape)."""
    if not isinstance(nodes, list):
        nodes = [nodes]
    model = _model(nodes, feeds, list(outputs), opset, initializers)
    expected = _ort(model, feeds)
    got = TorchExecutor(model).run(feeds)
    for name, want in zip(outputs, expected):
        have = got[name].numpy()
        assert have.dtype == want.dtype, (name, have.dtype, want.dtype)
        assert have.shape == want.shape, (name, have.shape, want.shape)
        np.testing.assert_allclose(have, want, rtol=rtol, atol=atol, err_msg=name)
    return got


def node(op_type, inputs, outputs=("y",), **attrs):
    return helper.make_node(op_type, list(inputs), list(outputs), **attrs)


# -- element-wise ------------------------------------------------------------------------------

X = _randn(2, 3, 4)
POS = np.abs(X) + 0.1

UNARY_CASES = [
    ("Relu", X, {}),
    ("LeakyRelu", X, {"alpha": 0.2}),
    ("Elu", X, {"alpha": 0.7}),
    ("Selu", X, {}),
    ("Sigmoid", X, {}),
    ("Tanh", X, {}),
    ("HardSigmoid", X, {"alpha": 0.3, "beta": 0.4}),
    ("HardSwish", X * 4, {}),
    ("Softplus", X * 10, {}),
    ("Softsign", X, {}),
    ("Mish", X, {}),
    ("Exp", X, {}),
    ("Log", POS, {}),
    ("Sqrt", POS, {}),
    ("Reciprocal", POS, {}),
    ("Neg", X, {}),
    ("Abs", X, {}),
    ("Sign", X, {}),
    ("Erf", X, {}),
    ("Sin", X, {}),
    ("Cos", X, {}),
    ("Floor", X * 3, {}),
    ("Ceil", X * 3, {}),
    ("Round", _f32(-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -3.7), {}),
    ("IsNaN", _f32(1.0, np.nan, -np.inf), {}),
    ("Identity", X, {}),
]


@pytest.mark.parametrize("op_type,data,attrs", UNARY_CASES, ids=[c[0] for c in UNARY_CASES])
def test_unary(op_type, data, attrs):
    _check(node(op_type, ["x"], **attrs), {"x": data})


def test_gelu_opset20():
    _check(node("Gelu", ["x"]), {"x": X}, opset=20)
    _check(node("Gelu", ["x"], approximate="tanh"), {"x": X}, opset=20)


def test_prelu_and_clip():
    _check(node("PRelu", ["x", "s"]), {"x": X, "s": _randn(3, 1, seed=1)})
    _check(node("Clip", ["x", "lo", "hi"]), {"x": X, "lo": _f32(-0.5), "hi": _f32(0.7)}, opset=13)
    _check(node("Clip", ["x", "", "hi"]), {"x": X, "hi": _f32(0.2)}, opset=13)
    _check(node("Clip", ["x"]), {"x": X}, opset=13)
    _check(node("Clip", ["x"], min=-0.3, max=0.4), {"x": X}, opset=6)
    _check(node("Clip", ["x", "lo", "hi"]), {"x": _i64(-5, 0, 3, 9), "lo": _i64(-1), "hi": _i64(4)}, opset=13)


BINARY_OPS = ["Add", "Sub", "Mul", "Div", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"]


@pytest.mark.parametrize("op_type", BINARY_OPS)
def test_binary_float_broadcast(op_type):
    b = _randn(4, seed=1)
    b[0] = X[0, 0, 0]  # an equal pair
    _check(node(op_type, ["a", "b"]), {"a": X, "b": b})


@pytest.mark.parametrize("op_type", ["Add", "Sub", "Mul", "Div", "Equal", "Less", "Greater", "Max", "Min"])
def test_binary_int64(op_type):
    a = _i64(-7, -6, 5, 9, 0, 3)
    b = _i64(2, -4, 3, -2, 5, 3)
    _check(node(op_type, ["a", "b"]), {"a": a, "b": b})


def test_mod_pow_variadic():
    a, b = _i64(-7, -6, 5, 9, 4), _i64(3, -4, 3, -2, 5)
    _check(node("Mod", ["a", "b"]), {"a": a, "b": b})
    _check(node("Mod", ["a", "b"], fmod=1), {"a": a, "b": b})
    _check(node("Mod", ["a", "b"], fmod=1), {"a": X, "b": _f32(0.3, -0.7, 0.5, 1.1)})
    _check(node("Pow", ["a", "b"]), {"a": POS, "b": _f32(0.5, 2.0, -1.3, 3.0)})
    _check(node("Pow", ["a", "b"]), {"a": X, "b": _i64(2)})
    three = {"a": X, "b": _randn(4, seed=1), "c": _randn(3, 1, seed=2)}
    for op_type in ("Max", "Min", "Sum", "Mean"):
        _check(node(op_type, ["a", "b", "c"]), three)


def test_where_and_logic():
    cond = _rng(3).random((3, 4)) > 0.5
    _check(node("Where", ["c", "a", "b"]), {"c": cond, "a": X, "b": _randn(4, seed=1)})
    p, q = _rng(4).random(6) > 0.5, _rng(5).random(6) > 0.5
    for op_type in ("And", "Or", "Xor"):
        _check(node(op_type, ["p", "q"]), {"p": p, "q": q})
    _check(node("Not", ["p"]), {"p": p})


def test_casts_and_dropout():
    data = _f32(-2.7, -0.2, 0.0, 0.6, 3.9)
    _check(node("Cast", ["x"], to=TensorProto.INT64), {"x": data})
    _check(node("Cast", ["x"], to=TensorProto.BOOL), {"x": data})
    _check(node("Cast", ["x"], to=TensorProto.FLOAT16), {"x": data})
    _check(node("Cast", ["x"], to=TensorProto.FLOAT), {"x": _i64(-3, 4)})
    _check(node("Cast", ["x"], to=TensorProto.FLOAT), {"x": np.array([True, False])})
    _check(node("CastLike", ["x", "t"]), {"x": _i64(-3, 4), "t": _f32(1.0)})
    _check(node("Dropout", ["x"], ["y", "mask"]), {"x": X}, outputs=("y", "mask"), opset=13)


def test_float16():
    """Half-precision tensors; tolerance of float16's 10-bit mantissa (one ulp) since torch may
    round intermediate float32 results differently from ONNX Runtime."""
    a, b = X.astype(np.float16), _randn(4, seed=1).astype(np.float16)
    for op_type in ("Add", "Mul", "Div"):
        _check(node(op_type, ["a", "b"]), {"a": a, "b": b}, rtol=1e-3, atol=1e-3)
    for op_type in ("Relu", "Sigmoid", "Tanh", "Exp"):
        _check(node(op_type, ["a"]), {"a": a}, rtol=1e-3, atol=1e-3)
    scale, bias = np.ones(4, np.float16), np.zeros(4, np.float16)
    _check(node("LayerNormalization", ["a", "s", "b"]), {"a": a, "s": scale, "b": bias}, opset=17, rtol=2e-3, atol=2e-3)


def test_float16_network_chain():
    """Conv -> GroupNorm (opset 21) -> pools -> Resize -> BatchNorm in float16; tolerance of a few
    float16 ulps because each op rounds its output to float16 (ONNX Runtime computes some in float32)."""
    rng = _rng(9)
    half = {
        "w": rng.standard_normal((4, 4, 3, 3)).astype(np.float16) * np.float16(0.3),
        "s": rng.random(4).astype(np.float16) + np.float16(0.5),
        "b": rng.standard_normal(4).astype(np.float16),
    }
    nodes = [
        node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        node("GroupNormalization", ["c", "s", "b"], ["g"], num_groups=2),
        node("AveragePool", ["g"], ["p"], kernel_shape=[2, 2]),
        node("Resize", ["p", "", "sc"], ["r"], mode="linear"),
        node("MaxPool", ["r"], ["m"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        node("BatchNormalization", ["m", "s", "b", "b", "s"]),
    ]
    feeds = {"x": rng.random((1, 4, 6, 6)).astype(np.float16), "sc": _f32(1, 1, 2, 2), **half}
    _check(nodes, feeds, opset=21, rtol=3e-3, atol=3e-3)


# -- tensor manipulation -----------------------------------------------------------------------

Y = _randn(2, 5, 6, seed=7)


def test_concat_split():
    _check(node("Concat", ["a", "b", "c"], axis=1), {"a": Y, "b": Y[:, :2], "c": Y[:, :1]})
    _check(node("Concat", ["a", "b"], axis=-1), {"a": Y, "b": Y})
    _check(node("Split", ["x", "s"], ["y", "z"], axis=2), {"x": Y, "s": _i64(2, 4)}, outputs=("y", "z"), opset=13)
    _check(node("Split", ["x"], ["y", "z", "w"], axis=2), {"x": Y}, outputs=("y", "z", "w"), opset=13)
    _check(node("Split", ["x"], ["y", "z", "w"], axis=1, num_outputs=3), {"x": Y}, outputs=("y", "z", "w"))
    _check(node("Split", ["x"], ["y", "z"], axis=-1, split=[1, 5]), {"x": Y}, outputs=("y", "z"), opset=11)


SLICE_CASES = [
    ((0,), (2,), None, None),
    ((1, -3), (INT64_MAX, -1), (2, 1), None),
    ((-1,), (-INT64_MAX,), (2,), (-1,)),
    ((4, 5), (0, -INT64_MAX), (1, 2), (-2, -3)),
    ((0, 1), (6, 6), (-1, 0), (2, 3)),
    ((10,), (20,), (1,), (1,)),
]


@pytest.mark.parametrize("starts,ends,axes,steps", SLICE_CASES)
def test_slice(starts, ends, axes, steps):
    feeds = {"x": Y, "s": _i64(*starts), "e": _i64(*ends)}
    names = ["x", "s", "e"]
    if axes is not None:
        feeds["a"] = _i64(*axes)
        names.append("a")
    if steps is not None:
        feeds["p"] = _i64(*steps)
        names.append("p")
    _check(node("Slice", names), feeds)


def test_slice_opset9_attributes():
    _check(node("Slice", ["x"], starts=[1, 0], ends=[3, -1], axes=[1, 2]), {"x": Y}, opset=9)


def test_gather():
    _check(node("Gather", ["x", "i"], axis=1), {"x": Y, "i": _i64(0, -1, 3)})
    _check(node("Gather", ["x", "i"], axis=2), {"x": Y, "i": np.array([[0, 5], [-2, 1]], np.int64)})
    _check(node("Gather", ["x", "i"]), {"x": Y, "i": np.array(1, np.int64)})
    index = _rng(1).integers(-5, 5, size=(2, 3, 6))
    _check(node("GatherElements", ["x", "i"], axis=1), {"x": Y, "i": index})


def test_shape_ops():
    _check(node("Reshape", ["x", "s"]), {"x": Y, "s": _i64(0, -1, 3)})
    _check(node("Reshape", ["x", "s"], allowzero=1), {"x": Y, "s": _i64(10, 6)})
    for axis in (0, 2, -1):
        _check(node("Flatten", ["x"], axis=axis), {"x": Y})
    _check(node("Transpose", ["x"]), {"x": Y})
    _check(node("Transpose", ["x"], perm=[1, 0, 2]), {"x": Y})
    ones = _randn(2, 1, 3, 1)
    _check(node("Squeeze", ["x", "a"]), {"x": ones, "a": _i64(-1)}, opset=13)
    _check(node("Squeeze", ["x"]), {"x": ones}, opset=13)
    _check(node("Squeeze", ["x"], axes=[1]), {"x": ones}, opset=11)
    _check(node("Unsqueeze", ["x", "a"]), {"x": Y, "a": _i64(0, -1)}, opset=13)
    _check(node("Unsqueeze", ["x"], axes=[1, 4]), {"x": Y}, opset=11)
    _check(node("Expand", ["x", "s"]), {"x": _randn(3, 1), "s": _i64(2, 1, 4)})
    _check(node("Tile", ["x", "r"]), {"x": Y, "r": _i64(1, 2, 3)})
    _check(node("Shape", ["x"]), {"x": Y})
    _check(node("Shape", ["x"], start=1, end=-1), {"x": Y}, opset=15)
    _check(node("Size", ["x"]), {"x": Y})


def test_constants():
    value = helper.make_tensor("v", TensorProto.INT64, [1], [7])
    _check(node("ConstantOfShape", ["s"], value=value), {"s": _i64(2, 3)})
    _check(node("ConstantOfShape", ["s"]), {"s": _i64(4)})
    forms = {
        "value": numpy_helper.from_array(_randn(2, 3), "t"),
        "value_float": 1.5,
        "value_floats": [1.0, 2.5],
        "value_int": 3,
        "value_ints": [4, 5],
    }
    for key, val in forms.items():
        _check([node("Constant", [], ["c"], **{key: val}), node("Identity", ["c"])], {})
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("v", TensorProto.FLOAT, [3], [1, 2, 3]),
        helper.make_tensor("i", TensorProto.INT64, [3], [0, 5, 7]),
        [2, 4],
    )
    got = TorchExecutor(_model([node("Constant", [], sparse_value=sparse)], {}, ["y"])).run({})["y"]
    np.testing.assert_array_equal(got.numpy(), [[1, 0, 0, 0], [0, 2, 0, 3]])


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad(mode):
    data = _randn(1, 2, 4, 5, seed=3)
    _check(node("Pad", ["x", "p"], mode=mode), {"x": data, "p": _i64(0, 0, 2, 1, 0, 0, 1, 3)})
    _check(
        node("Pad", ["x", "p", "v", "a"], mode=mode),
        {"x": data, "p": _i64(3, -1, 1, 2), "v": _f32(0.5), "a": _i64(2, -1)},
    )
    _check(node("Pad", ["x", "p"], mode=mode), {"x": data, "p": _i64(0, 0, -1, 1, 0, 0, 2, -2)})


def test_pad_other_forms():
    data = _randn(1, 2, 4, 5, seed=3)
    _check(node("Pad", ["x", "p"], mode="wrap"), {"x": data, "p": _i64(0, 0, 1, 2, 0, 0, 2, 1)}, opset=19)
    _check(node("Pad", ["x"], pads=[0, 1, 1, 0, 0, 0, 2, 1], value=2.0), {"x": data}, opset=2)
    _check(node("Pad", ["x", "p", "v"]), {"x": _i64(1, 2, 3), "p": _i64(2, 1), "v": _i64(-4)}, opset=13)


def test_range_trilu_cumsum_topk():
    _check(node("Range", ["a", "b", "c"]), {"a": _f32(0.5), "b": _f32(3.9), "c": _f32(0.7)})
    _check(
        node("Range", ["a", "b", "c"]),
        {"a": np.array(10, np.int64), "b": np.array(-3, np.int64), "c": np.array(-4, np.int64)},
    )
    _check(
        node("Range", ["a", "b", "c"]),
        {"a": np.array(1, np.int64), "b": np.array(0, np.int64), "c": np.array(1, np.int64)},
    )
    square = _randn(2, 4, 5)
    for upper, k in itertools.product((0, 1), (-1, 0, 2)):
        _check(node("Trilu", ["x", "k"], upper=upper), {"x": square, "k": np.array(k, np.int64)})
    _check(node("Trilu", ["x"]), {"x": square})
    for exclusive, reverse in itertools.product((0, 1), (0, 1)):
        _check(
            node("CumSum", ["x", "a"], exclusive=exclusive, reverse=reverse), {"x": square, "a": np.array(1, np.int64)}
        )
    _check(node("CumSum", ["x", "a"]), {"x": _i64(1, 2, 3), "a": np.array(0, np.int64)})
    for largest, axis in ((1, -1), (0, 1)):
        _check(
            node("TopK", ["x", "k"], ["v", "i"], largest=largest, axis=axis),
            {"x": square, "k": _i64(3)},
            outputs=("v", "i"),
        )
    ties = np.array([[3, 1, 3, 2, 1]], np.float32)
    _check(node("TopK", ["x", "k"], ["v", "i"]), {"x": ties, "k": _i64(4)}, outputs=("v", "i"))
    _check(node("NonZero", ["x"]), {"x": np.array([[1, 0], [0, 2]], np.int64)})


def test_depth_space():
    data = _randn(2, 8, 3, 4)
    _check(node("DepthToSpace", ["x"], blocksize=2), {"x": data})
    _check(node("DepthToSpace", ["x"], blocksize=2, mode="CRD"), {"x": data})
    _check(node("SpaceToDepth", ["x"], blocksize=2), {"x": _randn(2, 3, 4, 6)})


# -- neural-network ops ------------------------------------------------------------------------

IMG = _randn(2, 4, 9, 8, seed=11)

CONV_CASES = [
    {},
    {"pads": [1, 1, 1, 1]},
    {"pads": [0, 0, 1, 2], "strides": [2, 2]},
    {"group": 2, "dilations": [2, 1], "pads": [2, 1, 2, 1]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 3]},
    {"auto_pad": "VALID"},
]


@pytest.mark.parametrize("attrs", CONV_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_conv2d(attrs, bias):
    group = attrs.get("group", 1)
    feeds = {"x": IMG, "w": _randn(6, 4 // group, 3, 3, seed=12)}
    if bias:
        feeds["b"] = _randn(6, seed=13)
    _check(node("Conv", list(feeds), **attrs), feeds)


def test_conv1d_3d():
    _check(node("Conv", ["x", "w"], pads=[1, 2], strides=[2]), {"x": _randn(2, 3, 11), "w": _randn(4, 3, 3, seed=1)})
    _check(
        node("Conv", ["x", "w"], pads=[1, 0, 1, 1, 0, 1]),
        {"x": _randn(1, 2, 4, 5, 6), "w": _randn(3, 2, 3, 2, 3, seed=1)},
    )


CONV_T_CASES = [
    {},
    {"strides": [2, 2]},
    {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
    {"strides": [3, 2], "pads": [0, 1, 2, 0], "dilations": [1, 2], "group": 2},
    {"strides": [2, 2], "output_shape": [20, 18]},
]


@pytest.mark.parametrize("attrs", CONV_T_CASES)
def test_conv_transpose(attrs):
    group = attrs.get("group", 1)
    feeds = {"x": IMG, "w": _randn(4, 6 // group, 3, 3, seed=14), "b": _randn(6, seed=15)}
    _check(node("ConvTranspose", ["x", "w", "b"], **attrs), feeds)


def test_conv_transpose_1d():
    feeds = {"x": _randn(1, 2, 7), "w": _randn(2, 3, 4, seed=1)}
    _check(node("ConvTranspose", ["x", "w"], strides=[2], pads=[1, 2]), feeds)


def test_normalizations():
    c = IMG.shape[1]
    stats = {
        "s": _randn(c, seed=1),
        "b": _randn(c, seed=2),
        "m": _randn(c, seed=3),
        "v": np.abs(_randn(c, seed=4)) + 0.5,
    }
    _check(node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3), {"x": IMG, **stats})
    _check(node("InstanceNormalization", ["x", "s", "b"]), {"x": IMG, "s": stats["s"], "b": stats["b"]})
    data = _randn(2, 6, 5, 4, seed=5)
    _check(
        node("GroupNormalization", ["x", "s", "b"], num_groups=3),
        {"x": data, "s": _randn(3, seed=6), "b": _randn(3, seed=7)},
    )
    _check(
        node("GroupNormalization", ["x", "s", "b"], num_groups=3, epsilon=1e-3),
        {"x": data, "s": _randn(6, seed=6), "b": _randn(6, seed=7)},
        opset=21,
    )
    _check(
        node("LayerNormalization", ["x", "s", "b"]),
        {"x": data, "s": _randn(4, seed=8), "b": _randn(4, seed=9)},
        opset=17,
    )
    _check(
        node("LayerNormalization", ["x", "s"], ["y", "mean", "inv"], axis=1),
        {"x": data, "s": _randn(6, 5, 4, seed=8)},
        outputs=("y", "mean", "inv"),
        opset=17,
    )


POOL_CASES = [
    {"kernel_shape": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 1, 1]},
    {"kernel_shape": [3, 3], "strides": [3, 3], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    {"kernel_shape": [2, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]},
]


@pytest.mark.parametrize("attrs", POOL_CASES)
def test_max_pool(attrs):
    _check(node("MaxPool", ["x"], **attrs), {"x": IMG})


def test_max_pool_dilations():
    _check(node("MaxPool", ["x"], kernel_shape=[2, 2], dilations=[2, 2], pads=[1, 1, 0, 0]), {"x": IMG})


@pytest.mark.parametrize("attrs", POOL_CASES)
@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_average_pool(attrs, count_include_pad):
    _check(node("AveragePool", ["x"], count_include_pad=count_include_pad, **attrs), {"x": IMG})


def test_global_pools():
    _check(node("GlobalAveragePool", ["x"]), {"x": IMG})
    _check(node("GlobalMaxPool", ["x"]), {"x": IMG})


def test_matmul_gemm_einsum():
    _check(node("MatMul", ["a", "b"]), {"a": _randn(2, 3, 4), "b": _randn(4, 5, seed=1)})
    _check(node("MatMul", ["a", "b"]), {"a": _randn(4), "b": _randn(2, 4, 3, seed=1)})
    abc = {"a": _randn(4, 3), "b": _randn(5, 4, seed=1), "c": _randn(5, seed=2)}
    _check(node("Gemm", ["a", "b", "c"], transA=1, transB=1, alpha=0.5, beta=2.0), abc)
    _check(node("Gemm", ["a", "b"], transA=1, transB=1), {"a": abc["a"], "b": abc["b"]})
    _check(node("Einsum", ["a", "b"], equation="bij, bjk -> bik"), {"a": _randn(2, 3, 4), "b": _randn(2, 4, 5, seed=1)})
    _check(node("Einsum", ["a"], equation="...ij->...ji"), {"a": _randn(2, 3, 4)})


def test_softmax():
    for op_type in ("Softmax", "LogSoftmax"):
        _check(node(op_type, ["x"]), {"x": IMG}, opset=13)
        _check(node(op_type, ["x"], axis=1), {"x": IMG}, opset=13)
        _check(node(op_type, ["x"], axis=2), {"x": IMG}, opset=11)


REDUCE_OPS = [
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceL1",
    "ReduceLogSumExp",
]


@pytest.mark.parametrize("op_type", REDUCE_OPS)
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce(op_type, keepdims):
    data = _randn(2, 3, 4, seed=21)
    _check(node(op_type, ["x", "a"], keepdims=keepdims), {"x": data, "a": _i64(0, -1)})
    _check(node(op_type, ["x"], keepdims=keepdims), {"x": data})
    if op_type != "ReduceSum":
        _check(node(op_type, ["x"], keepdims=keepdims, axes=[1]), {"x": data}, opset=13)


def test_reduce_special_axes():
    data = _randn(2, 3, 4, seed=21)
    _check(node("ReduceSum", ["x", "a"], noop_with_empty_axes=1), {"x": data, "a": np.zeros(0, np.int64)}, opset=13)
    _check(node("ReduceMean", ["x", "a"]), {"x": data, "a": np.zeros(0, np.int64)})
    _check(node("ReduceSum", ["x", "a"]), {"x": _i64(1, 5, -2), "a": _i64(0)}, opset=13)


def test_arg_max_min():
    data = _randn(3, 4, 5, seed=22)
    ties = np.array([[1, 3, 3, 0], [2, 2, 1, 2]], np.int64)
    for op_type in ("ArgMax", "ArgMin"):
        _check(node(op_type, ["x"], axis=1, keepdims=0), {"x": data})
        _check(node(op_type, ["x"], axis=-1), {"x": data})
        _check(node(op_type, ["x"], axis=1), {"x": ties})
        _check(node(op_type, ["x"], axis=1, select_last_index=1), {"x": ties})


def test_attention_opset23():
    q, k, v = _randn(2, 4, 5, 8, seed=1), _randn(2, 4, 6, 8, seed=2), _randn(2, 4, 6, 3, seed=3)
    _check(node("Attention", ["q", "k", "v"]), {"q": q, "k": k, "v": v}, opset=23)
    _check(node("Attention", ["q", "k", "v"], scale=0.2), {"q": q, "k": k, "v": v}, opset=23)
    mask = _rng(4).random((5, 6)) > 0.3
    mask[:, 0] = True
    _check(node("Attention", ["q", "k", "v", "m"]), {"q": q, "k": k, "v": v, "m": mask}, opset=23)
    _check(node("Attention", ["q", "k", "v", "m"]), {"q": q, "k": k, "v": v, "m": _randn(5, 6, seed=5)}, opset=23)
    q3, k3 = _randn(2, 5, 16, seed=1), _randn(2, 6, 8, seed=2)
    heads = {"q_num_heads": 4, "kv_num_heads": 2}
    _check(node("Attention", ["q", "k", "v"], **heads), {"q": q3, "k": k3, "v": k3}, opset=23)


def test_attention_causal_with_past():
    q, k, v = _randn(1, 2, 3, 4, seed=1), _randn(1, 2, 3, 4, seed=2), _randn(1, 2, 3, 4, seed=3)
    past = {"pk": _randn(1, 2, 2, 4, seed=4), "pv": _randn(1, 2, 2, 4, seed=5)}
    outs = ("y", "present_key", "present_value")
    _check(
        node("Attention", ["q", "k", "v", "", "pk", "pv"], outs, is_causal=1),
        {"q": q, "k": k, "v": v, **past},
        outputs=outs,
        opset=23,
    )


# -- Resize ------------------------------------------------------------------------------------

RESIZE_IMG = _randn(1, 2, 5, 7, seed=31)
COORD_MODES = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"]
NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
RESIZE_TARGETS = {
    "scales_up": ("scales", _f32(1, 1, 2, 2.5)),
    "scales_down": ("scales", _f32(1, 1, 0.6, 0.45)),
    "scales_mixed": ("scales", _f32(1, 1, 3, 0.7)),
    "sizes_up": ("sizes", _i64(1, 2, 9, 11)),
    "sizes_down": ("sizes", _i64(1, 2, 3, 4)),
    "sizes_one": ("sizes", _i64(1, 2, 1, 13)),
}


def _check_resize(target: str, opset: int = 18, **attrs):
    kind, value = RESIZE_TARGETS[target]
    names = ["x", "", "t"] if kind == "scales" else ["x", "", "", "t"]
    _check(node("Resize", names, **attrs), {"x": RESIZE_IMG, "t": value}, opset=opset)


@pytest.mark.parametrize("target", list(RESIZE_TARGETS))
@pytest.mark.parametrize("coord_mode", COORD_MODES)
@pytest.mark.parametrize("nearest_mode", NEAREST_MODES)
def test_resize_nearest(target, coord_mode, nearest_mode):
    _check_resize(target, mode="nearest", coordinate_transformation_mode=coord_mode, nearest_mode=nearest_mode)


@pytest.mark.parametrize("target", list(RESIZE_TARGETS))
@pytest.mark.parametrize("coord_mode", COORD_MODES)
def test_resize_linear(target, coord_mode):
    _check_resize(target, mode="linear", coordinate_transformation_mode=coord_mode)


@pytest.mark.parametrize("coord_mode", ["half_pixel", "align_corners", "asymmetric"])
@pytest.mark.parametrize("exclude_outside", [0, 1])
def test_resize_cubic(coord_mode, exclude_outside):
    attrs = {"mode": "cubic", "coordinate_transformation_mode": coord_mode, "exclude_outside": exclude_outside}
    _check_resize("scales_up", **attrs)
    _check_resize("sizes_down", **attrs)


def test_resize_other_forms():
    _check_resize("scales_mixed", opset=19, mode="linear", coordinate_transformation_mode="half_pixel_symmetric")
    _check(
        node(
            "Resize",
            ["x", "r", "", "s"],
            mode="linear",
            coordinate_transformation_mode="tf_crop_and_resize",
            extrapolation_value=-3.0,
        ),
        {"x": RESIZE_IMG, "r": _f32(0, 0, -0.2, 0.1, 1, 1, 0.8, 1.3), "s": _i64(1, 2, 6, 5)},
        opset=13,
    )
    _check(
        node("Resize", ["x", "", "", "s"], axes=[3, 2], keep_aspect_ratio_policy="not_larger"),
        {"x": RESIZE_IMG, "s": _i64(12, 20)},
    )
    _check(node("Resize", ["x", "s"], mode="nearest"), {"x": RESIZE_IMG, "s": _f32(1, 1, 2, 3)}, opset=10)
    _check(node("Resize", ["x", "s"], mode="linear"), {"x": RESIZE_IMG, "s": _f32(1, 1, 2, 1.5)}, opset=10)
    _check(node("Upsample", ["x", "s"], mode="nearest"), {"x": RESIZE_IMG, "s": _f32(1, 1, 2, 3)}, opset=9)
    _check_resize("sizes_up", mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    _check(node("Resize", ["x", "", "s"], mode="nearest"), {"x": _randn(2, 3, 4), "s": _f32(1.5, 1, 2.5)}, opset=13)


# -- executor contract -------------------------------------------------------------------------


def test_sigec_ops_dispatch():
    rng = _rng(41)
    base, vals, grid, coords = sparse_input(rng, 2, 3, 10, 12, 4, frac=0.5).values()
    assert len(coords) > 0
    scale, shift = rng.standard_normal(3).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32)
    gather_attrs = dict(
        window=[6, 6], step=[4, 4], offset=[-1, -1], pad_mode="reflect", activation="leaky_relu", alpha=0.1
    )
    nodes = [
        helper.make_node(
            "TileGather",
            ["base", "vals", "grid", "coords", "scale", "shift"],
            ["win"],
            domain="ai.sigec",
            **gather_attrs,
        ),
        helper.make_node("Conv", ["win", "w"], ["conv"]),
        helper.make_node("TileScatter", ["base", "conv", "coords"], ["y"], domain="ai.sigec"),
        helper.make_node(
            "TileGather", ["base", "", "", "coords"], ["plain"], domain="ai.sigec", window=[3, 5], step=[4, 4]
        ),
    ]
    feeds = {"base": base, "vals": vals, "grid": grid, "coords": coords, "scale": scale, "shift": shift}
    weight = rng.standard_normal((3, 3, 3, 3)).astype(np.float32)
    model = _model(nodes, feeds, ["y", "plain"], initializers={"w": weight}, extra_opsets=[("ai.sigec", 1)])
    got = TorchExecutor(model).run(feeds)

    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    windows = reference_ops.tile_gather(
        t["base"], t["vals"], t["grid"], t["coords"], t["scale"], t["shift"], **gather_attrs
    )
    conv = torch.nn.functional.conv2d(windows, torch.from_numpy(weight))
    want = reference_ops.tile_scatter(t["base"], conv, t["coords"])
    plain = reference_ops.tile_gather(t["base"], None, None, t["coords"], window=[3, 5], step=[4, 4])
    torch.testing.assert_close(got["y"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["plain"], plain, rtol=0, atol=0)
    assert not torch.equal(got["y"], t["base"])


def test_unknown_op_raises_backend_error_naming_node():
    model = _model(
        [node("Relu", ["x"], ["r"], name="ok"), node("FrobnicateV2", ["r"], name="weird_node")], {"x": X}, ["y"]
    )
    with pytest.raises(BackendError, match=r"weird_node.*FrobnicateV2"):
        TorchExecutor(model)
    other = _model([helper.make_node("TileGather", ["x"], ["y"], name="n1", domain="com.example")], {"x": X}, ["y"])
    with pytest.raises(BackendError, match="n1"):
        TorchExecutor(other)


def test_failing_node_is_named():
    model = _model([node("Reshape", ["x", "s"], name="bad_reshape")], {"x": X, "s": _i64(5, 5)}, ["y"])
    with pytest.raises(BackendError, match="bad_reshape"):
        TorchExecutor(model).run({"x": X, "s": _i64(5, 5)})


def test_unsorted_graph_raises():
    nodes = [node("Relu", ["r"], ["y"]), node("Neg", ["x"], ["r"])]
    with pytest.raises(BackendError, match="topologically"):
        TorchExecutor(_model(nodes, {"x": X}, ["y"]))
    with pytest.raises(BackendError, match="nowhere"):
        TorchExecutor(_model([node("Add", ["x", "nowhere"])], {"x": X}, ["y"]))


def _weighted_model(include_weight: bool) -> onnx.ModelProto:
    """``y = x @ w + b`` where ``w`` is a graph input and ``b`` an initializer."""
    feeds = {"x": _randn(2, 3)}
    if include_weight:
        feeds["w"] = _randn(3, 4, seed=1)
    nodes = [node("MatMul", ["x", "w"], ["h"]), node("Add", ["h", "b"])]
    return _model(nodes, feeds, ["y"], initializers={"b": _f32(1, 2, 3, 4)})


def test_external_initializers():
    x, w, b2 = _randn(2, 3), _randn(3, 4, seed=1), _randn(4, seed=2)
    with_input = _weighted_model(include_weight=True)
    executor = TorchExecutor(with_input, initializers={"w": w})
    assert executor.input_names == ["x"]
    assert executor.output_names == ["y"]
    np.testing.assert_allclose(executor.run({"x": x})["y"].numpy(), x @ w + _f32(1, 2, 3, 4), rtol=1e-6)
    # not declared at all, supplied as torch tensors, overriding the stored bias
    bare = _weighted_model(include_weight=False)
    executor = TorchExecutor(bare, initializers={"w": torch.from_numpy(w), "b": torch.from_numpy(b2), "unused": w})
    np.testing.assert_allclose(executor.run({"x": x})["y"].numpy(), x @ w + b2, rtol=1e-6)
    with pytest.raises(BackendError, match="'w'"):
        TorchExecutor(bare)


def test_external_data_initializer_supplied():
    model = _weighted_model(include_weight=False)
    weight = numpy_helper.from_array(_randn(3, 4, seed=1), "w")
    onnx.external_data_helper.set_external_data(weight, location="missing_weights.bin")
    weight.ClearField("raw_data")
    model.graph.initializer.append(weight)
    with pytest.raises(BackendError, match="externally"):
        TorchExecutor(model)
    w = _randn(3, 4, seed=1)
    got = TorchExecutor(model, initializers={"w": w}).run({"x": _randn(2, 3)})["y"]
    np.testing.assert_allclose(got.numpy(), _randn(2, 3) @ w + _f32(1, 2, 3, 4), rtol=1e-6)


def test_feed_validation():
    executor = TorchExecutor(_weighted_model(include_weight=True))
    assert executor.input_names == ["x", "w"]
    with pytest.raises(InputError, match="missing"):
        executor.run({"x": _randn(2, 3)})
    with pytest.raises(InputError, match="dtype"):
        executor.run({"x": _randn(2, 3).astype(np.float64), "w": _randn(3, 4)})
    with pytest.raises(InputError, match="axis 1"):
        executor.run({"x": _randn(2, 5), "w": _randn(3, 4)})
    with pytest.raises(InputError, match="unknown"):
        executor.run({"x": _randn(2, 3), "w": _randn(3, 4), "z": _randn(1)})


def test_partial_outputs_and_release():
    nodes = [
        node("Relu", ["x"], ["a"]),
        node("Neg", ["a"], ["b"]),
        node("Exp", ["b"], ["c"]),
        node("Add", ["c", "a"], ["y"]),
        node("Sin", ["q"], ["unused"]),
    ]
    model = _model(nodes, {"x": X, "q": X}, ["y", "unused"])
    executor = TorchExecutor(model)
    got = executor.run({"x": X}, output_names=["b", "y"])  # "q" is not needed for these
    np.testing.assert_allclose(got["b"].numpy(), -np.maximum(X, 0))
    np.testing.assert_allclose(got["y"].numpy(), np.exp(-np.maximum(X, 0)) + np.maximum(X, 0), rtol=1e-6)
    plan = executor._plan(("y",))
    released = {step.outputs[0]: set(release) for step, release in plan.steps}
    assert [step.outputs[0] for step, _ in plan.steps] == ["a", "b", "c", "y"]
    assert released == {"a": {"x"}, "b": set(), "c": {"b"}, "y": {"a", "c"}}
    with pytest.raises(InputError, match="unknown output"):
        executor.run({"x": X}, output_names=["nope"])


def test_constant_nodes_and_torch_feeds():
    nodes = [node("Constant", [], ["k"], value_floats=[1.0, 2.0, 3.0, 4.0]), node("Mul", ["x", "k"])]
    executor = TorchExecutor(_model(nodes, {"x": X}, ["y", "k"]))
    got = executor.run({"x": torch.from_numpy(X)})
    np.testing.assert_allclose(got["y"].numpy(), X * _f32(1, 2, 3, 4))
    assert got["y"].is_inference()  # ran under torch.inference_mode()
    with torch.inference_mode():
        got["k"].add_(1)  # outputs that are constants are copies
    np.testing.assert_allclose(executor.run({"x": X})["k"].numpy(), _f32(1, 2, 3, 4))


def test_local_functions_are_inlined():
    twice = helper.make_function(
        "local", "Twice", ["a"], ["b"], [node("Add", ["a", "a"], ["b"])], [helper.make_opsetid("", 18)]
    )
    graph = helper.make_graph(
        [helper.make_node("Twice", ["x"], ["y"], domain="local")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [onnx.ValueInfoProto(name="y")],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("local", 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[twice])
    np.testing.assert_array_equal(TorchExecutor(model).run({"x": X})["y"].numpy(), 2 * X)


class _TinyGenerator(torch.nn.Module):
    """Conv -> GroupNorm -> SiLU -> single-head self-attention over pixels -> Conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 8)
        self.qkv = torch.nn.Linear(8, 24)
        self.up = torch.nn.Upsample(scale_factor=2, mode="nearest")
        self.conv_out = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.norm(self.conv_in(x)))
        b, c, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1) @ v
        h = h + attn.transpose(1, 2).reshape(b, c, height, width)
        return self.conv_out(self.up(h))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # raised inside the torch exporter
def test_dynamo_export_matches_torch():
    """The exported graph (GroupNorm as InstanceNormalization + Mul/Add, SiLU as Sigmoid * x,
    attention as MatMul/Softmax/MatMul) reproduces the module."""
    torch.manual_seed(0)
    module = _TinyGenerator().eval()
    x = torch.randn(1, 3, 8, 8)
    program = torch.onnx.export(module, (x,), dynamo=True, opset_version=18, verbose=False)
    model = program.model_proto
    assert {"Conv", "InstanceNormalization", "Sigmoid", "Softmax", "MatMul", "Resize"} <= {
        n.op_type for n in model.graph.node
    }
    executor = TorchExecutor(model)
    got = executor.run({executor.input_names[0]: x.numpy()})[executor.output_names[0]]
    with torch.no_grad():
        want = module(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
