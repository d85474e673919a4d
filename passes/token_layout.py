"""How a tensor of the original model lays out the tokens of a tile grid (pure shape algebra, no graph).

A spatial map ``[B, C, H, W]`` seen through Reshape/Transpose views becomes tensors like
``[B, H*W, C]`` (tokens), ``[B, heads, H*W, d]`` (attention heads) or ``[B, C, H*W]``. Each axis of
such a tensor is a product of *atoms*: ``b`` (batch), ``y`` and ``x`` (the map's rows and columns)
and feature atoms (channels, heads, head dims). sigec keeps only the active tokens, as
``vals [M, *features]``: row ``m`` is one pixel (b, y, x) of an active tile (tile by tile, row-major
inside a tile), the trailing axes are the feature atoms in :attr:`TokenLayout.features` order.
A view op changes the layout and at most reshapes ``vals`` (never a data movement on the tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod

SPATIAL = ("b", "y", "x")


class LayoutError(ValueError):
    """The op does not keep tokens and features apart (e.g. it mixes pixels with channels)."""


@dataclass(frozen=True)
class TokenLayout:
    """The atoms of every axis of an original tensor and the order of the feature atoms in ``vals``.

    ``axes[i]`` lists the atoms of axis ``i`` (outermost first; empty for a size-1 axis);
    ``features`` the feature atoms as ``vals`` stores them after its token axis; ``sizes`` every
    atom's size.
    """

    axes: tuple[tuple[str, ...], ...]
    features: tuple[str, ...]
    sizes: tuple[tuple[str, int], ...]

    @staticmethod
    def of_map(batch: int, channels: int, height: int, width: int) -> TokenLayout:
        """The layout of a map ``[B, C, H, W]``."""
        return TokenLayout((("b",), ("c",), ("y",), ("x",)), ("c",),
                           (("b", batch), ("c", channels), ("y", height), ("x", width)))

    def size(self, atom: str) -> int:
        """The size of one atom."""
        return dict(self.sizes)[atom]

    @property
    def shape(self) -> tuple[int, ...]:
        """The original tensor's shape."""
        return tuple(prod(self.size(a) for a in axis) for axis in self.axes)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """``vals``' shape after its token axis."""
        return tuple(self.size(a) for a in self.features)

    def is_map(self) -> bool:
        """True for ``[B, C, H, W]`` with one channel atom (tiles can be cut from it again)."""
        return (len(self.axes) == 4 and self.axes[0] == ("b",) and self.axes[2] == ("y",) and self.axes[3] == ("x",)
                and len(self.axes[1]) == 1 and self.axes[1] == self.features)

    def fresh(self) -> str:
        """A feature atom name the layout does not use yet."""
        return _Fresh(self).new()

    # ----- views ---------------------------------------------------------------------------------
    def transpose(self, perm: tuple[int, ...]) -> TokenLayout:
        """The layout after ``Transpose(perm)`` (``vals`` unchanged)."""
        if sorted(perm) != list(range(len(self.axes))):
            raise LayoutError(f"perm {list(perm)} is not a permutation of {len(self.axes)} axes")
        return replace(self, axes=tuple(self.axes[p] for p in perm))

    def reshape(self, shape: tuple[int, ...]) -> TokenLayout:
        """The layout after a Reshape (or Flatten/Squeeze/Unsqueeze) to ``shape``.

        Adjacent atoms merge into one axis and a feature atom may split into several. Allowed
        merges: ``y, x`` (optionally after ``b``), features that are adjacent in ``vals`` too, and
        ``b`` with one feature (batch-folded heads). Anything else raises LayoutError.
        """
        sizes = dict(self.sizes)
        flat = [a for a in self.atom_order() if sizes[a] != 1 or a in SPATIAL]  # size-1 features vanish
        features = [f for f in self.features if sizes[f] != 1]
        fresh = _Fresh(self)
        groups: list[list[str]] = []
        i = 0
        for d in shape:
            group: list[str] = []
            while i < len(flat) and sizes[flat[i]] == 1:  # a batch (or row) of one
                group.append(flat[i])
                i += 1
            left = int(d)
            while left > 1:
                if i >= len(flat):
                    raise LayoutError(f"reshape of {list(self.shape)} to {list(shape)} is not a view")
                atom, n = flat[i], sizes[flat[i]]
                if left % n == 0:
                    group.append(atom)
                    left //= n
                elif n % left == 0 and atom not in SPATIAL:
                    outer, inner = fresh.new(), fresh.new()
                    sizes[outer], sizes[inner] = left, n // left
                    k = features.index(atom)
                    features[k:k + 1] = [outer, inner]
                    flat[i:i + 1] = [outer, inner]
                    group.append(outer)
                    left = 1
                else:
                    raise LayoutError(f"reshape to {list(shape)} splits atom {atom} ({n}) across axes")
                i += 1
            groups.append(group)
        if i < len(flat):
            raise LayoutError(f"reshape to {list(shape)} leaves atoms {flat[i:]} unplaced")
        axes = []
        for group in groups:
            axes.append(_checked_axis(group, features, sizes, fresh))
        used = {a for axis in axes for a in axis}
        return TokenLayout(tuple(axes), tuple(features), tuple((a, n) for a, n in sizes.items() if a in used))

    def with_feature(self, atom: str, size: int) -> TokenLayout:
        """The same layout with feature ``atom`` resized (a Split, Slice, reduction or MatMul output)."""
        return replace(self, sizes=tuple((a, size if a == atom else n) for a, n in self.sizes))

    def atom_order(self) -> list[str]:
        """Atoms in the original tensor's memory order (size-1 axes contribute none)."""
        return [a for axis in self.axes for a in axis]

    def canonical_order(self) -> list[str]:
        """``b, y, x`` then the features in ``vals`` order: rows of the canonical ``[B*H*W, F]`` tensor."""
        return [*SPATIAL, *self.features]

    def to_canonical_perm(self) -> list[int]:
        """The Transpose taking the atom-shaped original tensor to canonical atom order."""
        order = self.atom_order()
        return [order.index(a) for a in self.canonical_order()]


class _Fresh:
    """Fresh feature atom names for one reshape."""

    def __init__(self, layout: TokenLayout) -> None:
        self.used = {a for a, _ in layout.sizes}

    def new(self) -> str:
        i = 0
        while f"f{i}" in self.used:
            i += 1
        self.used.add(f"f{i}")
        return f"f{i}"


def _checked_axis(group: list[str], features: list[str], sizes: dict[str, int], fresh: _Fresh) -> tuple[str, ...]:
    """One output axis's atoms, checked; adjacent features merge into one new atom (``features`` updated)."""
    spatial = [a for a in group if a in SPATIAL]
    feats = [a for a in group if a not in SPATIAL]
    if spatial and spatial not in (["b"], ["y"], ["x"], ["y", "x"], ["b", "y", "x"]):
        raise LayoutError(f"an axis of atoms {group} does not keep the pixels in row-major order")
    if spatial and feats and (spatial != ["b"] or group[0] != "b" or len(feats) > 1):
        raise LayoutError(f"an axis mixes pixels and features ({group})")
    if len(feats) < 2 or spatial:
        return tuple(group)
    k = features.index(feats[0])
    if features[k:k + len(feats)] != feats:
        raise LayoutError(f"features {feats} are merged but not adjacent in the stored order {features}")
    merged = fresh.new()
    sizes[merged] = prod(sizes[a] for a in feats)
    features[k:k + len(feats)] = [merged]
    return (merged,)
