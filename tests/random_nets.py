"""Random local convolutional ONNX graphs for property tests (built directly with onnx.helper)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper


@dataclass
class _T:
    name: str
    c: int
    h: int
    w: int


@dataclass
class NetBuilder:
    """Builds a random graph one op at a time, tracking each tensor's shape."""

    rng: np.random.Generator
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    tensors: list[_T] = field(default_factory=list)
    count: int = 0

    def _name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}{self.count}"

    def _const(self, array: np.ndarray, hint: str) -> str:
        name = self._name(hint)
        self.inits.append(onnx.numpy_helper.from_array(array.astype(array.dtype), name=name))
        return name

    def _add(self, op: str, inputs: list[str], c: int, h: int, w: int, **attrs) -> _T:
        out = _T(self._name(op.lower()), c, h, w)
        self.nodes.append(helper.make_node(op, inputs, [out.name], name=self._name(f"n_{op}_"), **attrs))
        self.tensors.append(out)
        return out

    def pick(self) -> _T:
        # Prefer recent tensors so that graphs get deep.
        k = min(len(self.tensors), 3)
        return self.tensors[-1 - int(self.rng.integers(0, k))]

    def conv(self, x: _T, *, k: int, s: int, pads: list[int], cout: int, group: int = 1, dilation: int = 1) -> _T:
        w = self._const((self.rng.standard_normal((cout, x.c // group, k, k)) / np.sqrt(x.c * k * k / group)).astype(np.float32), "w")
        b = self._const(self.rng.standard_normal(cout).astype(np.float32) * 0.1, "b")
        span = (k - 1) * dilation + 1
        h = (x.h + pads[0] + pads[2] - span) // s + 1
        wd = (x.w + pads[1] + pads[3] - span) // s + 1
        return self._add("Conv", [x.name, w, b], cout, h, wd, kernel_shape=[k, k], strides=[s, s], pads=pads,
                         group=group, dilations=[dilation, dilation])

    def random_op(self) -> None:
        r = self.rng
        x = self.pick()
        choice = r.choice(["conv", "conv", "conv", "act", "bn", "add", "concat", "up", "convt", "pool", "reflect",
                           "d2s", "chan_affine", "silu", "dw"])
        can_down = x.h >= 6 and x.w >= 6
        can_up = x.h <= 24 and x.w <= 24
        if choice == "conv" or (choice in ("pool",) and not can_down) or (choice in ("up", "convt", "d2s") and not can_up):
            k = int(r.choice([1, 3, 5]))
            s = int(r.choice([1, 2])) if can_down else 1
            if s == 2 and r.random() < 0.5 and k == 3:
                pads = [0, 0, 1, 1]
            else:
                pads = [k // 2] * 4
            dil = 2 if (k == 3 and s == 1 and r.random() < 0.2) else 1
            if dil == 2:
                pads = [2] * 4
            self.conv(x, k=k, s=s, pads=pads, cout=int(r.integers(2, 5)), dilation=dil)
        elif choice == "dw":
            self.conv(x, k=3, s=1, pads=[1, 1, 1, 1], cout=x.c, group=x.c)
        elif choice == "act":
            op = str(r.choice(["Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid"]))
            attrs = {"alpha": 0.2} if op == "LeakyRelu" else {}
            self._add(op, [x.name], x.c, x.h, x.w, **attrs)
        elif choice == "silu":
            sig = self._add("Sigmoid", [x.name], x.c, x.h, x.w)
            self._add("Mul", [x.name, sig.name], x.c, x.h, x.w)
        elif choice == "bn":
            params = [r.uniform(0.5, 1.5, x.c), r.normal(0, 0.1, x.c), r.normal(0, 0.1, x.c), r.uniform(0.5, 1.5, x.c)]
            names = [self._const(p.astype(np.float32), "bn") for p in params]
            self._add("BatchNormalization", [x.name, *names], x.c, x.h, x.w, epsilon=1e-5)
        elif choice == "chan_affine":
            m = self._const(r.uniform(0.5, 1.5, (x.c, 1, 1)).astype(np.float32), "m")
            y = self._add("Mul", [x.name, m], x.c, x.h, x.w)
            a = self._const(r.normal(0, 0.1, (1, x.c, 1, 1)).astype(np.float32), "a")
            self._add("Add", [y.name, a], x.c, x.h, x.w)
        elif choice in ("add", "concat"):
            same = [t for t in self.tensors if (t.h, t.w) == (x.h, x.w) and t is not x]
            if not same:
                self._add("Relu", [x.name], x.c, x.h, x.w)
                return
            y = same[int(r.integers(0, len(same)))]
            if choice == "add":
                if y.c != x.c:
                    y = self.conv(y, k=1, s=1, pads=[0] * 4, cout=x.c)
                self._add(str(r.choice(["Add", "Sub", "Mul"])), [x.name, y.name], x.c, x.h, x.w)
            else:
                self._add("Concat", [x.name, y.name], x.c + y.c, x.h, x.w, axis=1)
        elif choice == "up":
            mode = str(r.choice(["nearest", "linear"]))
            scales = self._const(np.array([1, 1, 2, 2], np.float32), "sc")
            attrs = {"mode": mode}
            if mode == "nearest":
                attrs.update(coordinate_transformation_mode="asymmetric", nearest_mode="floor")
            else:
                attrs.update(coordinate_transformation_mode="half_pixel")
            self._add("Resize", [x.name, "", scales], x.c, x.h * 2, x.w * 2, **attrs)
        elif choice == "convt":
            k, p, op_ = (3, 1, 1) if r.random() < 0.5 else (4, 1, 0)
            cout = int(r.integers(2, 5))
            w = self._const((r.standard_normal((x.c, cout, k, k)) / np.sqrt(x.c * k)).astype(np.float32), "wt")
            h = (x.h - 1) * 2 - 2 * p + k + op_
            wd = (x.w - 1) * 2 - 2 * p + k + op_
            self._add("ConvTranspose", [x.name, w], cout, h, wd, kernel_shape=[k, k], strides=[2, 2], pads=[p] * 4,
                      output_padding=[op_, op_])
        elif choice == "pool":
            op = str(r.choice(["MaxPool", "AveragePool"]))
            self._add(op, [x.name], x.c, x.h // 2, x.w // 2, kernel_shape=[2, 2], strides=[2, 2])
        elif choice == "reflect":
            mode = str(r.choice(["reflect", "edge", "constant"]))
            pads = self._const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
            y = self._add("Pad", [x.name, pads], x.c, x.h + 2, x.w + 2, mode=mode)
            self.conv(y, k=3, s=1, pads=[0] * 4, cout=int(r.integers(2, 5)))
        elif choice == "d2s":
            y = self.conv(x, k=1, s=1, pads=[0] * 4, cout=8)
            self._add("DepthToSpace", [y.name], 2, x.h * 2, x.w * 2, blocksize=2, mode=str(r.choice(["DCR", "CRD"])))


def random_local_net(seed: int, *, batch: int = 1, depth: int = 6, size: tuple[int, int] | None = None) -> onnx.ModelProto:
    """A random purely local conv net with one input 'x' and one or two outputs."""
    rng = np.random.default_rng(seed)
    h, w = size or (int(rng.integers(9, 21)), int(rng.integers(9, 21)))
    cin = int(rng.integers(1, 4))
    b = NetBuilder(rng)
    b.tensors.append(_T("x", cin, h, w))
    for _ in range(depth):
        b.random_op()
    outs = [b.tensors[-1]]
    if rng.random() < 0.3 and len(b.tensors) > 2 and b.tensors[-2].name != "x":
        outs.append(b.tensors[-2])
    graph = helper.make_graph(b.nodes, "random_local", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, h, w])],
                              [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, [batch, t.c, t.h, t.w]) for t in outs],
                              initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model
