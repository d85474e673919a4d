"""Incremental global pooling (passes/global_rules.py): sparse run time with and without the rule.

Usage: python tools/bench_global_pool.py [--size 640] [--edits 0.002,0.01] [--repeats 7] [--threads 2]
       [--modes approx,exact] [--tile-size 4]

The model is SE-heavy (``se_backbone``): a stride-2 stem and five MobileNetV3-style inverted
residual blocks (1x1 expand, depthwise 3x3, squeeze-excitation, 1x1 project; 16-96 channels, random
weights), every block with SE, output at 1/16 of the input. Each mode is compiled twice in this
process: with the rule, and with ``GLOBAL_RULES`` emptied (the pooling is then a dense island: the
map is scattered into a full copy and pooled densely every run). For each edit size (a centred
square of that fraction of the image, noise added inside it) the script primes both engines, then
alternates their sparse runs (after a warm-up each) and prints medians (and minima, steadier on a
busy machine); dense ONNX Runtime is timed once per mode for reference. Exact mode keeps
everything after the first SE gate dense either way, so the rule matters mostly in approx mode.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import sigec
from sigec.passes import global_rules
from sigec.runtime.synthetic_edits import edit_inputs, square_mask


class SqueezeExcite(nn.Module):
    """Global average pool, 1x1 reduce, ReLU, 1x1 expand, hard sigmoid; the map times the gate."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block with SE: expand 1x1 + hardswish, depthwise 3x3 + hardswish, SE, project 1x1."""

    def __init__(self, cin: int, expanded: int, cout: int, stride: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(cin, expanded, 1)
        self.depthwise = nn.Conv2d(expanded, expanded, 3, stride, 1, groups=expanded)
        self.se = SqueezeExcite(expanded, max(8, expanded // 4))
        self.project = nn.Conv2d(expanded, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.hardswish(self.expand(x))
        y = self.project(self.se(nn.functional.hardswish(self.depthwise(y))))
        return x + y if self.residual else y


BLOCKS = ((16, 16, 16, 2), (16, 64, 24, 2), (24, 96, 24, 1), (24, 96, 40, 2), (40, 96, 40, 1))
"""(in, expanded, out channels, stride) of each block."""


class SEBackbone(nn.Module):
    """A stride-2 stem (3x3 conv + hardswish) and the blocks of ``BLOCKS``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.Hardswish(), *(InvertedResidual(*b) for b in BLOCKS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def se_backbone(seed: int = 0) -> nn.Module:
    """The SE-heavy MobileNetV3-style backbone (random weights: He-normal convolutions, biases in
    [-0.2, 0.2], so that the signal and an edit's effect neither vanish nor explode through the
    blocks): [B, 3, H, W] -> [B, 40, H/16, W/16]."""
    torch.manual_seed(seed)
    module = SEBackbone().eval()
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.uniform_(conv.bias, -0.2, 0.2)
    return module


def _compile(module: nn.Module, example: dict[str, torch.Tensor], path: Path, mode: str, tile: int,
             with_rule: bool, threads: int) -> Any:
    saved = dict(global_rules.GLOBAL_RULES)
    try:
        if not with_rule:
            global_rules.GLOBAL_RULES.clear()
        sigec.compile(module, path, inputs=example, mode=mode, tile_size=tile, progress=False)
    finally:
        global_rules.GLOBAL_RULES.clear()
        global_rules.GLOBAL_RULES.update(saved)
    engine = sigec.load(path, threads=threads)
    engine.dense_fallback_fraction = float("inf")  # time the sparse path at every edit size
    return engine


def _sparse_ms(engine: Any, edited: dict[str, np.ndarray], mask: np.ndarray) -> float:
    start = time.perf_counter()
    engine.run(edited, mask=mask)
    elapsed = (time.perf_counter() - start) * 1e3
    assert engine.stats.path == "sparse", engine.stats.path
    return elapsed


def bench(size: int, edits: list[float], repeats: int, threads: int, modes: list[str], tile: int) -> list[dict]:
    """Median sparse times with and without the rule per mode and edit (and dense ORT per mode)."""
    torch.set_num_threads(threads)
    module = se_backbone()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    example = {"x": x}
    original = {"x": x.numpy()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            engines = {label: _compile(module, example, Path(tmp) / f"{mode}_{label}.sigec", mode, tile,
                                       label == "rule", threads) for label in ("rule", "no rule")}
            pooled = sum(1 for n in engines["rule"].manifest["nodes"] if n.get("note") == "incremental global pooling")
            for engine in engines.values():
                engine.prime(original)
            dense = []
            engines["rule"].run_dense(original)
            for _ in range(repeats):
                start = time.perf_counter()
                engines["rule"].run_dense(original)
                dense.append((time.perf_counter() - start) * 1e3)
            for fraction in edits:
                mask = square_mask(size, size, fraction)
                edited = edit_inputs(original, ["x"], mask)
                times: dict[str, list[float]] = {label: [] for label in engines}
                outputs = {label: e.run(edited, mask=mask) for label, e in engines.items()}  # warm-up
                for _ in range(repeats):
                    for label, engine in engines.items():
                        times[label].append(_sparse_ms(engine, edited, mask))
                diff = max(float(np.abs(a - b).max()) for a, b in zip(outputs["rule"], outputs["no rule"]))
                rows.append({"mode": mode, "edit": fraction, "dense_ms": statistics.median(dense),
                             "rule_ms": statistics.median(times["rule"]),
                             "no_rule_ms": statistics.median(times["no rule"]),
                             "rule_min_ms": min(times["rule"]), "no_rule_min_ms": min(times["no rule"]),
                             "pooled_nodes": pooled, "max_abs_diff": diff})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--edits", default="0.002,0.01")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="approx,exact")
    parser.add_argument("--tile-size", type=int, default=4)
    args = parser.parse_args(argv)
    rows = bench(args.size, [float(e) for e in args.edits.split(",")], args.repeats, args.threads,
                 args.modes.split(","), args.tile_size)
    print(f"se_backbone {args.size}x{args.size}, tile {args.tile_size}, {args.threads} threads, "
          f"medians of {args.repeats} runs")
    print("| mode | edit | dense ORT ms | sparse, no rule ms | sparse, rule ms | rule speedup "
          "| min: no rule / rule ms | pooling nodes on tiles | max abs(rule - no rule) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['edit'] * 100:.1f}% | {r['dense_ms']:.1f} | {r['no_rule_ms']:.2f} | "
              f"{r['rule_ms']:.2f} | {r['no_rule_ms'] / r['rule_ms']:.2f}x | {r['no_rule_min_ms']:.2f} / "
              f"{r['rule_min_ms']:.2f} | {r['pooled_nodes']} | {r['max_abs_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
