"""Builds the mask program (see ``sigec/core/mask_program.py``) while the graph is rewritten."""

from __future__ import annotations

import json
from typing import Any, Sequence

from sigec.passes.sparse_forms import EMPTY_MASK, PIXEL_MASK, MaskId


class MaskProgramBuilder:
    """Emits deduplicated mask instructions; in approx mode per-tensor masks are not tracked.

    Every method takes and returns :class:`MaskId` (``None``: unknown, the tensor may differ
    anywhere; :data:`EMPTY_MASK`: nowhere). Instruction outputs are ``m0``, ``m1``, ...
    """

    def __init__(self, track: bool, input_size: Sequence[int]) -> None:
        self.track = track
        self.input_size = list(input_size)
        self.instructions: list[dict[str, Any]] = []
        self._by_key: dict[str, MaskId] = {}
        self._sizes: dict[str, list[int]] = {PIXEL_MASK.id: list(input_size)}

    def _emit(self, op: str, **fields: Any) -> MaskId:
        """Append an instruction (fields are JSON data: mask ids as strings) unless an equal one exists."""
        key = json.dumps({"op": op, **fields}, sort_keys=True)
        if key in self._by_key:
            return self._by_key[key]
        out = f"m{len(self.instructions)}"
        self.instructions.append({"op": op, "out": out, **fields})
        self._by_key[key] = MaskId(out)
        if "size" in fields:
            self._sizes[out] = list(fields["size"])
        elif "src" in fields:
            self._sizes[out] = self._sizes[fields["src"]]
        elif "srcs" in fields:
            self._sizes[out] = self._sizes[fields["srcs"][0]]
        return MaskId(out)

    def empty(self, size: Sequence[int]) -> MaskId:
        """An all-false mask of the given size."""
        return self._emit("empty", size=list(size))

    def window(self, src: MaskId | None, in_size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
               pads: Sequence[int], dilation: Sequence[int], size: Sequence[int]) -> MaskId | None:
        """Receptive-field propagation through a sliding-window op."""
        if not self.track or src is None:
            return None
        if src == EMPTY_MASK:
            return EMPTY_MASK
        return self._emit("window", src=src.id, kernel=list(kernel), stride=list(stride), pads=list(pads),
                          dilation=list(dilation), size=list(size))

    def transpose_window(self, src: MaskId | None, kernel: Sequence[int], stride: Sequence[int],
                         pads: Sequence[int], size: Sequence[int]) -> MaskId | None:
        """Receptive-field propagation through a transposed convolution."""
        if not self.track or src is None:
            return None
        if src == EMPTY_MASK:
            return EMPTY_MASK
        return self._emit("transpose_window", src=src.id, kernel=list(kernel), stride=list(stride),
                          pads=list(pads), size=list(size))

    def upsample(self, src: MaskId | None, factor: Sequence[int], size: Sequence[int],
                 halo: int = 0) -> MaskId | None:
        """Nearest upsampling (after dilating by ``halo`` source pixels, for bilinear)."""
        if not self.track or src is None:
            return None
        if src == EMPTY_MASK:
            return EMPTY_MASK
        if halo:
            src = self._emit("dilate", src=src.id, radius=int(halo))
        return self._emit("upsample", src=src.id, factor=list(factor), size=list(size))

    def union(self, srcs: Sequence[MaskId | None]) -> MaskId | None:
        """Logical or; ``None`` (unknown) wins, empty masks drop out."""
        if not self.track or any(s is None for s in srcs):
            return None
        live = sorted({s for s in srcs if s != EMPTY_MASK})  # type: ignore[type-var]
        if not live:
            return EMPTY_MASK
        if len(live) == 1:
            return live[0]
        return self._emit("union", srcs=[s.id for s in live])

    def resolution_mask(self, size: Sequence[int], tensor_masks: Sequence[MaskId | None], dilation: int) -> MaskId:
        """The mask whose cells become the tiles of one resolution.

        Exact mode: the union of the masks of every sparse tensor of that size. Approx mode
        (SIGE-compatible): the pixel mask resampled to the size and dilated by ``dilation``.
        """
        if self.track:
            merged = self.union(list(tensor_masks))
            if merged is None:
                raise ValueError("exact mode lost track of a mask")
            return self.empty(size) if merged == EMPTY_MASK else merged
        src = PIXEL_MASK
        if list(size) != self.input_size:
            src = self._emit("resample", src=src.id, size=list(size))
        if dilation:
            src = self._emit("dilate", src=src.id, radius=int(dilation))
        return src

    def program(self, threshold: float, dilation: int) -> dict[str, Any]:
        """The JSON mask program for the manifest."""
        return {"input_size": self.input_size, "threshold": float(threshold), "dilation": int(dilation),
                "instructions": self.instructions}
