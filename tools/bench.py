"""Benchmark sigec on zoo generators: sparse vs dense ONNX Runtime, side by side in one process.

Usage: python tools/bench.py [--model ddpm_unet] [--edits 0.012,0.05,0.1,0.2,0.5,1.0] [--repeats 3]
       [--threads 2] [--mode approx] [--dense-onnx FASTEST.onnx] [--memory] [--write BENCHMARKS.md]

For each edit size (a centred square of that fraction of the image, noise added inside it) the
script primes the engine with the original inputs, then alternates dense ORT and sigec sparse runs
(after one warm-up each) and reports medians, the MAC reduction the mask program gives, the
efficiency (speedup / MAC reduction) and the relative L2 error of sparse against dense. Dense
PyTorch is timed once per model for reference. The empty edit (the original inputs with an
all-False mask) is timed against dense too (target: at most 2% of a dense run).

``--dense-onnx`` takes the dense baseline from an ONNX file (the fastest one from
``tools/dense_baseline.py --save-fastest``) instead of the engine's DENSE graph; ``--memory`` adds
the peak-memory table of ``tools/peak_memory.py`` (fresh processes) to the section.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import sigec
from sigec.apps.bench import machine, markdown_table, measure, measure_empty_edit, onnx_dense_run
from sigec.apps.zoo import build

TOOLS = pathlib.Path(__file__).resolve().parent


def _torch_dense_ms(module: torch.nn.Module, inputs: dict[str, torch.Tensor], threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    times = []
    with torch.inference_mode():
        module(**inputs)
        for _ in range(repeats):
            start = time.perf_counter()
            module(**inputs)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _label_edit(original: dict[str, np.ndarray]):
    """SPADE generators: edits change the labels inside the mask to a class absent from that region."""
    from sigec.apps.zoo import edit_label_map

    name = next(iter(original))

    def make(mask: np.ndarray) -> dict[str, np.ndarray]:
        labels = original[name]
        if not mask.any():
            return {name: labels.copy()}
        ys, xs = np.nonzero(mask)
        box = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
        present = set(np.unique(labels[:, :, box[0]:box[2], box[1]:box[3]].argmax(axis=1)).tolist())
        new_class = next(c for c in range(labels.shape[1]) if c not in present)
        edited = edit_label_map(torch.from_numpy(labels), box, new_class).numpy()
        return {name: edited}

    return make


def _plot(rows, model_name: str, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edits = [r.edit * 100 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(edits, [r.speedup for r in rows], "o-", label="measured speedup vs dense ORT")
    ax.plot(edits, [r.mac_reduction for r in rows], "s--", label="MAC reduction (the limit)")
    ax.axhline(1.0, color="gray", lw=1, label="dense (1x)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("edited area (%)")
    ax.set_ylabel("x faster than dense")
    ax.set_title(f"{model_name}: sigec sparse vs dense ONNX Runtime")
    ax.legend()
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)


def _peak_memory_section(engine_path: pathlib.Path, threads: int, dense_onnx: str | None) -> list[str]:
    """The peak-memory table of tools/peak_memory.py for this engine (each figure from a fresh process)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    from peak_memory import markdown, measure_peak

    results = measure_peak(engine_path, edit=0.012, threads=threads, dense_onnx=dense_onnx)
    return ["Peak memory (`tools/peak_memory.py`, each row a fresh process):", "", markdown(results), ""]


def parse_tile_size(text: str | None) -> int | dict[str, int] | None:
    """``--tile-size``: one size (``4``) or sizes per resolution (``default=4,r16x16=2,r8x8=2``)."""
    if text is None or text.isdigit():
        return None if text is None else int(text)
    sizes = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if not value.isdigit():
            raise SystemExit(f"--tile-size: {part!r} is not NAME=SIZE (e.g. r16x16=2)")
        sizes[name.strip()] = int(value)
    return sizes


