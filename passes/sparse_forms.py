"""How a tensor of the original model is represented inside the SPARSE graph.

Forms refer to SPARSE-graph values (``ir.Value``); ``Sparse.source`` is the name of the original
tensor, whose cached value the FULL graph produces. Masks are named by :class:`MaskId`.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from sigec.passes.token_layout import TokenLayout


@dataclass(frozen=True, order=True)
class MaskId:
    """A mask of the mask program (sigec/core/mask_program.py), by its id there.

    Two ids are predefined: :data:`PIXEL_MASK` (the edit's pixel mask, the program's source) and
    :data:`EMPTY_MASK` (nowhere: constant and static tensors; never written to the manifest, an
    ``empty`` instruction stands for it there). Where a mask is ``None`` the region is unknown: the
    tensor may differ from the original anywhere (outputs of dense islands).
    """

    id: str


PIXEL_MASK = MaskId("input")
EMPTY_MASK = MaskId("empty")


@dataclass(frozen=True)
class Resolution:
    """One tile grid: every sparse tensor of size ``height x width`` shares it."""

    height: int
    width: int
    tile: int

    @property
    def name(self) -> str:
        """Stable name used for the tile index inputs, e.g. ``r64x64``."""
        return f"r{self.height}x{self.width}"

    @property
    def size(self) -> list[int]:
        """``[height, width]``."""
        return [self.height, self.width]

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Number of tile rows and columns."""
        return (-(-self.height // self.tile), -(-self.width // self.tile))


@dataclass(frozen=True)
class Prologue:
    """A per-channel affine transform followed by an activation (fused into TileGather)."""

    scale: ir.Value | None = None
    shift: ir.Value | None = None
    activation: str = "none"
    alpha: float = 0.0
    beta: float = 0.0

    @property
    def has_affine(self) -> bool:
        """True when a scale or shift is applied."""
        return self.scale is not None or self.shift is not None


@dataclass(frozen=True)
class Sparse:
    """Form S: the cached original map ``source`` plus recomputed tiles ``vals`` on ``res``.

    ``view`` says that the value equals ``prologue(upsample_nearest(other, factor))`` of another
    form, so that a consumer's gather can read ``other`` directly (fusion).
    """

    source: str
    vals: ir.Value
    res: Resolution
    mask: MaskId | None = None
    view: View | None = None


@dataclass(frozen=True)
class Tokens:
    """Form T: a view of a tile grid's pixels as tokens (``[B, H*W, C]``, attention heads, ...).

    ``vals [M, *features]`` holds the active tokens (the pixels of the active tiles of ``res``, tile
    by tile, row-major inside a tile); ``layout`` says how the original tensor ``source`` arranges
    batch, pixels and features (passes/token_layout.py). Its cache is that original tensor.
    """

    source: str
    vals: ir.Value
    res: Resolution
    mask: MaskId | None
    layout: TokenLayout
    items: ir.Value | None = None  # the same tokens as [B, *heads, M/B, n] (batched attention's layout)


@dataclass(frozen=True)
class Dense:
    """Form D: a full tensor available in the SPARSE graph as ``value``.

    ``mask`` is the region where it may differ from the original (:data:`PIXEL_MASK` for model
    inputs, :data:`EMPTY_MASK` for static or constant tensors); ``None`` means anywhere (outputs
    of dense islands), so taking only its active tiles is an approximation.
    """

    value: ir.Value
    mask: MaskId | None


@dataclass(frozen=True)
class Padded:
    """A Pad node's output, kept virtual so the next Conv or pool folds it into its gather."""

    inner: Sparse | Dense
    pads: tuple[int, int, int, int]
    mode: str
    node_name: str


@dataclass(frozen=True)
class View:
    """``prologue(upsample_nearest(inner, factor))`` (see :class:`Sparse`)."""

    inner: Sparse | Dense
    prologue: Prologue | None = None
    upsample: int = 1


Form = Sparse | Dense | Padded | Tokens


@dataclass(frozen=True)
class GatherSource:
    """A form with its views and virtual Pad resolved: a TileGather reads ``prologue(upsample(form))``,
    padded by ``pads`` in ``pad_mode`` (``RewriteContext.gather_source``)."""

    form: Sparse | Dense
    prologue: Prologue | None = None
    upsample: int = 1
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    pad_mode: str = "zeros"
