"""Compile the small zoo models in both modes and record (or compare) their engines' outputs.

A refactoring of the compiler or the runtime must not change what engines compute. Run
``snapshot`` before the change and ``compare`` after it:

    python tools/engine_equivalence.py snapshot out/equivalence/before.npz
    python tools/engine_equivalence.py compare out/equivalence/before.npz

For every small zoo model and mode (exact, approx) the script compiles an engine (ONNX Runtime
backend, default options), primes it with fixed random inputs, and records the primed outputs,
a dense run and sparse runs (dense fallback off) at three centred square edits (1.2, 5, 20 %),
plus the path each run took. ``compare`` recompiles with the current code and reports the largest difference of every
record (exact equality expected when the graphs are unchanged).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

import sigec
from sigec.apps import zoo
from sigec.core.errors import SigecError
from sigec.runtime.synthetic_edits import edit_inputs, random_inputs, square_mask

MODELS = ("tiny_local", "resnet9", "spade", "ddpm_unet", "sd_vae_decoder")
MODES = ("exact", "approx")
EDITS = (0.012, 0.05, 0.2)


def record(models: tuple[str, ...] = MODELS) -> dict[str, np.ndarray]:
    """Every model's outputs under fixed inputs, keyed ``model/mode/run/output-index``."""
    out: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            module, example = zoo.build(name, small=True)
            for mode in MODES:
                path = Path(tmp) / f"{name}_{mode}.sigec"
                try:
                    sigec.compile(module, path, inputs=example, mode=mode)
                except SigecError as exc:
                    print(f"{name} {mode}: does not compile ({str(exc).splitlines()[0]})", file=sys.stderr)
                    continue
                # every edit on the sparse path: a fallback would compare the DENSE graph only
                engine = sigec.load(path, threads=2, dense_fallback_fraction=float("inf"))
                original = random_inputs(engine.manifest, seed=0)
                spatial = [i["name"] for i in engine.manifest["inputs"] if i["spatial"]]
                h, w = next(i["shape"][2:] for i in engine.manifest["inputs"] if i["spatial"])
                prefix = f"{name}/{mode}"
                for i, o in enumerate(engine.prime(original)):
                    out[f"{prefix}/prime/{i}"] = o
                for edit in EDITS:
                    edited = edit_inputs(original, spatial, square_mask(h, w, edit))
                    for i, o in enumerate(engine.run(edited, mask=square_mask(h, w, edit))):
                        out[f"{prefix}/sparse{edit}/{i}"] = o
                    out[f"{prefix}/sparse{edit}/path"] = np.array(engine.stats.path)
                    for i, o in enumerate(engine.run_dense(edited)):
                        out[f"{prefix}/dense{edit}/{i}"] = o
                print(f"{name} {mode}: recorded", file=sys.stderr)
    return out


def compare(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> list[str]:
    """One line per record that differs (missing, path changed, or values not bit-identical)."""
    problems = []
    for key in sorted(set(before) | set(after)):
        if key not in after or key not in before:
            problems.append(f"{key}: only {'before' if key in before else 'after'}")
            continue
        a, b = before[key], after[key]
        if a.dtype.kind in "US":
            if str(a) != str(b):
                problems.append(f"{key}: {a} -> {b}")
        elif a.shape != b.shape:
            problems.append(f"{key}: shape {a.shape} -> {b.shape}")
        elif not np.array_equal(a, b):
            diff = float(np.abs(a - b).max() / (np.abs(a).max() + 1e-12))
            problems.append(f"{key}: max relative difference {diff:.2e}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["snapshot", "compare"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args(argv)
    current = record(tuple(args.models))
    if args.command == "snapshot":
        args.file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.file, **current)
        print(f"wrote {len(current)} records to {args.file}")
        return 0
    with np.load(args.file) as data:
        before = {k: data[k] for k in data.files}
    problems = compare(before, current)
    print("\n".join(problems) if problems else f"identical: {len(current)} records")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
