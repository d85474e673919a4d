"""The fastest dense ONNX Runtime graph of a zoo model (a weak dense baseline would inflate every ratio).

Usage: python tools/dense_baseline.py [--model ddpm_unet] [--small] [--opsets 17-23] [--torchscript-opsets 17-20]
       [--exporters dynamo,torchscript,sigec] [--engine ENGINE] [--spinning off|on] [--repeats 5]
       [--threads 2] [--json PATH] [--save-fastest PATH]

Variants: the module exported by the dynamo exporter (``torch.onnx.export(dynamo=True)``) and by the
TorchScript exporter (``dynamo=False``) at every requested opset, and sigec's canonical DENSE graph
(the one inside a compiled engine, with the engine's weights embedded as initializers). Every
variant runs in its own ONNX Runtime session with all graph optimisations on, ``--threads``
intra-op threads, one inter-op thread and intra-op spin-waiting per ``--spinning`` (off by
default: ORT's spinning workers slow the other sessions and PyTorch in the same process, which
would make the round-robin unfair; on a 2-core machine they slowed even a lone small session
2-3x), on the model's example inputs; dense PyTorch
(``torch.inference_mode``, same threads) runs beside them. After one warm-up each, ``--repeats``
rounds run every variant once, round-robin (the starting variant rotates), so machine drift hits
all variants alike; the table gives medians. Every variant's output is checked against PyTorch's
(relative L2 <= ``--tolerance``); a variant that fails the check is never chosen as the fastest.
An export that fails, or that silently produces another opset than requested, is listed with the
first line of its error.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import sigec
from sigec.apps.bench import machine
from sigec.runtime.backends import session_options
from sigec.core.engine_file import read_engine
from sigec.core.errors import CompileError, SigecError
from sigec.frontends.torch_frontend import _quiet, _summarize
from sigec.apps.zoo import build

EXPORTERS = ("dynamo", "torchscript", "sigec")


@dataclass
class Variant:
    """One way of running the dense model, with its timings."""

    name: str
    exporter: str  # "dynamo", "torchscript", "sigec" or "pytorch"
    opset: int | None
    nodes: int | None
    run: Callable[[], list[np.ndarray]] = field(repr=False)
    save: Callable[[pathlib.Path], None] | None = field(default=None, repr=False)
    close: Callable[[], None] | None = field(default=None, repr=False)
    times_ms: list[float] = field(default_factory=list)
    rel_l2: float = math.nan
    ratio_to_reference: float | None = None  # grouped timing: median / the reference's median in its group
    reference_ms: float | None = None  # grouped timing: the reference's median over all groups

    @property
    def median_ms(self) -> float:
        """Median of the timed runs; with grouped timing, the ratio to the reference (measured in the
        variant's own group) times the reference's overall median, so that groups compare."""
        if self.ratio_to_reference is not None and self.reference_ms is not None:
            return self.ratio_to_reference * self.reference_ms
        return statistics.median(self.times_ms)


@dataclass
class Failure:
    """An exporter/opset pair that gave no usable model."""

    exporter: str
    opset: int
    error: str


def parse_opsets(text: str) -> list[int]:
    """'17-23', '18' or '17,19,21' -> sorted opsets."""
    opsets: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                opsets.update(range(lo, hi + 1))
            else:
                opsets.add(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad opset list {text!r}: expected e.g. 17-23 or 18,20") from None
    if not opsets:
        raise argparse.ArgumentTypeError(f"empty opset list {text!r}")
    return sorted(opsets)


def _positional(module: nn.Module, example: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The example inputs as the forward's positional arguments."""
    try:
        bound = inspect.signature(module.forward).bind(**example)
    except TypeError as exc:
        raise CompileError(f"example inputs {sorted(example)} do not fit {type(module).__name__}.forward: {exc}") from exc
    if bound.kwargs:
        raise CompileError(f"inputs {sorted(bound.kwargs)} of {type(module).__name__}.forward are keyword-only")
    return tuple(bound.args)


def _default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def export(module: nn.Module, example: Mapping[str, torch.Tensor], exporter: str, opset: int,
           path: pathlib.Path) -> onnx.ModelProto:
    """Export with ``exporter`` ("dynamo" or "torchscript") at ``opset`` to ``path``; return the model (no weights).

    Raises RuntimeError when the exporter produced a model of another opset than requested.
    """
    args = _positional(module, example)
    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, verbose=False,
                                        external_data=False)
            program.save(str(path))
        elif exporter == "torchscript":
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, verbose=False,
                              input_names=list(example), do_constant_folding=True)
        else:
            raise CompileError(f"unknown exporter {exporter!r}")
    model = onnx.load(str(path), load_external_data=False)
    del model.graph.initializer[:]  # the weights stay in the file; hold only the graph
    got = _default_opset(model)
    if got != opset:
        raise RuntimeError(f"the exporter produced opset {got} instead of {opset} (its version conversion failed)")
    return model


