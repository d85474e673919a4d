"""The ``sigec`` command line: compile, inspect, run, build-trt, demo, bench."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from sigec.apps.demo import RANDOM_WEIGHTS_NOTE
from sigec.autotune import DEFAULT_EDITS
from sigec.core.errors import InputError, SigecError
from sigec.core.options import (BACKENDS, CACHE_DTYPES, DEFAULT_APPROX_DILATION, DEFAULT_BACKEND, DEFAULT_CACHE_DTYPE,
                                DEFAULT_DILATION, DEFAULT_MODE, DEFAULT_NORM_STATS, DEFAULT_OPSET, DEFAULT_THRESHOLD,
                                DEFAULT_TILE_SIZE, FALLBACKS, MODES, NORM_STATS)
from sigec.core.tensorrt_abi import PRECISIONS
from sigec.inspection import plural

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
OUTPUT_SUFFIXES = (".npy", *IMAGE_SUFFIXES)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' to every option that has a default worth showing and does not state it.

    None, False and empty defaults mean "not given"; their help text says what happens then.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == () or "(default" in text:
            return text
        return super()._get_help_string(action)


def _by_mode(defaults: Mapping[str, Any]) -> str:
    """'exact 0, approx 1' for a per-mode default."""
    return ", ".join(f"{mode} {defaults[mode]}" for mode in MODES)


def _parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    try:
        name, dims = text.split("=", 1)
        return name, tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape expects NAME=D0,D1,..., got {text!r}") from None


def _parse_tile_size(text: str) -> int | dict[str, int]:
    try:
        if "=" not in text:
            return int(text)
        out: dict[str, int] = {}
        for part in text.split(","):
            key, value = part.split("=", 1)
            out[key] = int(value)
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or RES=N,...,default=N, got {text!r}") from None


def _parse_fractions(text: str) -> tuple[float, ...]:
    """Comma-separated fractions of the image, each in (0, 1]."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.05,0.2, got {text!r}") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must lie in (0, 1], got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _even_size(text: str) -> int:
    value = _positive_int(text)
    if value % 2 or value < 8:
        raise argparse.ArgumentTypeError(f"expected an even image size >= 8, got {text!r}")
    return value


def check_output_path(path: str | os.PathLike) -> pathlib.Path:
    """Refuse, before any work starts, an output whose folder is missing or not writable.

    ``compile``, ``run`` and ``build-trt`` share this rule: they never create folders, so a typo in
    ``-o`` fails at once with the path named instead of after minutes of compiling or running.
    """
    target = pathlib.Path(path)
    folder = target.parent
    if target.is_dir():
        raise InputError(f"cannot write '{target}': it is a folder; give a file name")
    if not folder.exists():
        raise InputError(f"cannot write '{target}': folder '{folder}' does not exist (create it first)")
    if not folder.is_dir():
        raise InputError(f"cannot write '{target}': '{folder}' is not a folder")
    if not os.access(folder, os.W_OK):
        raise InputError(f"cannot write '{target}': folder '{folder}' is not writable")
    return target


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
    if p.suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image

        img = np.clip((array[0].transpose(1, 2, 0) + 1.0) * 127.5, 0, 255).astype(np.uint8)
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(p)
    else:
        np.save(p, array)


def _check_run_output(path: str, manifest: Mapping[str, Any]) -> None:
    """``run -o``: a writable location, a format ``save_array`` writes, and an output it can hold."""
    check_output_path(path)
    suffix = pathlib.Path(path).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        # np.save would silently append .npy to any other name
        raise InputError(f"cannot write '{path}': the output must end in {', '.join(OUTPUT_SUFFIXES)}")
    if suffix in IMAGE_SUFFIXES:
        shape = manifest["outputs"][0]["shape"]
        if len(shape) != 4 or shape[1] not in (1, 3):
            raise InputError(f"cannot write '{path}': the first output has shape {shape}, not an image "
                             f"[B, 1 or 3, H, W]; write it as .npy")
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise InputError("writing images needs Pillow (pip install pillow); or write .npy") from None


