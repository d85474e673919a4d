"""Latent SDEdit (Stable Diffusion img2img layout): the dense pipeline vs sigec's incremental one.

Usage: python tools/latent_sdedit.py [--size small|medium] [--steps 20] [--strength 0.3]
       [--guidance 7.5] [--edit 0.012] [--stroke paint|blend] [--threads 2] [--cache-dtype float32]
       [--out out/latent_sdedit] [--recompile] [--no-warmup]

Builds the zoo's VAE encoder, SD UNet (batch 2: classifier-free guidance) and VAE decoder at
matching sizes (random weights; ``small``: 16x16 latent, 128 px images; ``medium``: the medium UNet,
64x64 latent, with the full SD v1 VAE at 512 px), compiles them in approx mode into OUT (reused when
present), makes a smooth synthetic image and a copy with a painted square of ``--edit`` of its
pixels (``blend``: painted at 50% opacity), then runs ``sigec.apps.sdedit.latent_sdedit``: encode,
noise at ``--strength``, ``int(steps * strength)`` DDIM steps with CFG, decode; one UNet cache per
step primed on the original image's run, the edit run sparsely (mask = the square dilated by
``--mask-dilation`` px, on the latent grid for the UNet) and densely (``run_dense``). Prints the
per-stage times, the whole-pipeline speedup, the error of sparse vs dense and the cache memory, and
writes ``latent_sdedit.png`` (original, edit + mask, dense result, sparse result, |sparse - dense|).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import time

import numpy as np

ENGINES = ("encoder", "unet", "decoder")


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12))


def _key_bytes(manifest: dict) -> int:
    """Bytes one primed key holds (``Engine.expected_entry_bytes`` from the manifest alone)."""
    specs = (*manifest["caches"], *manifest["inputs"], *manifest["outputs"])
    return sum(math.prod(int(d) for d in spec["shape"]) * np.dtype(spec["dtype"]).itemsize for spec in specs)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=("small", "medium"),
                        help="small: 16x16 latent / 128 px; medium: 64x64 latent / 512 px (full SD VAE)")
    parser.add_argument("--steps", type=int, default=20, help="inference steps of the scheduler")
    parser.add_argument("--strength", type=float, default=0.3, help="img2img strength: int(steps * strength) UNet steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--edit", type=float, default=0.012, help="painted square, fraction of the pixels")
    parser.add_argument("--stroke", default="paint", choices=("paint", "blend"),
                        help="paint: opaque red; blend: red at 50%% opacity")
    parser.add_argument("--mask-dilation", type=int, default=None,
                        help="pixels the edit mask is dilated by (default: 1 px per 32 px of image size)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--cache-dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="precision of the caches gathers read (compile option; default: the mode's; "
                             "engine files get the dtype as a suffix when given)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image, the noise and the text embeddings")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/latent_sdedit"), help="output folder")
    parser.add_argument("--recompile", action="store_true", help="compile even if the engine files exist")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed first runs of every session")
    parser.add_argument("--max-cache-gb", type=float, default=None,
                        help="refuse to prime more caches than this (default: 80%% of available memory)")
    return parser.parse_args(argv)


def _engine_paths(args: argparse.Namespace) -> dict[str, pathlib.Path]:
    import sigec
    from sigec.apps import sdedit

    suffix = "" if args.cache_dtype is None else f"_{args.cache_dtype}"
    paths = {name: args.out / f"{args.size}_{name}{suffix}.sigec" for name in ENGINES}
    if all(p.exists() for p in paths.values()) and not args.recompile:
        print(f"reusing engines {', '.join(str(p) for p in paths.values())}")
        return paths
    models = sdedit.latent_sdedit_models(args.size, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ENGINES:
        module, example = models[name]
        begin = time.perf_counter()
        sigec.compile(module, paths[name], inputs=example, mode="approx", cache_dtype=args.cache_dtype)
        print(f"compiled {name} ({args.size}) in approx mode in {time.perf_counter() - begin:.1f} s -> {paths[name]}",
              flush=True)
    return paths


def _stroke(original: np.ndarray, square: np.ndarray, stroke: str) -> np.ndarray:
    from sigec.apps import sdedit

    painted = sdedit.paint(original, square)
    return painted if stroke == "paint" else (0.5 * original + 0.5 * painted).astype(np.float32)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the latent SDEdit comparison; print and return its numbers."""
    args = _parse(argv)
    from sigec.apps import bench, sdedit
    from sigec.core.engine_file import read_manifest

    paths = _engine_paths(args)
    manifests = {name: read_manifest(paths[name]) for name in ENGINES}
    n_steps = min(int(args.steps * args.strength), args.steps)
    per_key = {name: _key_bytes(manifests[name]) for name in ENGINES}
    # latent_sdedit loads each engine when its stage starts and releases it after: one stage's
    # caches at a time (ONNX Runtime's arenas add to them: BENCHMARKS.md, "Latent SDEdit").
    need = max(per_key["encoder"], n_steps * per_key["unet"], per_key["decoder"])
    limit = args.max_cache_gb * 2**30 if args.max_cache_gb is not None else 0.8 * (sdedit.available_memory_bytes() or float("inf"))
    if need > limit:
        raise SystemExit(f"caches need {need / 2**30:.2f} GiB ({n_steps} UNet keys of {per_key['unet'] / 2**20:.0f} MiB), "
                         f"over the limit of {limit / 2**30:.2f} GiB: fewer steps, --cache-dtype float16 "
                         "or --max-cache-gb")
    height = int(manifests["encoder"]["inputs"][0]["shape"][-1])
    original = sdedit.synthetic_image(height, seed=args.seed)
    square = sdedit.centered_square(height, args.edit)
    edited = _stroke(original, square, args.stroke)
    radius = args.mask_dilation if args.mask_dilation is not None else max(1, height // 32)
    mask = sdedit.dilate(square, radius)
    print(f"machine: {bench.machine()}; {args.threads} thread(s); load average {os.getloadavg()[0]:.1f} at the start")
    print(f"{height} px, latent {height // sdedit.VAE_FACTOR}, {args.steps} steps x strength {args.strength} = "
          f"{n_steps} UNet steps (batch 2, guidance {args.guidance}), {args.stroke} edit {square.mean() * 100:.2f}% "
          f"(mask {mask.mean() * 100:.2f}% after {radius} px dilation); caches per key MiB: "
          + ", ".join(f"{n} {b / 2**20:.0f}" for n, b in per_key.items()), flush=True)
    begin = time.perf_counter()
    result = sdedit.latent_sdedit(paths["encoder"], paths["unet"], paths["decoder"], original, edited, mask,
                                  steps=args.steps, strength=args.strength, guidance_scale=args.guidance,
                                  seed=args.seed, warmup=not args.no_warmup, threads=args.threads)
    wall = time.perf_counter() - begin
    picture = sdedit.save_latent_panels(
        args.out / "latent_sdedit.png", original, edited, mask, result,
        title=f"Latent SDEdit ({args.size}, {n_steps} UNet steps, CFG {args.guidance}): sparse {result.speedup:.2f}x "
              f"faster than dense, PSNR sparse vs dense {result.psnr_sparse_vs_dense:.1f} dB")
    paths_used = {stage: sorted(set(p)) for stage, p in result.paths.items()}
    print(f"timesteps {result.timesteps}; sparse paths {paths_used}; UNet mask {result.unet_mask.mean() * 100:.1f}% "
          f"of the latent, decoder mask {result.decoder_mask.mean() * 100:.1f}%")
    print(f"{'stage':8} {'dense ms':>10} {'sparse ms':>10} {'speedup':>8} {'MAC reduction':>14}")
    for stage in sdedit.STAGES:
        d, s = result.dense_s[stage], result.sparse_s[stage]
        print(f"{stage:8} {d * 1e3:10.1f} {s * 1e3:10.1f} {d / s:7.2f}x {np.mean(result.mac_reductions[stage]):13.2f}x")
    dense_total, sparse_total = sum(result.dense_s.values()), sum(result.sparse_s.values())
    print(f"{'whole':8} {dense_total * 1e3:10.1f} {sparse_total * 1e3:10.1f} {result.speedup:7.2f}x")
    print(f"priming (original's run, FULL graphs) {result.prime_s * 1e3:.1f} ms; wall of the comparison {wall:.1f} s; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"sparse vs dense: rel. L2 {result.rel_l2:.3e}, PSNR {result.psnr_sparse_vs_dense:.2f} dB "
          f"(unedited result vs dense: PSNR {result.psnr_original_vs_dense:.2f} dB)")
    inside = {name: _rel_l2(image[:, :, mask], result.dense[:, :, mask])
              for name, image in (("sparse", result.sparse), ("unedited", result.original))}
    print(f"inside the edit mask: rel. L2 sparse vs dense {inside['sparse']:.3e}, unedited result vs dense "
          f"{inside['unedited']:.3e} (ratio {inside['sparse'] / inside['unedited']:.2f}); whole image: unedited "
          f"{_rel_l2(result.original, result.dense):.3e}")
    print("cache memory MiB: " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in result.cache_bytes.items()))
    print(f"picture {picture}")
    numbers = {f"{kind}_{stage}_s": value for kind, times in (("dense", result.dense_s), ("sparse", result.sparse_s))
               for stage, value in times.items()}
    numbers.update(dense_s=dense_total, sparse_s=sparse_total, speedup=result.speedup, rel_l2=result.rel_l2,
                   psnr_sparse_vs_dense_db=result.psnr_sparse_vs_dense,
                   psnr_unedited_vs_dense_db=result.psnr_original_vs_dense, prime_s=result.prime_s,
                   rel_l2_inside=inside["sparse"], rel_l2_inside_unedited=inside["unedited"],
                   cache_bytes=float(sum(result.cache_bytes.values())))
    return numbers


if __name__ == "__main__":
    main()