def _feeds(names: Sequence[str], example: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Feeds for graph inputs ``names``: by name, or by position when the exporter renamed them."""
    if all(n in example for n in names):
        return {n: example[n] for n in names}
    if len(names) == len(example):
        return dict(zip(names, example.values()))
    raise CompileError(f"{where}: cannot match graph inputs {list(names)} to example inputs {list(example)}")


def _save_proto(model: onnx.ModelProto, path: pathlib.Path) -> None:
    """Save a self-contained model (weights in a side file ``<name>.data`` only above protobuf's 2 GiB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    big = sum(len(t.raw_data) for t in model.graph.initializer) > 1.8 * 2**30
    onnx.save_model(model, str(path), save_as_external_data=big, location=f"{path.name}.data" if big else None)


def onnx_file_variant(name: str, exporter: str, path: pathlib.Path, model: onnx.ModelProto,
                      example: Mapping[str, np.ndarray], threads: int, spinning: bool) -> Variant:
    """A variant that runs the ONNX file ``path`` in ONNX Runtime (session created on first run,
    released by ``close`` so that big models need not all be in memory at once)."""
    state: dict[str, Any] = {}

    def run() -> list[np.ndarray]:
        if "session" not in state:
            try:
                state["session"] = ort.InferenceSession(str(path), session_options(threads, spinning=spinning),
                                                        providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise RuntimeError(f"ONNX Runtime cannot load {path.name}: {_summarize(exc)}") from exc
            state["feeds"] = _feeds([i.name for i in state["session"].get_inputs()], example, name)
        return state["session"].run(None, state["feeds"])

    def save(target: pathlib.Path) -> None:
        _save_proto(onnx.load(str(path)), target)

    return Variant(name=name, exporter=exporter, opset=_default_opset(model), nodes=len(model.graph.node),
                   run=run, save=save, close=state.clear)


def sigec_dense_model(engine_path: pathlib.Path) -> onnx.ModelProto:
    """sigec's DENSE graph from an engine file, with the engine's weights embedded as initializers."""
    contents = read_engine(engine_path)
    model = onnx.ModelProto.FromString(contents.graphs["dense"])
    used = {i for node in model.graph.node for i in node.input}
    present = {t.name for t in model.graph.initializer}
    for weight in sorted((used & set(contents.weights)) - present):
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(contents.weights[weight]), weight))
    return model


def pytorch_variant(module: nn.Module, example: Mapping[str, torch.Tensor], threads: int) -> Variant:
    """Dense PyTorch under ``torch.inference_mode`` with ``threads`` threads."""
    torch.set_num_threads(threads)

    def run() -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(**example)
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().numpy() for o in outs]

    return Variant(name="PyTorch", exporter="pytorch", opset=None, nodes=None, run=run)