def run(model_name: str, edits: list[float], repeats: int, threads: int, mode: str, small: bool,
        tile_size: int | dict[str, int] | None, plot_dir: str | None = None, dense_onnx: str | None = None,
        memory: bool = False, autotune: bool = False, size: str | None = None) -> str:
    """Benchmark one zoo model; return the markdown section."""
    module, example = build(model_name, small=small, **({"size": size} if size else {}))
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / f"{model_name}.sigec"
        start = time.perf_counter()
        sigec.compile(module, path, inputs=example, mode=mode, tile_size=tile_size, progress=True,
                      autotune=autotune, autotune_threads=threads)
        compile_s = time.perf_counter() - start
        engine = sigec.load(path, threads=threads)
        original = {k: v.numpy() for k, v in example.items()}
        # label-map generators (spade, spade_fused) are edited by relabelling, as a user paints
        make_edit = _label_edit(original) if model_name.startswith("spade") else None
        dense = onnx_dense_run(dense_onnx, threads, engine.input_names) if dense_onnx else None
        rows = measure(engine, original, edits, repeats=repeats, make_edit=make_edit, dense=dense)
        empty = measure_empty_edit(engine, original, repeats=repeats, dense=dense)
        cache_mb = engine.cache_bytes() / 2**20
        memory_lines = _peak_memory_section(path, threads, dense_onnx) if memory else []
        approximated = sorted({a["op_type"] for a in engine.manifest["approximations"]})
        plan = engine.manifest["options"]
        plan_text = f"tile sizes {plan['tile_size']}, dense resolutions {plan.get('dense_resolutions') or 'none'}"
        n_approx = len(engine.manifest["approximations"])
    torch_ms = _torch_dense_ms(module, example, threads, repeats)
    if plot_dir:
        pathlib.Path(plot_dir).mkdir(parents=True, exist_ok=True)
        _plot(rows, model_name, pathlib.Path(plot_dir) / f"{model_name}.png")
    tile_text = "" if tile_size is None else " --tile-size " + (
        str(tile_size) if isinstance(tile_size, int) else ",".join(f"{k}={v}" for k, v in tile_size.items()))
    cmd = "python tools/bench.py --model {} --mode {} --repeats {} --threads {}{}{}{}".format(
        model_name + (f" --size {size}" if size else "") + tile_text, mode, repeats, threads,
        " --small" if small else "",
        f" --dense-onnx {dense_onnx}" if dense_onnx else "", " --memory" if memory else "") + \
        (" --autotune" if autotune else "") + f" --edits {','.join(f'{e:g}' for e in edits)}"
    dense_what = (f"dense ORT = `{dense_onnx}` (intra-op spinning off)" if dense_onnx
                  else "dense ORT = the engine's DENSE graph")
    shape = "x".join(str(s) for s in next(iter(example.values())).shape)
    return "\n".join([
        f"### {model_name} ({shape}, mode {mode}, {threads} threads)",
        "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.date.today()}; machine: {machine()}; onnxruntime {__import__('onnxruntime').__version__}, "
        f"torch {torch.__version__}.  ",
        f"Compile time {compile_s:.1f} s; caches {cache_mb:.1f} MiB per key; dense PyTorch {torch_ms:.1f} ms; "
        f"approximations: {n_approx} ({', '.join(approximated) or 'none'}); {dense_what}; {plan_text}.",
        "",
        markdown_table(rows),
        "",
        empty.line(),
        "",
    ] + memory_lines + ([f"![{model_name}](bench/{model_name}.png)", ""] if plot_dir else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ddpm_unet")
    parser.add_argument("--edits", default="0.012,0.05,0.1,0.2,0.5,1.0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", default="approx", choices=["approx", "exact"])
    parser.add_argument("--tile-size", default=None,
                        help="one tile size, or sizes per resolution: default=4,r16x16=2 (default: the compiler's)")
    parser.add_argument("--size", default=None, help="zoo size variant (sd_unet, dit: small, medium, full)")
    parser.add_argument("--small", action="store_true", help="use the test-size model (quick check)")
    parser.add_argument("--write", help="append the section to this markdown file")
    parser.add_argument("--plot-dir", default=None, help="write a speedup-vs-edit PNG per model here (e.g. bench/)")
    parser.add_argument("--dense-onnx", default=None,
                        help="dense baseline ONNX file (tools/dense_baseline.py --save-fastest) instead of the "
                             "engine's DENSE graph")
    parser.add_argument("--memory", action="store_true", help="add the peak-memory table (tools/peak_memory.py)")
    parser.add_argument("--autotune", action="store_true", help="compile with --autotune (tile size / dense per resolution)")
    args = parser.parse_args(argv)
    section = run(args.model, [float(e) for e in args.edits.split(",")], args.repeats, args.threads, args.mode,
                  args.small, parse_tile_size(args.tile_size), args.plot_dir, args.dense_onnx, args.memory,
                  args.autotune, args.size)
    print(section)
    if args.write:
        with open(args.write, "a") as f:
            f.write(section + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
