"""The ``sigec`` command line: compile, inspect, run, build-trt, demo, bench."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Sequence

import numpy as np

from sigec.core.errors import InputError, SigecError
from sigec.core.options import BACKENDS, DEFAULT_BACKEND, DEFAULT_MODE, MODES


def _parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    try:
        name, dims = text.split("=", 1)
        return name, tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape expects NAME=D0,D1,..., got {text!r}") from None


def _parse_tile_size(text: str) -> int | dict[str, int]:
    if "=" not in text:
        return int(text)
    out: dict[str, int] = {}
    for part in text.split(","):
        key, value = part.split("=", 1)
        out[key] = int(value)
    return out


def load_array(path: str, *, as_mask: bool = False) -> np.ndarray:
    """Read a .npy array, or an image (PNG/JPEG) as float32 [1, C, H, W] in [-1, 1] (or a bool mask)."""
    p = pathlib.Path(path)
    if not p.exists():
        raise InputError(f"file not found: {path}")
    if p.suffix == ".npy":
        try:
            array = np.load(p, allow_pickle=False)
        except Exception as exc:
            raise InputError(f"cannot read {path} as .npy: {exc}") from exc
        return array.astype(bool) if as_mask else array
    try:
        from PIL import Image
    except ImportError:
        raise InputError("reading images needs Pillow (pip install pillow); or pass .npy files") from None
    try:
        image = np.asarray(Image.open(p))
    except Exception as exc:
        raise InputError(f"cannot read {path} as an image: {exc}") from exc
    if as_mask:
        return (image.max(axis=-1) if image.ndim == 3 else image) > 0
    if image.ndim == 2:
        image = image[:, :, None]
    return (image[:, :, :3].transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1.0)


def save_array(path: str, array: np.ndarray) -> None:
    """Write an output as .npy, or as an image when the suffix is .png/.jpg."""
    p = pathlib.Path(path)
    if p.suffix in (".png", ".jpg", ".jpeg"):
        from PIL import Image

        img = np.clip((array[0].transpose(1, 2, 0) + 1.0) * 127.5, 0, 255).astype(np.uint8)
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(p)
    else:
        np.save(p, array)


def cmd_compile(args: argparse.Namespace) -> int:
    import sigec

    shapes = dict(args.input_shape or [])
    path = sigec.compile(args.model, args.output, mode=args.mode, backend=args.backend, tile_size=args.tile_size,
                         input_shapes=shapes or None, fallback=args.fallback, threshold=args.threshold,
                         dilation=args.dilation, opset=args.opset, progress=not args.quiet,
                         dense_resolutions=args.dense_resolutions, autotune=args.autotune,
                         autotune_edits=args.autotune_edits, autotune_threads=args.autotune_threads)
    from sigec.core.engine_file import read_manifest

    manifest = read_manifest(path)
    kinds: dict[str, int] = {}
    for n in manifest["nodes"]:
        kinds[n["kind"]] = kinds.get(n["kind"], 0) + 1
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): mode {manifest['mode']}, "
          f"{len(manifest['resolutions'])} resolutions, {len(manifest['caches'])} caches, nodes "
          + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from sigec import inspection as insp
    from sigec.core.engine_file import read_manifest

    manifest = read_manifest(args.engine)
    mask = load_array(args.mask, as_mask=True) if args.mask else None
    if mask is not None and mask.ndim == 4:
        mask = mask[0, 0]
    rep = insp.report(manifest, mask)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        insp.render(rep)
    if args.export_onnx:
        for p in insp.export_onnx(args.engine, args.export_onnx):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def _other_inputs(engine, specs: Sequence[str] | None) -> dict[str, np.ndarray]:
    out = {}
    for spec in specs or []:
        name, _, path = spec.partition("=")
        if not path:
            raise InputError(f"--input expects NAME=FILE.npy, got {spec!r}")
        out[name] = load_array(path)
    return out


def cmd_run(args: argparse.Namespace) -> int:
    import sigec

    engine = sigec.load(args.engine, backend=args.backend, threads=args.threads)
    spatial = [i["name"] for i in engine.manifest["inputs"] if i["spatial"]]
    if len(spatial) != 1:
        raise InputError(f"`sigec run` handles engines with one spatial input; this one has {spatial}")
    others = _other_inputs(engine, args.input)
    original = {spatial[0]: load_array(args.original), **others}
    edited = {spatial[0]: load_array(args.edited), **others}
    engine.prime(original)
    mask = load_array(args.mask, as_mask=True) if args.mask else None
    outputs = engine.run(edited, mask=mask)
    stats = engine.stats
    print(f"path {stats.path}, {stats.wall_ms:.1f} ms, MAC reduction {stats.mac_reduction:.2f}x, active fraction "
          + ", ".join(f"{k} {v:.3f}" for k, v in stats.active_fraction.items()))
    if args.output:
        save_array(args.output, outputs[0])
        print(f"wrote {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sigec.apps.demo import run_demo

    run_demo(pathlib.Path(args.out), backend=args.backend, size=args.size)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from sigec.apps.bench import bench_engine

    bench_engine(args.engine, edits=[float(e) for e in args.edits.split(",")], repeats=args.repeats,
                 threads=args.threads, backend=args.backend)
    return 0


def cmd_build_trt(args: argparse.Namespace) -> int:
    from sigec.passes.tensorrt_build import build_engine_file

    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    path = build_engine_file(args.engine, args.output, precisions=precisions)
    print(f"wrote {path}: TensorRT plans ({', '.join(precisions)}) for the FULL, SPARSE and DENSE graphs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sigec`` command."""
    parser = argparse.ArgumentParser(prog="sigec", description="Compile image generators for incremental inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile an .onnx file or a pkg.module:factory into an engine file")
    c.add_argument("model", help="path to an .onnx file, or pkg.module:factory returning an nn.Module [and inputs]")
    c.add_argument("-o", "--output", required=True, help="engine file to write (.sigec)")
    c.add_argument("--mode", choices=MODES, default=DEFAULT_MODE)
    c.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND)
    c.add_argument("--tile-size", type=_parse_tile_size, default=None,
                   help="tile size for every resolution (default 4), or r64x64=8,default=8")
    c.add_argument("--input-shape", type=_parse_shape, action="append", help="pin a dynamic input: NAME=1,3,256,256")
    c.add_argument("--fallback", choices=["error", "dense"], default="error",
                   help="what to do with nodes that have no sparse rule")
    c.add_argument("--threshold", type=float, default=None, help="default change threshold for automatic masks")
    c.add_argument("--dilation", type=int, default=None, help="default dilation of automatic masks (pixels)")
    c.add_argument("--opset", type=int, default=18, help="ONNX opset for PyTorch export")
    c.add_argument("--dense-resolutions", type=lambda t: tuple(x for x in t.split(",") if x), default=(),
                   metavar="r8x8,r16x16", help="approx mode: resolutions that run dense (small maps most edits fill)")
    c.add_argument("--autotune", action="store_true",
                   help="measure tile sizes (and dense execution) per resolution on this machine and keep the fastest")
    c.add_argument("--autotune-edits", type=lambda t: tuple(float(x) for x in t.split(",") if x), default=None,
                   metavar="0.012,0.05,0.2", help="edit sizes (fractions of the image) the autotuning measures")
    c.add_argument("--autotune-threads", type=int, default=None,
                   help="ONNX Runtime threads while autotuning (default: ONNX Runtime's own choice)")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_compile)

    i = sub.add_parser("inspect", help="show what the rewrite did (and what a mask costs)")
    i.add_argument("engine")
    i.add_argument("--mask", help="mask file (.npy bool [H, W] or an image; nonzero = edited)")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--export-onnx", metavar="DIR", help="write the FULL/SPARSE/DENSE graphs as .onnx files")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("run", help="prime with an original input and run an edited one")
    r.add_argument("engine")
    r.add_argument("--original", required=True, help=".npy [1,C,H,W] or an image")
    r.add_argument("--edited", required=True, help=".npy [1,C,H,W] or an image")
    r.add_argument("--input", action="append", help="other (non-spatial) inputs: NAME=FILE.npy")
    r.add_argument("--mask", help="explicit mask file (default: computed from the difference)")
    r.add_argument("-o", "--output", help="write the first output (.npy, or .png for images)")
    r.add_argument("--backend", choices=BACKENDS, default=None)
    r.add_argument("--threads", type=int, default=None)
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("build-trt", help="add TensorRT plans to an engine file (on the GPU that will run them)")
    t.add_argument("engine")
    t.add_argument("-o", "--output", default=None, help="engine file to write (default: replace ENGINE atomically)")
    t.add_argument("--precision", default="fp32,fp16", help="comma-separated: fp32, fp16 (default both)")
    t.set_defaults(func=cmd_build_trt)

    d = sub.add_parser("demo", help="compile and run a built-in small generator, end to end")
    d.add_argument("--out", default="out/demo", help="folder for the engine, the picture and the report")
    d.add_argument("--backend", choices=["ort", "torch"], default="ort")
    d.add_argument("--size", type=int, default=256)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="time sparse against dense for square edits on any engine")
    b.add_argument("engine")
    b.add_argument("--edits", default="0.012,0.05,0.1,0.2,0.5,1.0", help="edited fractions of the image")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--backend", choices=BACKENDS, default=None)
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sigec`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SigecError as exc:
        print(f"sigec: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
