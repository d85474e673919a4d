"""Side-by-side timing of sparse and dense runs of one engine (``sigec bench`` and tools/bench.py)."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sigec.inspection import plural
from sigec.runtime.backends import session_options
from sigec.runtime.engine import DEFAULT_KEY, Engine
from sigec.runtime.synthetic_edits import edit_inputs, random_inputs, square_mask

DenseRun = Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray]]
"""A dense run of the model: inputs by name -> outputs (default: ``engine.run_dense``)."""

EMPTY_EDIT_BUDGET = 0.02
"""A sparse run with an empty edit may cost at most this fraction of a dense run."""


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


def machine() -> str:
    """'<arch> <CPU model>, <n> cores' for benchmark headers."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cores"


def onnx_dense_run(path: str | os.PathLike, threads: int, input_names: Sequence[str], *,
                   spinning: bool = False) -> DenseRun:
    """A dense run of the ONNX file ``path`` (e.g. from tools/dense_baseline.py --save-fastest) in ONNX Runtime.

    Graph inputs are matched to ``input_names`` (the engine's) by name, else by position.
    """
    import onnxruntime as ort

    from sigec.core.errors import InputError

    try:
        session = ort.InferenceSession(os.fspath(path), session_options(threads, spinning=spinning),
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(f"dense baseline '{path}': ONNX Runtime cannot load it: {exc}") from exc
    graph_inputs = [i.name for i in session.get_inputs()]
    if set(graph_inputs) <= set(input_names):
        rename = {n: n for n in graph_inputs}
    elif len(graph_inputs) == len(input_names):
        rename = dict(zip(input_names, graph_inputs))
    else:
        raise InputError(f"dense baseline '{path}' has inputs {graph_inputs}, which do not match the engine's "
                         f"inputs {list(input_names)}")

    def run(inputs: Mapping[str, np.ndarray]) -> Sequence[np.ndarray]:
        return session.run(None, {rename[k]: v for k, v in inputs.items() if k in rename})

    return run


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure(engine: Engine, original: Mapping[str, np.ndarray], edits: Sequence[float], *, repeats: int = 3,
            progress: bool = True, make_edit: Callable[[np.ndarray], Mapping[str, np.ndarray]] | None = None,
            key: Any = None, dense: DenseRun | None = None,
            on_row: Callable[[BenchRow], None] | None = None) -> list[BenchRow]:
    """Prime once, then for every edit size time dense and sparse runs alternately (after a warm-up).

    ``dense`` replaces ``engine.run_dense`` as the dense baseline (e.g. the fastest exported graph
    found by tools/dense_baseline.py); errors are measured against its output. ``on_row`` is
    called with each row as soon as it is measured.
    """
    spatial = [i["name"] for i in engine.manifest["inputs"] if i["spatial"]]
    h, w = engine.manifest["mask_program"]["input_size"]
    run_dense = dense or engine.run_dense
    engine.prime(original, key=key)
    rows = []
    from rich.console import Console
    from rich.progress import Progress

    # the bar goes to stderr, beside the progress lines, so that stdout holds only results
    with Progress(disable=not progress, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("benchmark", total=len(edits) * (repeats + 1))
        for edit in edits:
            mask = square_mask(h, w, edit)
            edited = make_edit(mask) if make_edit else edit_inputs(original, spatial, mask)
            dense_out = run_dense(edited)
            sparse_out = engine.run(edited, mask=mask, key=key)  # warm-up
            bar.advance(task)
            dense_t, sparse_t = [], []
            for _ in range(repeats):
                dense_t.append(_time(lambda: run_dense(edited)))
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
            if on_row is not None:
                on_row(rows[-1])
    return rows


@dataclass
class EmptyEdit:
    """The empty-edit figure: ``engine.run(original, mask=all False)`` against a dense run."""

    empty_ms: float
    dense_ms: float
    path: str

    @property
    def fraction(self) -> float:
        """Empty-edit time over dense time."""
        return self.empty_ms / self.dense_ms

    @property
    def within_budget(self) -> bool:
        """Whether the empty edit costs at most ``EMPTY_EDIT_BUDGET`` of a dense run."""
        return self.fraction <= EMPTY_EDIT_BUDGET

    def line(self) -> str:
        """One markdown line: 'Empty edit: X ms = Y% of dense ...'."""
        verdict = "within" if self.within_budget else "OVER"
        return (f"Empty edit (`engine.run(original, mask=all False)`, path {self.path}): {self.empty_ms:.3f} ms "
                f"= {self.fraction * 100:.3f}% of dense ({self.dense_ms:.1f} ms); {verdict} the "
                f"{EMPTY_EDIT_BUDGET * 100:.0f}% budget.")


def measure_empty_edit(engine: Engine, original: Mapping[str, np.ndarray], *, repeats: int = 3, inner: int = 10,
                       key: Any = None, dense: DenseRun | None = None) -> EmptyEdit:
    """Time a run of the original inputs with an all-False mask against dense runs, alternately.

    Primes ``key`` if it is not primed yet. Each sample of the empty run is the mean of ``inner``
    calls (one takes well under a millisecond); the figures are medians of ``repeats`` samples.
    """
    run_dense = dense or engine.run_dense
    if (DEFAULT_KEY if key is None else key) not in engine.cache_keys():
        engine.prime(original, key=key)
    h, w = engine.manifest["mask_program"]["input_size"]
    mask = np.zeros((h, w), bool)

    def empty_runs() -> None:
        for _ in range(inner):
            engine.run(original, mask=mask, key=key)

    run_dense(original)
    empty_runs()  # warm-up
    path = engine.stats.path
    dense_t, empty_t = [], []
    for _ in range(max(repeats, 1)):
        dense_t.append(_time(lambda: run_dense(original)))
        empty_t.append(_time(empty_runs) / inner)
    return EmptyEdit(empty_ms=statistics.median(empty_t), dense_ms=statistics.median(dense_t), path=path)


def markdown_table(rows: Sequence[BenchRow]) -> str:
    """Rows as a markdown table."""
    lines = ["| edit | dense ORT ms | sigec ms | speedup | MAC reduction | efficiency | rel. L2 error | PSNR dB | path |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.edit * 100:.1f}% | {r.dense_ms:.1f} | {r.sparse_ms:.1f} | {r.speedup:.2f}x | "
                     f"{r.mac_reduction:.2f}x | {r.efficiency:.2f} | {r.rel_l2:.2e} | {r.psnr:.1f} | {r.path} |")
    return "\n".join(lines)


def _progress(message: str) -> None:
    # stderr, flushed: visible while the benchmark runs, also when the output goes to a file or a pipe
    print(message, file=sys.stderr, flush=True)


def _row_line(row: BenchRow, done: int, total: int) -> str:
    return (f"[{done}/{total}] edit {row.edit * 100:.1f}%: dense {row.dense_ms:.1f} ms, sparse {row.sparse_ms:.1f} ms "
            f"({row.speedup:.2f}x, path {row.path})")


def bench_engine(path: str, *, edits: Sequence[float], repeats: int = 3, threads: int = 2,
                 backend: str | None = None) -> list[BenchRow]:
    """``sigec bench ENGINE``: random original inputs, square noise edits, printed table and empty-edit line.

    Progress (one line per measured edit) goes to stderr as it happens; the table goes to stdout.
    """
    import sigec

    engine = sigec.load(path, backend=backend, threads=threads)
    original = random_inputs(engine.manifest)
    _progress(f"bench {path}: {plural(len(edits), 'edit size')}, {plural(repeats, 'timed run')} each, "
              f"{plural(threads, 'thread')}")
    done = 0

    def report(row: BenchRow) -> None:
        nonlocal done
        done += 1
        _progress(_row_line(row, done, len(edits)))

    rows = measure(engine, original, edits, repeats=repeats, progress=sys.stderr.isatty(), on_row=report)
    _progress("measuring the empty edit")
    print(markdown_table(rows))
    print()
    print(measure_empty_edit(engine, original, repeats=repeats).line())
    return rows
