"""The op tables of the PyTorch reference executor: ``op_type -> op(attrs, inputs) -> outputs``.

Standard ONNX ops live in ``torch_onnx_ops_*`` modules by family; this module assembles them
(:data:`ONNX_OPS`, domain ``""``/``ai.onnx``) and adds sigec's own operators (:data:`SIGEC_OPS`,
domain ``ai.sigec``, semantics in docs/ops.md).
"""

from __future__ import annotations

import torch

from .reference_ops import tile_gather, tile_scatter
from .torch_onnx_ops_common import Inputs, NodeAttrs, OpFn, opt
from .torch_onnx_ops_elementwise import ELEMENTWISE_OPS
from .torch_onnx_ops_nn import NN_OPS
from .torch_onnx_ops_reduce import REDUCE_OPS
from .torch_onnx_ops_resize import RESIZE_OPS
from .torch_onnx_ops_tensor import TENSOR_OPS

SIGEC_DOMAIN = "ai.sigec"
ONNX_DOMAINS = ("", "ai.onnx")


def _pair(attrs: NodeAttrs, name: str, default: list[int] | None = None) -> list[int]:
    """An ``ints[2]`` attribute."""
    value = attrs.ints(name, default)
    if value is None or len(value) != 2:
        raise ValueError(f"attribute {name!r} must be two ints, got {value!r}")
    return value


def sigec_tile_gather(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``ai.sigec::TileGather(base, vals?, grid?, coords, scale?, shift?)`` (docs/ops.md)."""
    return tile_gather(
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
    return tile_scatter(x[0], x[1], x[2])


ONNX_OPS: dict[str, OpFn] = {**ELEMENTWISE_OPS, **TENSOR_OPS, **REDUCE_OPS, **NN_OPS, **RESIZE_OPS}
SIGEC_OPS: dict[str, OpFn] = {"TileGather": sigec_tile_gather, "TileScatter": sigec_tile_scatter}


def lookup_op(domain: str, op_type: str) -> OpFn | None:
    """The implementation of ``domain::op_type``, or ``None`` when there is none."""
    if domain in ONNX_DOMAINS:
        return ONNX_OPS.get(op_type)
    if domain == SIGEC_DOMAIN:
        return SIGEC_OPS.get(op_type)
    return None
