"""Synthetic one-hot segmentation maps for the label-conditioned generators (SPADE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _fill_bands(canvas: torch.Tensor, classes: int, generator: torch.Generator) -> None:
    """Background: 2-4 horizontal bands (sky / buildings / road-like), each one class."""
    h = canvas.shape[0]
    bands = int(torch.randint(2, 5, (1,), generator=generator))
    cuts = sorted(int(c) for c in torch.randint(1, max(h, 2), (bands - 1,), generator=generator))
    edges = [0, *cuts, h]
    for top, bottom in zip(edges[:-1], edges[1:]):
        canvas[top:bottom] = int(torch.randint(0, classes, (1,), generator=generator))


def _draw_shapes(canvas: torch.Tensor, classes: int, generator: torch.Generator) -> None:
    """Foreground: 3-7 random axis-aligned rectangles and ellipses of random classes."""
    h, w = canvas.shape
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    for _ in range(int(torch.randint(3, 8, (1,), generator=generator))):
        cls = int(torch.randint(0, classes, (1,), generator=generator))
        bh = max(1, int(h * (0.1 + 0.3 * float(torch.rand(1, generator=generator)))))
        bw = max(1, int(w * (0.1 + 0.3 * float(torch.rand(1, generator=generator)))))
        top = int(torch.randint(0, max(h - bh, 1), (1,), generator=generator))
        left = int(torch.randint(0, max(w - bw, 1), (1,), generator=generator))
        if float(torch.rand(1, generator=generator)) < 0.5:
            canvas[top : top + bh, left : left + bw] = cls
        else:
            cy, cx = top + bh / 2, left + bw / 2
            inside = ((ys - cy) / (bh / 2)) ** 2 + ((xs - cx) / (bw / 2)) ** 2 <= 1.0
            canvas[inside] = cls


def random_label_map(batch: int, classes: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A plausible piecewise-constant one-hot label map [batch, classes, h, w] (float32).

    Each image has a few horizontal background bands and a few rectangles/ellipses on top, with
    classes drawn uniformly; deterministic for a given seed.
    """
    if classes < 1 or h < 1 or w < 1 or batch < 1:
        raise ValueError(f"bad label map size: batch={batch} classes={classes} h={h} w={w}")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.empty(batch, h, w, dtype=torch.int64)
    for b in range(batch):
        _fill_bands(ids[b], classes, generator)
        _draw_shapes(ids[b], classes, generator)
    return F.one_hot(ids, classes).permute(0, 3, 1, 2).to(torch.float32).contiguous()


def edit_label_map(
    labels: torch.Tensor, box: tuple[int, int, int, int], new_class: int
) -> torch.Tensor:
    """Return a copy of a one-hot map [B, C, H, W] with ``box`` relabelled to ``new_class`` in every image.

    ``box`` is ``(top, left, bottom, right)`` in pixels, bottom/right exclusive, clipped to the map.
    """
    if labels.dim() != 4:
        raise ValueError(f"labels must be [B, C, H, W], got shape {tuple(labels.shape)}")
    if not 0 <= new_class < labels.shape[1]:
        raise ValueError(f"new_class {new_class} outside [0, {labels.shape[1]})")
    top, left, bottom, right = box
    top, left = max(top, 0), max(left, 0)
    edited = labels.clone()
    region = edited[:, :, top:bottom, left:right]
    region.zero_()
    region[:, new_class] = 1.0
    return edited


def label_boundaries(labels: torch.Tensor) -> torch.Tensor:
    """Boundary map [B, 1, H, W] (1 where a 4-neighbour has another class) of a one-hot map.

    Stands in for SPADE's instance edge map (computed there from instance ids).
    """
    ids = labels.argmax(dim=1, keepdim=True)
    edge = torch.zeros_like(ids, dtype=torch.bool)
    dx = ids[..., :, 1:] != ids[..., :, :-1]
    dy = ids[..., 1:, :] != ids[..., :-1, :]
    edge[..., :, 1:] |= dx
    edge[..., :, :-1] |= dx
    edge[..., 1:, :] |= dy
    edge[..., :-1, :] |= dy
    return edge.to(labels.dtype)
