"""The ``ai.sigec`` operator vocabulary: domain, op names and the codes of their string attributes.

The semantics of the ops are in :mod:`sigec.core.reference_ops` (and docs/ops.md). The order of
:data:`ACTIVATIONS` and :data:`PAD_MODES` is an ABI: native and Triton kernels and the TensorRT
attribute encoding use each name's position as its code.
"""

DOMAIN = "ai.sigec"
TILE_GATHER = "TileGather"
TILE_SCATTER = "TileScatter"
OP_TYPES = (TILE_GATHER, TILE_SCATTER)

ACTIVATIONS = ("none", "relu", "leaky_relu", "sigmoid", "tanh", "silu", "hard_sigmoid", "hard_swish", "clip")
PAD_MODES = ("zeros", "edge", "reflect")