def cmd_compile(args: argparse.Namespace) -> int:
    import sigec

    check_output_path(args.output)
    shapes = dict(args.input_shape or [])
    path = sigec.compile(args.model, args.output, mode=args.mode, backend=args.backend, tile_size=args.tile_size,
                         input_shapes=shapes or None, fallback=args.fallback, threshold=args.threshold,
                         dilation=args.dilation, approx_dilation=args.approx_dilation, opset=args.opset,
                         progress=not args.quiet,
                         dense_resolutions=args.dense_resolutions, autotune=args.autotune,
                         autotune_edits=args.autotune_edits, autotune_threads=args.autotune_threads,
                         norm_stats=args.norm_stats,
                         cache_dtype=args.cache_dtype)
    from sigec.core.engine_file import read_manifest

    manifest = read_manifest(path)
    kinds: dict[str, int] = {}
    for n in manifest["nodes"]:
        kinds[n["kind"]] = kinds.get(n["kind"], 0) + 1
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): mode {manifest['mode']}, "
          f"{plural(len(manifest['resolutions']), 'resolution')}, {plural(len(manifest['caches']), 'cache')}, nodes "
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
        insp.render(rep, nodes=args.nodes)
        if not args.nodes:
            print(f"(summary; the table of all {len(rep['nodes'])} nodes: sigec inspect {args.engine} --nodes)")
    if args.export_onnx:
        for p in insp.export_onnx(args.engine, args.export_onnx):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def _non_spatial_inputs(manifest: Mapping[str, Any], specs: Sequence[str] | None) -> dict[str, np.ndarray]:
    """The ``--input NAME=FILE.npy`` arrays, checked against the engine's non-spatial inputs (all required)."""
    inputs = {i["name"]: i for i in manifest["inputs"]}
    wanted = [name for name, spec in inputs.items() if not spec["spatial"]]
    out = {}
    for spec in specs or []:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise InputError(f"--input expects NAME=FILE.npy, got {spec!r}")
        if name not in inputs:
            raise InputError(f"--input {name}: the engine has no input {name!r}; its inputs are {list(inputs)}")
        if inputs[name]["spatial"]:
            raise InputError(f"--input {name}: {name!r} is the spatial input; pass it with --original and --edited")
        out[name] = load_array(path)
    missing = [name for name in wanted if name not in out]
    if missing:
        how = " ".join(f"--input {n}=FILE.npy" for n in missing)
        shapes = ", ".join(f"{n}: {inputs[n]['dtype']} {inputs[n]['shape']}" for n in missing)
        raise InputError(f"missing non-spatial input(s) {missing}: pass each as a .npy file with {how} ({shapes}); "
                         f"the same value is used for the original and the edited run")
    return out


def cmd_run(args: argparse.Namespace) -> int:
    import sigec
    from sigec.core.engine_file import read_manifest

    # everything the user typed is checked before the engine is loaded and run
    if args.output:
        check_output_path(args.output)
    manifest = read_manifest(args.engine)
    spatial = [i["name"] for i in manifest["inputs"] if i["spatial"]]
    if len(spatial) != 1:
        raise InputError(f"`sigec run` handles engines with one spatial input; this one has {spatial}")
    if args.output:
        _check_run_output(args.output, manifest)
    others = _non_spatial_inputs(manifest, args.input)
    original = {spatial[0]: load_array(args.original), **others}
    edited = {spatial[0]: load_array(args.edited), **others}
    mask = load_array(args.mask, as_mask=True) if args.mask else None
    engine = sigec.load(args.engine, backend=args.backend, threads=args.threads, cache_dtype=args.cache_dtype)
    engine.prime(original)
    outputs = engine.run(edited, mask=mask, threshold=args.threshold, dilation=args.dilation)
    stats = engine.stats
    print(f"path {stats.path}, {stats.wall_ms:.1f} ms, MAC reduction {stats.mac_reduction:.2f}x, active fraction "
          + (", ".join(f"{k} {v:.3f}" for k, v in stats.active_fraction.items()) or "0 (nothing changed)"))
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

    bench_engine(args.engine, edits=list(args.edits), repeats=args.repeats, threads=args.threads,
                 backend=args.backend)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sigec.apps.serve.cli import serve_command

    return serve_command(args)


def cmd_build_trt(args: argparse.Namespace) -> int:
    from sigec.passes.tensorrt_build import build_engine_file

    if args.output:
        check_output_path(args.output)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    path = build_engine_file(args.engine, args.output, precisions=precisions)
    print(f"wrote {path}: TensorRT plans ({', '.join(precisions)}) for the FULL, SPARSE and DENSE graphs")
    return 0


