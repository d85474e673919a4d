"""``compile(..., autotune=True)``: choose a tile size, or dense execution, per resolution by measuring.

Procedure (all on this machine, with ONNX Runtime and the engine's thread count):

1. Compile the model once per candidate tile size (every resolution with that size).
2. Profile each candidate's sparse run, and the dense run, at each tuning edit size
   (``sigec.runtime.profiling``: kernel time per resolution).
3. For every resolution pick the choice with the least cost summed over the edit sizes, each edit's
   times divided by that edit's total sparse time (so a 1% edit weighs as much as a 20% one). The
   choices are the candidate tile sizes and, in approx mode, "dense" (the resolution's dense kernel
   time: the resolution then runs on full maps).
4. Compile the mixed choice, profile it the same way and keep it only if its total cost is below the
   best single candidate's; otherwise keep that candidate. The record of every measurement and the
   choice goes into the manifest (``options.autotune``).
"""

from __future__ import annotations

import pathlib
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from sigec.core.errors import CompileError
from sigec.runtime.profiling import OTHER, EngineProfile, profile_engine

DENSE = "dense"
DEFAULT_EDITS = (0.012, 0.05, 0.2)


@dataclass
class Plan:
    """A compile configuration: tile size per resolution and the resolutions that run dense."""

    tile_size: dict[str, int]
    dense_resolutions: list[str] = field(default_factory=list)


@dataclass
class TuneResult:
    """The chosen plan and what was measured (stored in the manifest)."""

    plan: Plan
    record: dict[str, Any]


CompileFn = Callable[[pathlib.Path, Plan], pathlib.Path]


def choose(costs: Mapping[str, Mapping[Any, float]]) -> dict[str, Any]:
    """Per resolution, the choice of least cost (ties go to the first choice listed)."""
    return {res: min(options, key=lambda c: options[c]) for res, options in costs.items() if options}


def resolution_costs(profiles: Mapping[Any, Sequence[EngineProfile]], *, allow_dense: bool) -> dict[str, dict[Any, float]]:
    """Normalised cost of every choice per resolution: sum over edits of (kernel ms of the resolution /
    total sparse kernel ms of the first candidate at that edit). ``profiles``: candidate -> one
    profile per edit, in the same edit order for every candidate."""
    first = next(iter(profiles.values()))
    totals = [p.sparse.total_ms or 1.0 for p in first]
    resolutions = sorted({r for runs in profiles.values() for p in runs for r in p.active_fraction})
    costs: dict[str, dict[Any, float]] = {}
    for res in resolutions:
        options: dict[Any, float] = {}
        for candidate, runs in profiles.items():
            if all(res in p.active_fraction for p in runs):
                options[candidate] = sum(p.sparse.by_resolution.get(res, 0.0) / t for p, t in zip(runs, totals))
        if allow_dense:
            dense = [sum(runs[i].dense.by_resolution.get(res, 0.0) for runs in profiles.values()) / len(profiles)
                     for i in range(len(totals))]
            options[DENSE] = sum(d / t for d, t in zip(dense, totals))
        costs[res] = options
    return costs


def plan_from_choice(choice: Mapping[str, Any], default_tile: int) -> Plan:
    """Turn per-resolution choices into compile options."""
    tiles = {res: int(c) for res, c in choice.items() if c != DENSE}
    return Plan(tile_size={**tiles, "default": default_tile},
                dense_resolutions=sorted(res for res, c in choice.items() if c == DENSE))


def total_cost(runs: Sequence[EngineProfile], reference: Sequence[EngineProfile]) -> float:
    """Sum over edits of sparse kernel time relative to the reference candidate's."""
    return sum(p.sparse.total_ms / max(r.sparse.total_ms, 1e-9) for p, r in zip(runs, reference))


def tune(compile_fn: CompileFn, *, mode: str, candidates: Sequence[int] = (4, 8), edits: Sequence[float] = DEFAULT_EDITS,
         threads: int | None = None, runs: int = 2, log: Callable[[str], None] = lambda _: None) -> TuneResult:
    """Measure the candidates and return the best plan (see the module docstring)."""
    if not candidates or any(int(c) < 1 for c in candidates):
        raise CompileError(f"autotune needs positive candidate tile sizes, got {list(candidates)}")
    if not edits or any(not 0.0 < e <= 1.0 for e in edits):
        raise CompileError(f"autotune edit sizes must lie in (0, 1], got {list(edits)}")
    with tempfile.TemporaryDirectory(prefix="sigec-autotune-") as tmp:
        def measure(label: str, plan: Plan) -> list[EngineProfile]:
            path = compile_fn(pathlib.Path(tmp) / f"{label}.sigec", plan)
            log(f"autotune: profiling {label} at edits {', '.join(f'{e:.1%}' for e in edits)}")
            return [profile_engine(path, edit=e, runs=runs, threads=threads) for e in edits]

        profiles = {int(c): measure(f"tile{c}", Plan(tile_size={"default": int(c)})) for c in candidates}
        costs = resolution_costs(profiles, allow_dense=(mode == "approx"))
        choice = choose(costs)
        reference = profiles[int(candidates[0])]
        single = {c: total_cost(p, reference) for c, p in profiles.items()}
        best_single = min(single, key=lambda c: single[c])
        plan = plan_from_choice(choice, int(best_single))
        mixed_cost = None
        if set(choice.values()) - {best_single}:
            mixed_cost = total_cost(measure("mixed", plan), reference)
            if mixed_cost >= single[best_single]:
                log(f"autotune: the mixed plan ({mixed_cost:.3f}) is not faster than tile {best_single} "
                    f"({single[best_single]:.3f}); keeping tile {best_single}")
                plan = Plan(tile_size={"default": int(best_single)})
    record = {
        "edits": list(edits), "threads": threads, "runs": runs, "candidates": [int(c) for c in candidates],
        "costs": {res: {str(k): round(v, 4) for k, v in options.items()} for res, options in costs.items()
                  if res != OTHER},
        "choice": {res: str(c) for res, c in choice.items()},
        "single_candidate_cost": {str(c): round(v, 4) for c, v in single.items()},
        "mixed_cost": None if mixed_cost is None else round(mixed_cost, 4),
        "plan": {"tile_size": plan.tile_size, "dense_resolutions": plan.dense_resolutions},
    }
    return TuneResult(plan=plan, record=record)