def rel_l2(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Largest relative L2 error over the outputs (inf if the output counts or shapes differ)."""
    if len(outputs) != len(reference):
        return math.inf
    worst = 0.0
    for out, ref in zip(outputs, reference):
        out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
        if out.shape != ref.shape:
            return math.inf
        worst = max(worst, float(np.linalg.norm(out - ref) / (np.linalg.norm(ref) + 1e-12)))
    return worst


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True, disable=not enabled)


def time_round_robin(variants: Sequence[Variant], repeats: int, progress: bool = True) -> None:
    """One warm-up each, then ``repeats`` rounds of one run of every variant (rotating the start)."""
    with _progress(progress) as bar:
        task = bar.add_task("timing", total=len(variants) * (repeats + 1))
        for v in variants:
            bar.update(task, description=f"warm-up {v.name}")
            v.run()
            bar.advance(task)
        for r in range(repeats):
            shift = r % len(variants)
            for v in [*variants[shift:], *variants[:shift]]:
                bar.update(task, description=f"round {r + 1}/{repeats}: {v.name}")
                start = time.perf_counter()
                v.run()
                v.times_ms.append((time.perf_counter() - start) * 1e3)
                bar.advance(task)


def _ms(value: float) -> str:
    """Milliseconds with one decimal, or three significant digits below 10 ms."""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


@dataclass
class Report:
    """Everything the tool measured."""

    model: str
    small: bool
    threads: int
    repeats: int
    tolerance: float
    variants: list[Variant]
    failures: list[Failure]
    spinning: bool = False
    rss_bytes: int | None = None
    reference: str | None = None  # grouped timing: the variant every group contained

    @property
    def onnx_variants(self) -> list[Variant]:
        """The ONNX Runtime variants (everything but PyTorch)."""
        return [v for v in self.variants if v.exporter != "pytorch"]

    @property
    def fastest(self) -> Variant | None:
        """The fastest ONNX Runtime variant whose output matches PyTorch's."""
        ok = [v for v in self.onnx_variants if v.rel_l2 <= self.tolerance]
        return min(ok, key=lambda v: v.median_ms) if ok else None

    def markdown(self) -> str:
        """The table, the failures and the verdict, as markdown."""
        best = self.fastest
        lines = ["| variant | exporter | opset | nodes | median ms | x fastest | rel. L2 vs PyTorch |",
                 "|---|---|---|---|---|---|---|"]
        for v in sorted(self.variants, key=lambda v: v.median_ms):
            ratio = f"{v.median_ms / best.median_ms:.2f}" if best else "-"
            flag = "" if v.exporter == "pytorch" or v.rel_l2 <= self.tolerance else " MISMATCH"
            lines.append(f"| {v.name}{' (fastest)' if v is best else ''} | {v.exporter} | {v.opset or '-'} | "
                         f"{v.nodes if v.nodes is not None else '-'} | {_ms(v.median_ms)} | {ratio} | "
                         f"{v.rel_l2:.1e}{flag} |")
        if self.failures:
            lines += ["", "Exports that gave no usable model:", ""]
            lines += [f"- {f.exporter} opset {f.opset}: {f.error}" for f in self.failures]
        lines.append("")
        if best is None:
            lines.append(f"No ONNX variant matches PyTorch within rel. L2 {self.tolerance:g}.")
        else:
            sig = next((v for v in self.variants if v.exporter == "sigec"), None)
            torch_v = next((v for v in self.variants if v.exporter == "pytorch"), None)
            parts = [f"Fastest dense ONNX Runtime graph: **{best.name}**, {_ms(best.median_ms)} ms"]
            if sig is not None and sig is not best:
                parts.append(f"sigec's DENSE graph is {sig.median_ms / best.median_ms:.2f}x its time")
            if torch_v is not None:
                parts.append(f"dense PyTorch {_ms(torch_v.median_ms)} ms ({torch_v.median_ms / best.median_ms:.2f}x)")
            lines.append("; ".join(parts) + ".")
        spin = "on" if self.spinning else "off"
        lines.append(f"ORT sessions: ORT_ENABLE_ALL, {self.threads} intra-op threads, 1 inter-op thread, "
                     f"intra-op spin-waiting {spin}."
                     + (f" Peak process RSS measured after a timing group: {self.rss_bytes / 2**30:.2f} GiB."
                        if self.rss_bytes else ""))
        if self.reference:
            lines.append(f"Timed in round-robin groups, each with {self.reference}; a variant's ms is its median "
                         f"relative to {self.reference} in its own group, times {self.reference}'s overall median.")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        best = self.fastest
        return {
            "model": self.model, "small": self.small, "threads": self.threads, "repeats": self.repeats,
            "tolerance": self.tolerance, "spinning": self.spinning, "rss_bytes_with_all_sessions": self.rss_bytes,
            "date": str(datetime.date.today()), "machine": machine(),
            "onnxruntime": ort.__version__, "torch": torch.__version__,
            "fastest": best.name if best else None,
            "variants": [{"name": v.name, "exporter": v.exporter, "opset": v.opset, "nodes": v.nodes,
                          "median_ms": v.median_ms, "times_ms": v.times_ms,
                          "ratio_to_fastest": v.median_ms / best.median_ms if best else None,
                          "rel_l2_vs_pytorch": v.rel_l2, "matches": v.rel_l2 <= self.tolerance}
                         for v in self.variants],
            "failures": [f.__dict__ for f in self.failures],
        }


def _rss_bytes() -> int | None:
    """This process's resident set size now (Linux; None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _sources(module: nn.Module, example: Mapping[str, torch.Tensor], model: str, jobs: Sequence[tuple[str, int]],
             with_sigec: bool, engine: pathlib.Path | None, workdir: pathlib.Path, failures: list[Failure],
             progress: bool) -> list[tuple[str, str, pathlib.Path, onnx.ModelProto]]:
    """Export every (exporter, opset) job and sigec's DENSE graph to ``workdir``: (name, exporter, path, graph)."""
    sources = []
    with _progress(progress) as bar:
        task = bar.add_task("export", total=len(jobs) + with_sigec)
        for exporter, opset in jobs:
            bar.update(task, description=f"export {exporter} opset {opset}")
            path = workdir / f"{model}_{exporter}_op{opset}.onnx"
            try:
                sources.append((f"{exporter} opset {opset}", exporter, path,
                                export(module, example, exporter, opset, path)))
            except Exception as exc:  # every exporter failure is a result to report, not a crash
                failures.append(Failure(exporter, opset, _summarize(exc)))
            bar.advance(task)
        if with_sigec:
            bar.update(task, description="sigec compile" if engine is None else "sigec DENSE graph")
            try:
                if engine is None:
                    engine = workdir / f"{model}.sigec"
                    with _quiet():
                        sigec.compile(module, engine, inputs=dict(example))
                dense = sigec_dense_model(engine)
            except SigecError as exc:  # reported like an exporter failure; the other variants still run
                failures.append(Failure("sigec", 18, _summarize(exc)))
            else:
                path = workdir / f"{model}_sigec_dense.onnx"
                _save_proto(dense, path)
                del dense.graph.initializer[:]
                sources.append(("sigec DENSE", "sigec", path, dense))
            bar.advance(task)
    return sources


def collect(model: str, *, small: bool, dynamo_opsets: Sequence[int], torchscript_opsets: Sequence[int],
            exporters: Sequence[str], threads: int, repeats: int, tolerance: float, workdir: pathlib.Path,
            spinning: bool = False, engine: pathlib.Path | None = None, progress: bool = True,
            group_size: int = 0) -> Report:
    """Export, check and time every variant of zoo model ``model``; exports go to ``workdir``.

    ``spinning``: ORT intra-op spin-waiting of every session. ``group_size`` > 1: time the variants in
    round-robin groups of that size, each with the reference (sigec's DENSE graph) in it, closing each
    group's sessions before the next (big models: every session open at once needs > 23 GiB for the
    256-px UNet's 11 variants); times are then reported relative to the reference.
    """
    module, example = build(model, small=small)
    module.eval()
    example_np = {k: v.numpy() for k, v in example.items()}
    failures: list[Failure] = []
    jobs = [(e, o) for e, opsets in (("dynamo", dynamo_opsets), ("torchscript", torchscript_opsets))
            if e in exporters for o in opsets]
    sources = _sources(module, example, model, jobs, "sigec" in exporters, engine, workdir, failures, progress)
    variants = [pytorch_variant(module, example, threads)]
    variants += [onnx_file_variant(name, exporter, path, graph, example_np, threads, spinning)
                 for name, exporter, path, graph in sources]
    reference_out = variants[0].run()
    variants[0].rel_l2 = 0.0
    reference = next((v for v in variants if v.exporter == "sigec"), variants[min(1, len(variants) - 1)])
    others = [v for v in variants if v is not reference]
    size = max(group_size - 1, 1) if group_size > 0 else len(others)
    groups = [[reference, *others[i:i + size]] for i in range(0, len(others), size)] or [[reference]]
    rss, timed, reference_times = None, [], []
    for group in groups:
        usable = []
        for v in group:
            try:
                if v is not variants[0] and (v is not reference or math.isnan(v.rel_l2)):
                    v.rel_l2 = rel_l2(v.run(), reference_out)
                usable.append(v)
            except RuntimeError as exc:
                failures.append(Failure(v.exporter, v.opset or 0, str(exc)))
        before = len(reference.times_ms)
        time_round_robin(usable, repeats, progress)
        group_reference = statistics.median(reference.times_ms[before:]) if reference in usable else None
        reference_times += reference.times_ms[before:]
        for v in usable:
            if v is not reference and group_reference and len(groups) > 1:
                v.ratio_to_reference = statistics.median(v.times_ms) / group_reference
        now = _rss_bytes()
        rss = now if rss is None or (now or 0) > rss else rss
        for v in usable:
            if v is not reference and v.close is not None:
                v.close()
        timed += [v for v in usable if v not in timed]
    if len(groups) > 1 and reference_times:
        for v in timed:
            if v.ratio_to_reference is not None:
                v.reference_ms = statistics.median(reference_times)
    return Report(model=model, small=small, threads=threads, repeats=repeats, tolerance=tolerance,
                  variants=[v for v in variants if v in timed], failures=failures, spinning=spinning, rss_bytes=rss,
                  reference=reference.name if len(groups) > 1 else None)


def build_parser() -> argparse.ArgumentParser:
    """The tool's argument parser."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ddpm_unet")
    parser.add_argument("--small", action="store_true", help="use the test-size model (quick check)")
    parser.add_argument("--opsets", type=parse_opsets, default=parse_opsets("17-23"),
                        help="dynamo exporter opsets (default 17-23); also TorchScript's unless --torchscript-opsets")
    parser.add_argument("--torchscript-opsets", type=parse_opsets, default=None,
                        help="TorchScript exporter opsets (default: --opsets if given, else 17-20)")
    parser.add_argument("--exporters", default=",".join(EXPORTERS), help="subset of dynamo,torchscript,sigec")
    parser.add_argument("--engine", type=pathlib.Path, default=None,
                        help="take sigec's DENSE graph from this engine instead of compiling the model")
    parser.add_argument("--spinning", choices=["off", "on"], default="off",
                        help="ORT intra-op spin-waiting (session.intra_op.allow_spinning; ORT's default is on). "
                             "Spinning sessions slow every other session and PyTorch in the process, so the "
                             "round-robin is only fair with it off; to try it on, time one graph alone")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max rel. L2 vs PyTorch (default 1e-3)")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the results as JSON here")
    parser.add_argument("--save-fastest", type=pathlib.Path, default=None,
                        help="write the fastest matching ONNX model here (self-contained), for tools/bench.py")
    parser.add_argument("--group-size", type=int, default=0,
                        help="time in round-robin groups of this many variants (each with sigec's DENSE graph), "
                             "closing sessions between groups: bounds memory for big models (default: all at once)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> Report:
    """Run the tool; print the markdown report and return it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    exporters = [e.strip() for e in args.exporters.split(",") if e.strip()]
    unknown = sorted(set(exporters) - set(EXPORTERS))
    if unknown or not exporters:
        parser.error(f"unknown exporter(s) {unknown}; choose from {', '.join(EXPORTERS)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    explicit_opsets = any(a == "--opsets" or a.startswith("--opsets=") for a in (argv or sys.argv[1:]))
    ts_opsets = args.torchscript_opsets or (args.opsets if explicit_opsets else parse_opsets("17-20"))
    with tempfile.TemporaryDirectory(prefix="sigec-dense-baseline-") as tmp:
        report = collect(args.model, small=args.small, dynamo_opsets=args.opsets, torchscript_opsets=ts_opsets,
                         exporters=exporters, threads=args.threads, repeats=args.repeats, tolerance=args.tolerance,
                         workdir=pathlib.Path(tmp), engine=args.engine, progress=not args.no_progress,
                         spinning=args.spinning == "on", group_size=args.group_size)
        best = report.fastest
        if args.save_fastest is not None and best is not None and best.save is not None:
            best.save(args.save_fastest)
    print(f"### Dense baseline: {args.model}{' (small)' if args.small else ''}, {args.threads} threads, "
          f"medians of {args.repeats} round-robin runs")
    print()
    print(f"Command: `python tools/dense_baseline.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ")
    print(f"Date: {datetime.date.today()}; machine: {machine()}; onnxruntime {ort.__version__}, "
          f"torch {torch.__version__}.")
    print()
    print(report.markdown())
    if args.save_fastest is not None:
        print()
        print(f"wrote {args.save_fastest} ({best.name})" if best is not None else "nothing to save: no variant matches")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


if __name__ == "__main__":
    try:
        main()
    except SigecError as exc:
        print(f"dense_baseline: error: {exc}", file=sys.stderr)
        sys.exit(2)