def _subcommand(sub: Any, name: str, text: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand (``text`` in ``sigec --help``) whose own help lists every option with its default."""
    return sub.add_parser(name, help=text, description=description or text, formatter_class=_HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sigec`` command."""
    parser = argparse.ArgumentParser(prog="sigec", description="Compile image generators for incremental inference.",
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    c = _subcommand(sub, "compile", "compile an .onnx file or a pkg.module:factory into an engine file")
    c.add_argument("model", help="path to an .onnx file, or pkg.module:factory returning an nn.Module [and inputs]")
    c.add_argument("-o", "--output", required=True, help="engine file to write (.sigec); its folder must exist")
    c.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                   help="exact: sparse output equals dense for local models; approx: SIGE-compatible masks, frozen "
                        "normalisation statistics, attention as dense islands")
    c.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                   help="runtime the engine is made for (tensorrt also builds the TensorRT plans, on a GPU)")
    c.add_argument("--tile-size", type=_parse_tile_size, default=None,
                   help=f"tile size for every resolution (default {DEFAULT_TILE_SIZE}), or per resolution: "
                        f"r64x64=8,default=8")
    c.add_argument("--input-shape", type=_parse_shape, action="append", metavar="NAME=D0,D1,...",
                   help="pin a dynamic input, e.g. image=1,3,256,256 (repeat for several inputs)")
    c.add_argument("--fallback", choices=FALLBACKS, default=FALLBACKS[0],
                   help="what to do with nodes that have no sparse rule: fail, or run them dense")
    c.add_argument("--threshold", type=float, default=None,
                   help=f"change threshold of automatic masks, stored as the engine's default "
                        f"(default by mode: {_by_mode(DEFAULT_THRESHOLD)})")
    c.add_argument("--dilation", type=int, default=None,
                   help=f"pixels added around every mask, stored as the engine's default "
                        f"(default by mode: {_by_mode(DEFAULT_DILATION)})")
    c.add_argument("--approx-dilation", type=int, default=DEFAULT_APPROX_DILATION,
                   help="approx mode: cells added around the edit on every resolution's tile mask (more is "
                        "closer to dense, slower; BENCHMARKS.md 'Trained models from packages')")
    c.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset for the PyTorch export")
    c.add_argument("--dense-resolutions", type=lambda t: tuple(x for x in t.split(",") if x), default=(),
                   metavar="r8x8,r16x16",
                   help="approx mode: resolutions that run dense (small maps most edits fill); default none")
    c.add_argument("--norm-stats", choices=NORM_STATS, default=DEFAULT_NORM_STATS,
                   help="approx mode: GroupNorm/InstanceNorm statistics frozen from the original or updated from "
                        f"the active tiles (default {DEFAULT_NORM_STATS})")
    c.add_argument("--cache-dtype", choices=CACHE_DTYPES, default=None,
                   help="precision of the caches only sigec's tile ops read (the others stay float32; "
                        f"default by mode: {_by_mode(DEFAULT_CACHE_DTYPE)})")
    c.add_argument("--autotune", action="store_true",
                   help="measure tile sizes (and dense execution) per resolution on this machine and keep the fastest")
    c.add_argument("--autotune-edits", type=_parse_fractions, default=None, metavar="0.012,0.05,0.2",
                   help="edit sizes (fractions of the image) the autotuning measures "
                        f"(default {','.join(str(e) for e in DEFAULT_EDITS)})")
    c.add_argument("--autotune-threads", type=int, default=None,
                   help="ONNX Runtime threads while autotuning (default: ONNX Runtime's own choice)")
    c.add_argument("-q", "--quiet", action="store_true", help="do not print the progress of each compile step")
    c.set_defaults(func=cmd_compile)

    i = _subcommand(sub, "inspect", "show what the rewrite did (and what a mask costs): a summary per resolution "
                                    "and per op type; --nodes adds every node")
    i.add_argument("engine", help="engine file (.sigec)")
    i.add_argument("--mask", help="mask file (.npy bool [H, W] or an image; nonzero = edited): adds the active tiles "
                                  "and executed MACs of an edit")
    i.add_argument("--nodes", action="store_true", help="also print the table of every node and every approximation")
    i.add_argument("--json", action="store_true", help="print the complete report (every node) as JSON")
    i.add_argument("--export-onnx", metavar="DIR", help="write the FULL/SPARSE/DENSE graphs as .onnx files into DIR")
    i.set_defaults(func=cmd_inspect)

    r = _subcommand(sub, "run", "prime with an original input and run an edited one")
    r.add_argument("engine", help="engine file (.sigec)")
    r.add_argument("--original", required=True, help="spatial input before the edit: .npy [1,C,H,W] or an image")
    r.add_argument("--edited", required=True, help="spatial input after the edit: .npy [1,C,H,W] or an image")
    r.add_argument("--input", action="append", metavar="NAME=FILE.npy",
                   help="every non-spatial input (e.g. a UNet's timestep), the same for both runs; repeat per input")
    r.add_argument("--mask", help="explicit mask file, .npy bool [H, W] or an image, nonzero = edited "
                                  "(default: computed from the difference of --edited and --original)")
    r.add_argument("--threshold", type=float, default=None,
                   help="change threshold of the computed mask (default: the engine's, set at compile time)")
    r.add_argument("--dilation", type=int, default=None,
                   help="pixels added around the mask (default: the engine's, set at compile time)")
    r.add_argument("-o", "--output",
                   help="write the first output: .npy, or .png/.jpg for images; its folder must exist")
    r.add_argument("--backend", choices=BACKENDS, default=None,
                   help="run with this backend instead of the one the engine was compiled for")
    r.add_argument("--threads", type=_positive_int, default=None,
                   help="intra-op threads (default: the backend's own choice)")
    r.add_argument("--cache-dtype", choices=CACHE_DTYPES, default=None,
                   help="store the caches in this dtype instead of the engine's (float16/bfloat16: half the memory, "
                        "approximate; float32 with the TensorRT backend)")
    r.set_defaults(func=cmd_run)

    t = _subcommand(sub, "build-trt", "add TensorRT plans to an engine file (on the GPU that will run them)")
    t.add_argument("engine", help="engine file (.sigec)")
    t.add_argument("-o", "--output", default=None, help="engine file to write (default: replace ENGINE atomically)")
    t.add_argument("--precision", default=",".join(PRECISIONS), help="comma-separated precisions of the plans")
    t.set_defaults(func=cmd_build_trt)

    d = _subcommand(sub, "demo", "compile and run the built-in small generator (random weights), end to end",
                    "compile the built-in generator, edit an image and run the edit incrementally; "
                    f"{RANDOM_WEIGHTS_NOTE}")
    d.add_argument("--out", default="out/demo",
                   help="folder for the engine file (tiny_local.sigec) and the picture (demo.png: original, edited, "
                        "dense and sparse output, mask); created if missing; the figures are printed")
    d.add_argument("--backend", choices=["ort", "torch"], default="ort", help="runtime to compile for and run")
    d.add_argument("--size", type=_even_size, default=256, help="image size in pixels (even; 32 runs in seconds)")
    d.set_defaults(func=cmd_demo)

    b = _subcommand(sub, "bench", "time sparse against dense for square edits on any engine (progress per edit "
                                  "on stderr, the table on stdout)")
    b.add_argument("engine", help="engine file (.sigec)")
    b.add_argument("--edits", type=_parse_fractions, default="0.012,0.05,0.1,0.2,0.5,1.0", metavar="FRACTIONS",
                   help="edited fractions of the image, comma-separated")
    b.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per edit (medians are reported)")
    b.add_argument("--threads", type=_positive_int, default=2, help="intra-op threads")
    b.add_argument("--backend", choices=BACKENDS, default=None,
                   help="run with this backend instead of the one the engine was compiled for")
    b.set_defaults(func=cmd_bench)

    s = _subcommand(sub, "serve", "serve an engine over HTTP with Ray Serve: sessions and a painting page "
                                  "(needs sigec[serve]; docs/serving.md)")
    s.add_argument("engine", help="engine file (.sigec), at this path on every Ray node")
    s.add_argument("--host", default="127.0.0.1", help="address the HTTP server binds (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    s.add_argument("--replicas", type=int, default=1, help="engine replicas, each holding its sessions' caches")
    s.add_argument("--threads", type=int, default=1, help="intra-op threads per replica (default 1)")
    s.add_argument("--max-cache-mib", type=float, default=None,
                   help="bound on each replica's caches; least recently used sessions expire (default: none)")
    s.add_argument("--cache-dtype", choices=CACHE_DTYPES, default=None,
                   help="precision of the replicas' caches (default: the engine's, see `sigec run --cache-dtype`)")
    s.add_argument("--address", default=None, help="join this Ray cluster (default: start a local Ray instance)")
    s.set_defaults(func=cmd_serve)
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
