"""The op tables of the PyTorch reference executor: ``op_type -> op(attrs, inputs) -> outputs``.

Standard ONNX ops live in ``torch_onnx_ops_*`` modules by family; this module assembles them
(:data:`ONNX_OPS`, domain ``""``/``ai.onnx``) and adds sigec's own operators (:data:`SIGEC_OPS`,
domain ``ai.sigec``, semantics in docs/ops.md).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

from sigec.core.errors import BackendError

from sigec.core import reference_ops
from sigec.core.ops import DOMAIN
from .torch_onnx_ops_common import Inputs, NodeAttrs, OpFn, opt
from .torch_onnx_ops_elementwise import ELEMENTWISE_OPS
from .torch_onnx_ops_nn import NN_OPS
from .torch_onnx_ops_reduce import REDUCE_OPS
from .torch_onnx_ops_resize import RESIZE_OPS
from .torch_onnx_ops_tensor import TENSOR_OPS

SIGEC_DOMAIN = DOMAIN
ONNX_DOMAINS = ("", "ai.onnx")


def _pair(attrs: NodeAttrs, name: str, default: list[int] | None = None) -> list[int]:
    """An ``ints[2]`` attribute."""
    value = attrs.ints(name, default)
    if value is None or len(value) != 2:
        raise ValueError(f"attribute {name!r} must be two ints, got {value!r}")
    return value


def tile_kernels(tensor: torch.Tensor) -> ModuleType:
    """The module implementing the ``ai.sigec`` ops for ``tensor``: ``triton_ops`` or ``reference_ops``.

    ``SIGEC_TRITON`` unset: Triton for CUDA tensors when it is installed (else the reference, with
    a warning); ``1``: Triton always (CPU tensors need ``TRITON_INTERPRET=1``); ``0``: never.
    """
    choice = os.environ.get("SIGEC_TRITON", "")
    if choice == "0" or (choice != "1" and tensor.device.type != "cuda"):
        return reference_ops
    try:
        from sigec.gpu import triton_ops
    except ImportError as exc:
        if choice == "1":
            raise BackendError(f"SIGEC_TRITON=1 but the Triton kernels cannot be imported: {exc}") from exc
        warnings.warn(f"Triton is not available ({exc}); the ai.sigec ops run with the PyTorch reference",
                      RuntimeWarning, stacklevel=2)
        return reference_ops
    return triton_ops


def sigec_tile_gather(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``ai.sigec::TileGather(base, vals?, grid?, coords, scale?, shift?)`` (docs/ops.md)."""
    return tile_kernels(x[0]).tile_gather(
        x[0],
        opt(x, 1),
        opt(x, 2),
        x[3],
        opt(x, 4),
        opt(x, 5),
        window=_pair(attrs, "window"),
        step=_pair(attrs, "step"),
        offset=_pair(attrs, "offset", [0, 0]),
        upsample=int(attrs.get("upsample", 1)),
        pad_mode=attrs.get("pad_mode", "zeros"),
        activation=attrs.get("activation", "none"),
        alpha=float(attrs.get("alpha", 0.0)),
        beta=float(attrs.get("beta", 0.0)),
    )


def sigec_tile_scatter(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``ai.sigec::TileScatter(base, vals, coords)`` (docs/ops.md)."""
    return tile_kernels(x[0]).tile_scatter(x[0], x[1], x[2])


ONNX_OPS: dict[str, OpFn] = {**ELEMENTWISE_OPS, **TENSOR_OPS, **REDUCE_OPS, **NN_OPS, **RESIZE_OPS}
SIGEC_OPS: dict[str, OpFn] = {"TileGather": sigec_tile_gather, "TileScatter": sigec_tile_scatter}


def lookup_op(domain: str, op_type: str) -> OpFn | None:
    """The implementation of ``domain::op_type``, or ``None`` when there is none."""
    if domain in ONNX_DOMAINS:
        return ONNX_OPS.get(op_type)
    if domain == SIGEC_DOMAIN:
        return SIGEC_OPS.get(op_type)
    return None
