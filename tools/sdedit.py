"""SDEdit with the DDPM church UNet: dense DDIM loop vs sigec's incremental loop on the same edit.

Usage: python tools/sdedit.py [--small] [--steps 50] [--strength 0.6] [--edit 0.012] [--threads 2]
       [--out out/sdedit] [--engine PATH] [--recompile]

Builds the zoo's ``ddpm_unet`` (random weights; ``--small``: the 32 px test model, default: the full
256 px church UNet), compiles it in approx mode (or reuses ``--engine``), makes a smooth synthetic
image and a copy with a painted square of ``--edit`` of its pixels, then runs SDEdit: one cache per
DDIM step primed on the original trajectory, the edited trajectory run sparsely (mask = the square
dilated by ``--mask-dilation`` px) and densely. Prints loop times, final-image PSNR of sparse vs
dense and the cache memory, and writes ``sdedit.png`` (original, edited, dense, sparse, mask).
"""

from __future__ import annotations

import argparse
import pathlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sigec.runtime.engine import Engine


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="the 32 px test UNet instead of the 256 px church UNet")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps run (UNet evaluations per loop)")
    parser.add_argument("--strength", type=float, default=0.6, help="SDEdit strength: start at t = strength * 1000")
    parser.add_argument("--edit", type=float, default=0.012, help="painted square, fraction of the pixels")
    parser.add_argument("--mask-dilation", type=int, default=None,
                        help="pixels the edit mask is dilated by (default: 1 px per 32 px of image size)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--backend", default="ort", choices=("ort", "torch"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the image and of the SDEdit noise")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/sdedit"), help="output folder")
    parser.add_argument("--engine", type=pathlib.Path, default=None,
                        help="engine file to reuse (compiled there when missing; default OUT/ddpm_unet[_small].sigec)")
    parser.add_argument("--recompile", action="store_true", help="compile even if the engine file exists")
    parser.add_argument("--max-cache-gb", type=float, default=None,
                        help="refuse to prime more caches than this (default: 80%% of available memory)")
    return parser.parse_args(argv)


def _engine_path(args: argparse.Namespace) -> pathlib.Path:
    import sigec
    from sigec.apps.zoo import build

    path = args.engine or args.out / ("ddpm_unet_small.sigec" if args.small else "ddpm_unet.sigec")
    if path.exists() and not args.recompile:
        print(f"reusing engine {path}")
        return path
    module, example = build("ddpm_unet", small=args.small)
    print(f"compiling ddpm_unet ({'small' if args.small else 'full'}) in approx mode -> {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return sigec.compile(module, path, inputs=example, mode="approx", backend=args.backend, progress=True)


def _check_memory(engine: Engine, sample: np.ndarray, steps: int, limit_gb: float | None) -> int:
    """Prime one throw-away key to measure a cache; refuse when ``steps`` of them would not fit."""
    spec = {i["name"]: i for i in engine.manifest["inputs"]}["timestep"]
    timestep = np.full(spec["shape"], 999, np.dtype(spec["dtype"]))
    engine.prime({"sample": sample, "timestep": timestep}, key="probe")
    per_key = engine.cache_bytes("probe")
    engine.drop("probe")
    from sigec.apps.sdedit import available_memory_bytes

    limit = limit_gb * 2**30 if limit_gb is not None else 0.8 * (available_memory_bytes() or float("inf"))
    if per_key * steps > limit:
        raise SystemExit(f"{steps} caches of {per_key / 2**20:.1f} MiB need {per_key * steps / 2**30:.2f} GiB, "
                         f"over the limit of {limit / 2**30:.2f} GiB: use fewer --steps or raise --max-cache-gb")
    return per_key


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the SDEdit comparison; print and return its numbers."""
    args = _parse(argv)
    import sigec
    from sigec.apps import sdedit

    engine = sigec.load(_engine_path(args), backend=args.backend, threads=args.threads)
    names = engine.input_names
    if names != ["sample", "timestep"]:
        raise SystemExit(f"expected a UNet engine with inputs ['sample', 'timestep'], got {names}")
    batch, _, height, width = engine.manifest["inputs"][0]["shape"]
    if height != width:
        raise SystemExit(f"expected a square sample, got {height}x{width}")
    original = sdedit.synthetic_image(height, batch=batch, seed=args.seed)
    square = sdedit.centered_square(height, args.edit)
    edited = sdedit.paint(original, square)
    radius = args.mask_dilation if args.mask_dilation is not None else max(1, height // 32)
    mask = sdedit.dilate(square, radius)
    per_key = _check_memory(engine, original, args.steps, args.max_cache_gb)
    print(f"{height} px, {args.steps} DDIM steps, strength {args.strength}, edit {square.mean() * 100:.2f}% "
          f"(mask {mask.mean() * 100:.2f}% after {radius} px dilation), {args.threads} thread(s), "
          f"cache {per_key / 2**20:.2f} MiB per step")
    result = sdedit.run_sdedit(engine, original, edited, mask, steps=args.steps, strength=args.strength,
                               seed=args.seed)
    picture = sdedit.save_panels(
        args.out / "sdedit.png", original, edited, result, mask,
        title=f"SDEdit, {args.steps} DDIM steps: sparse {result.speedup:.2f}x faster than dense, "
              f"PSNR sparse vs dense {result.psnr_sparse_vs_dense:.1f} dB")
    paths = {p: result.paths.count(p) for p in sorted(set(result.paths))}
    numbers = {
        "dense_loop_s": result.dense_s, "sparse_loop_s": result.sparse_s, "prime_s": result.prime_s,
        "speedup": result.speedup, "psnr_sparse_vs_dense_db": result.psnr_sparse_vs_dense,
        "psnr_unedited_vs_dense_db": result.psnr_original_vs_dense, "cache_bytes": float(result.cache_bytes),
        "mean_mac_reduction": float(np.mean(result.mac_reductions)) if result.mac_reductions else 1.0,
    }
    print(f"timesteps {result.timesteps[0]} .. {result.timesteps[-1]}; sparse run paths {paths}")
    print(f"dense loop   {result.dense_s * 1e3:9.1f} ms  ({result.dense_s * 1e3 / args.steps:.1f} ms/step)")
    print(f"sparse loop  {result.sparse_s * 1e3:9.1f} ms  ({result.sparse_s * 1e3 / args.steps:.1f} ms/step), "
          f"{result.speedup:.2f}x faster, {numbers['mean_mac_reduction']:.2f}x fewer MACs")
    print(f"priming      {result.prime_s * 1e3:9.1f} ms  (original trajectory, FULL graph, once per edit session)")
    print(f"PSNR sparse vs dense {result.psnr_sparse_vs_dense:.2f} dB "
          f"(unedited result vs dense: {result.psnr_original_vs_dense:.2f} dB)")
    print(f"cache memory {result.cache_bytes} bytes ({result.cache_bytes / 2**20:.1f} MiB, {args.steps} keys)")
    print(f"picture {picture}")
    return numbers


if __name__ == "__main__":
    main()
