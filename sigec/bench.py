"""Side-by-side timing of sparse and dense runs of one engine (``sigec bench`` and tools/bench.py)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sigec.runtime.engine import Engine


@dataclass
class BenchRow:
    """One edit size: medians of alternating dense and sparse runs."""

    edit: float
    dense_ms: float
    sparse_ms: float
    mac_reduction: float
    rel_l2: float
    psnr: float
    path: str
    active_fraction: dict[str, float]

    @property
    def speedup(self) -> float:
        """Dense time over sparse time."""
        return self.dense_ms / self.sparse_ms

    @property
    def efficiency(self) -> float:
        """Measured speedup over MAC reduction."""
        return self.speedup / self.mac_reduction


def square_mask(height: int, width: int, fraction: float) -> np.ndarray:
    """A centred square (clipped to the image) covering about ``fraction`` of the pixels."""
    mask = np.zeros((height, width), bool)
    if fraction <= 0:
        return mask
    side = int(round(np.sqrt(fraction * height * width)))
    side_h, side_w = min(side, height), min(side, width)
    if side_h * side_w < fraction * height * width and side_h == height:
        side_w = min(width, int(np.ceil(fraction * height * width / height)))
    y0, x0 = (height - side_h) // 2, (width - side_w) // 2
    mask[y0:y0 + side_h, x0:x0 + side_w] = True
    return mask


def edit_inputs(original: Mapping[str, np.ndarray], spatial: Sequence[str], mask: np.ndarray,
                seed: int = 1) -> dict[str, np.ndarray]:
    """The original inputs with random noise added inside ``mask`` on every spatial input."""
    rng = np.random.default_rng(seed)
    edited = {k: v.copy() for k, v in original.items()}
    for name in spatial:
        x = edited[name]
        noise = rng.standard_normal(x.shape).astype(x.dtype) * 0.5
        edited[name] = x + noise * mask[None, None]
    return edited


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure(engine: Engine, original: Mapping[str, np.ndarray], edits: Sequence[float], *, repeats: int = 3,
            progress: bool = True, make_edit: Callable[[np.ndarray], Mapping[str, np.ndarray]] | None = None,
            key: Any = None) -> list[BenchRow]:
    """Prime once, then for every edit size time dense and sparse runs alternately (after a warm-up)."""
    spatial = [i["name"] for i in engine.manifest["inputs"] if i["spatial"]]
    h, w = engine.manifest["mask_program"]["input_size"]
    engine.prime(original, key=key)
    rows = []
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("benchmark", total=len(edits) * (repeats + 1))
        for edit in edits:
            mask = square_mask(h, w, edit)
            edited = make_edit(mask) if make_edit else edit_inputs(original, spatial, mask)
            dense_out = engine.run_dense(edited)
            sparse_out = engine.run(edited, mask=mask, key=key)  # warm-up
            bar.advance(task)
            dense_t, sparse_t = [], []
            for _ in range(repeats):
                dense_t.append(_time(lambda: engine.run_dense(edited)))
                sparse_t.append(_time(lambda: engine.run(edited, mask=mask, key=key)))
                bar.advance(task)
            stats = engine.stats
            ref = dense_out[0]
            err = float(np.linalg.norm(sparse_out[0] - ref) / (np.linalg.norm(ref) + 1e-12))
            mse = float(np.mean((sparse_out[0].astype(np.float64) - ref) ** 2))
            psnr = float("inf") if mse == 0 else float(10 * np.log10(4.0 / mse))  # outputs in [-1, 1]
            _, executed, tiles = engine.expected_macs(mask)
            dense_macs = engine._dense_macs()
            rows.append(BenchRow(edit=edit, dense_ms=statistics.median(dense_t), sparse_ms=statistics.median(sparse_t),
                                 mac_reduction=dense_macs / max(executed, 1), rel_l2=err, psnr=psnr, path=stats.path,
                                 active_fraction={k: t.fraction for k, t in tiles.items()}))
    return rows


def markdown_table(rows: Sequence[BenchRow]) -> str:
    """Rows as a markdown table."""
    lines = ["| edit | dense ORT ms | sigec ms | speedup | MAC reduction | efficiency | rel. L2 error | PSNR dB | path |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.edit * 100:.1f}% | {r.dense_ms:.1f} | {r.sparse_ms:.1f} | {r.speedup:.2f}x | "
                     f"{r.mac_reduction:.2f}x | {r.efficiency:.2f} | {r.rel_l2:.2e} | {r.psnr:.1f} | {r.path} |")
    return "\n".join(lines)


def bench_engine(path: str, *, edits: Sequence[float], repeats: int = 3, threads: int = 2,
                 backend: str | None = None) -> list[BenchRow]:
    """``sigec bench ENGINE``: random original inputs, square noise edits, printed table."""
    import sigec

    engine = sigec.load(path, backend=backend, threads=threads)
    rng = np.random.default_rng(0)
    original = {}
    for spec in engine.manifest["inputs"]:
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            original[spec["name"]] = rng.standard_normal(spec["shape"]).astype(dtype)
        else:
            original[spec["name"]] = rng.integers(0, 10, spec["shape"]).astype(dtype)
    rows = measure(engine, original, edits, repeats=repeats)
    print(markdown_table(rows))
    return rows
