"""Shared pieces of the ONNX op implementations used by the PyTorch reference executor.

Every op is a function ``op(attrs, inputs) -> outputs``: ``attrs`` is a :class:`NodeAttrs` (the
node's decoded attributes plus its opset version and declared output count), ``inputs`` the list
of input tensors with ``None`` for absent optional inputs, and the result one tensor or a tuple
of tensors (extra trailing outputs the node does not declare are ignored by the executor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from onnx import TensorProto

OpResult = Union[torch.Tensor, Sequence[torch.Tensor]]
Inputs = Sequence[Union[torch.Tensor, None]]


@dataclass(frozen=True)
class NodeAttrs:
    """Decoded attributes of one node, with the context some ops need.

    ``values`` maps attribute names to Python values (ints, floats, str, lists, torch tensors);
    ``opset`` is the version of the node's domain in the model; ``num_outputs`` the number of
    outputs the node declares; ``device`` the device new tensors are created on.
    """

    values: Mapping[str, Any] = field(default_factory=dict)
    opset: int = 23
    num_outputs: int = 1
    device: torch.device = torch.device("cpu")

    def get(self, name: str, default: Any = None) -> Any:
        """Return an attribute or ``default`` when the node does not set it."""
        return self.values.get(name, default)

    def __getitem__(self, name: str) -> Any:
        if name not in self.values:
            raise KeyError(f"required attribute {name!r} is missing")
        return self.values[name]

    def __contains__(self, name: object) -> bool:
        return name in self.values

    def ints(self, name: str, default: Sequence[int] | None = None) -> list[int] | None:
        """Return an ints attribute as a list of Python ints (or ``default``)."""
        value = self.values.get(name)
        if value is None:
            return None if default is None else list(default)
        return [int(v) for v in value]


OpFn = Callable[[NodeAttrs, Inputs], OpResult]

_ONNX_TO_TORCH = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT8: torch.uint8,
    TensorProto.UINT16: torch.uint16,
    TensorProto.UINT32: torch.uint32,
    TensorProto.UINT64: torch.uint64,
    TensorProto.BOOL: torch.bool,
}


def torch_dtype(onnx_type: int) -> torch.dtype:
    """Map an ONNX ``TensorProto`` element type to the torch dtype."""
    if onnx_type not in _ONNX_TO_TORCH:
        raise ValueError(f"ONNX element type {TensorProto.DataType.Name(onnx_type)} is not supported")
    return _ONNX_TO_TORCH[onnx_type]


def onnx_dtype(dtype: torch.dtype) -> int:
    """Map a torch dtype back to the ONNX ``TensorProto`` element type."""
    for onnx_type, torch_type in _ONNX_TO_TORCH.items():
        if torch_type == dtype:
            return onnx_type
    raise ValueError(f"torch dtype {dtype} has no ONNX equivalent")


def opt(inputs: Inputs, index: int) -> torch.Tensor | None:
    """The optional input at ``index``: ``None`` when absent or not given."""
    return inputs[index] if index < len(inputs) else None


def present(t: torch.Tensor | None) -> bool:
    """Whether an optional input is given and non-empty (empty tensors mean 'absent' for some ops)."""
    return t is not None and t.numel() > 0


def to_ints(t: torch.Tensor) -> list[int]:
    """A 0-D or 1-D integer tensor as a list of Python ints."""
    return [int(v) for v in t.reshape(-1).tolist()]


def normalize_axis(axis: int, rank: int) -> int:
    """Turn a possibly negative axis into ``[0, rank)``."""
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def torch_pad_list(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """Per-axis (begin, end) pads of the trailing axes in ``torch.nn.functional.pad`` order."""
    out: list[int] = []
    for b, e in zip(reversed(list(begins)), reversed(list(ends))):
        out += [int(b), int(e)]
    return out


def resolve_pads(
    attrs: NodeAttrs,
    in_sizes: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> tuple[list[int], list[int]]:
    """Begin and end pads of a Conv/pool node from ``pads`` or ``auto_pad`` (SAME_*, VALID)."""
    n = len(in_sizes)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small = total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else total - small)
            ends.append(total - begins[-1])
        return begins, ends
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    pads = attrs.ints("pads", [0] * (2 * n))
    return pads[:n], pads[n:]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Float32 for half-precision inputs (ONNX ``stash_type`` 1), the input dtype otherwise."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
