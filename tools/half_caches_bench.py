"""Half-precision caches (``cache_dtype``): memory per key, error and sparse run time, float32 vs half.

Usage:
  python tools/half_caches_bench.py memory [--models ddpm_unet,spade,...] [--small]
  python tools/half_caches_bench.py error [--models tiny_local,...] [--edits 0.012,0.05,0.2]
  python tools/half_caches_bench.py speed [--model ddpm_unet] [--edit 0.012] [--repeats 15] [--threads 2]
  python tools/half_caches_bench.py ops [--threads 1] [--repeats 200]

``memory`` rewrites each zoo model (no engine file, nothing runs) with every cache dtype and reports
the caches' MiB per key (from the manifest: shapes and dtypes), how many caches are half, the
bytes a primed key holds besides (its inputs and outputs), and the caches the rewrite registered
but the pruned SPARSE graph never reads (dropped by RemoveUnusedInputsPass before they reach the
manifest: their MiB is what a key would hold without that pruning).

``error`` runs the small zoo models (``small=True``, as the tests) in approx mode with the sparse path
forced, against ONNX Runtime on the original exported model, and reports the relative L2 error of
the sparse output per cache dtype and its growth over float32.

``speed`` times sparse runs of one model at one edit with float32 and float16 caches, alternating
the two engines run by run in ABBA order (so that load on a shared machine and the position in a
pair hit both alike): medians and minima
of the wall time, and medians of the process CPU time (all threads), which other processes on a
shared machine disturb less.

``ops`` times the ONNX Runtime kernels alone with a float32, float16 (F16C, and the portable
conversion in a subprocess with SIGEC_ORT_NO_F16C=1) and bfloat16 ``base``: TileGather of 3x3
convolution windows (T = 4, 5% of the tiles of a 128 x 64 x 64 map, the rest read from ``base``) and
TileScatter of the same tiles into the full map; best of ``--repeats`` after warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # helpers: engines from protos, the ONNX Runtime oracle

DTYPES = ("float32", "float16", "bfloat16")
SMALL_MODELS = ("tiny_local", "spade", "resnet9_batch", "resnet9_instance", "ddpm_unet", "sd_vae_decoder")


def _proto(variant: str, small: bool) -> Any:
    from helpers import ZOO_VARIANTS

    from sigec.apps import zoo
    from sigec.frontends.torch_frontend import export_module

    model, kwargs = ZOO_VARIANTS[variant]
    module, inputs = zoo.build(model, small=small, **kwargs)
    return export_module(module, inputs, opset=18), {k: v.numpy() for k, v in inputs.items()}


def _mib(specs: Any) -> float:
    return sum(int(np.prod(s["shape"])) * np.dtype(s["dtype"]).itemsize for s in specs) / 2**20


def memory(models: list[str], small: bool, mode: str) -> None:
    from sigec.frontends.onnx_frontend import load_onnx
    from sigec.passes import sparse_rewrite

    contexts = []
    create = sparse_rewrite.RewriteContext.create

    def spy(*args: Any, **kwargs: Any) -> Any:  # the registry of every cache the rewrite asked for
        ctx = create(*args, **kwargs)
        contexts.append(ctx)
        return ctx

    sparse_rewrite.RewriteContext.create = spy  # type: ignore[method-assign]
    print(f"| model ({mode}) | caches float32 MiB/key | float16 | bfloat16 | half caches | kept float32 (why) | "
          f"inputs+outputs MiB | registered, never read: count, MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in models:
        proto, _ = _proto(variant, small)
        model = load_onnx(proto)
        row: dict[str, Any] = {}
        for dtype in DTYPES:
            result = sparse_rewrite.rewrite(model, mode=mode, cache_dtype=dtype)
            row[dtype] = result.manifest
        ctx = contexts[-1]
        read = {c["name"] for c in row["float32"]["caches"]}
        unread = [c.to_json() for name, c in ctx.caches.specs.items() if name not in read]
        half = [c for c in row["float16"]["caches"] if c["dtype"] == "float16"]
        kept = {}
        for c in row["float16"]["caches"]:
            if c["dtype"] != "float16":
                kept[c["kind"]] = kept.get(c["kind"], 0) + 1
        io = _mib(row["float32"]["inputs"]) + _mib(row["float32"]["outputs"])
        print(f"| {variant} | {_mib(row['float32']['caches']):.1f} | {_mib(row['float16']['caches']):.1f} | "
              f"{_mib(row['bfloat16']['caches']):.1f} | {len(half)} of {len(row['float16']['caches'])} | "
              f"{', '.join(f'{v} {k}' for k, v in sorted(kept.items())) or 'none'} | {io:.1f} | "
              f"{len(unread)}, {_mib(unread):.1f} |", flush=True)


def error(models: list[str], edits: list[float], mode: str) -> None:
    from helpers import always_sparse, compare_with_oracle, engine_from_proto, ort_oracle

    from sigec.runtime.synthetic_edits import edit_inputs, square_mask

    print(f"| model ({mode}) | edit | rel. L2 float32 | float16 | bfloat16 | growth float16 | growth bfloat16 | "
          f"not recomputing |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in models:
        proto, original = _proto(variant, small=True)
        oracle = ort_oracle(proto)
        engines = {d: always_sparse(engine_from_proto(proto, mode=mode, tile_size=4, backend="ort", cache_dtype=d))
                   for d in DTYPES}
        spatial = [i["name"] for i in engines["float32"].manifest["inputs"] if i["spatial"]]
        height, width = engines["float32"].manifest["mask_program"]["input_size"]
        for edit in edits:
            mask = square_mask(height, width, edit)
            edited = edit_inputs(original, spatial, mask)
            errs, stale = {}, 0.0
            for dtype, engine in engines.items():
                c = compare_with_oracle(engine, oracle, original, edited, mask)
                assert c.path == "sparse", c
                errs[dtype], stale = c.sparse_l2, c.stale_l2
            print(f"| {variant} | {edit:.1%} | {errs['float32']:.4e} | {errs['float16']:.4e} | {errs['bfloat16']:.4e} | "
                  f"{errs['float16'] - errs['float32']:+.1e} | {errs['bfloat16'] - errs['float32']:+.1e} | "
                  f"{stale:.3e} |", flush=True)


def speed(model_name: str, edit: float, repeats: int, threads: int, mode: str, small: bool) -> None:
    import tempfile

    import sigec
    from sigec.apps.zoo import build
    from sigec.runtime.synthetic_edits import edit_inputs, square_mask

    module, example = build(model_name, small=small)
    original = {k: v.numpy() for k, v in example.items()}
    engines = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16"):
            path = Path(tmp) / f"{model_name}_{dtype}.sigec"
            sigec.compile(module, path, inputs=example, mode=mode, cache_dtype=dtype, progress=False)
            engines[dtype] = sigec.load(path, threads=threads)
    spatial = [i["name"] for i in engines["float32"].manifest["inputs"] if i["spatial"]]
    height, width = engines["float32"].manifest["mask_program"]["input_size"]
    mask = square_mask(height, width, edit)
    edited = edit_inputs(original, spatial, mask)
    times: dict[str, list[float]] = {d: [] for d in engines}
    cpu: dict[str, list[float]] = {d: [] for d in engines}
    outputs = {}
    for dtype, engine in engines.items():
        engine.prime(original)
        outputs[dtype] = engine.run(edited, mask=mask)  # warm-up
        assert engine.stats.path == "sparse", engine.stats
    for i in range(repeats):
        order = list(engines.items()) if i % 2 == 0 else list(engines.items())[::-1]  # ABBA: no position bias
        for dtype, engine in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            engine.run(edited, mask=mask)
            times[dtype].append((time.perf_counter() - start) * 1e3)
            cpu[dtype].append((time.process_time() - start_cpu) * 1e3)
    dense = engines["float32"].run_dense(edited)[0]
    ref = np.linalg.norm(dense)
    print(f"| model | edit | threads | sparse float32 ms (median, min) | sparse float16 ms (median, min) | "
          f"float16 / float32 (median, min, median of pairs) | CPU ms float32 / float16 (median) | "
          f"cache MiB/key float32 -> float16 | rel. L2 vs dense float32 / float16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    pairs = statistics.median(b / a for a, b in zip(times["float32"], times["float16"]))  # runs adjacent in time
    m32, m16 = statistics.median(times["float32"]), statistics.median(times["float16"])
    c32, c16 = statistics.median(cpu["float32"]), statistics.median(cpu["float16"])
    bytes_ = {d: e.cache_bytes() / 2**20 for d, e in engines.items()}
    errs = {d: float(np.linalg.norm(outputs[d][0] - dense) / ref) for d in engines}
    print(f"| {model_name} | {edit:.1%} | {threads} | {m32:.1f} ({min(times['float32']):.1f}) | "
          f"{m16:.1f} ({min(times['float16']):.1f}) | {m16 / m32:.3f}, "
          f"{min(times['float16']) / min(times['float32']):.3f}, {pairs:.3f} | {c32:.1f} / {c16:.1f} | {bytes_['float32']:.1f} -> "
          f"{bytes_['float16']:.1f} | {errs['float32']:.4e} / {errs['float16']:.4e} |", flush=True)


def _best_ms(fn: Any, repeats: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def ops(threads: int, repeats: int, dtypes: list[str]) -> None:
    import ml_dtypes
    import onnxruntime as ort
    from helpers import conv_attrs, coords_of, sparse_input
    from onnx import TensorProto, helper

    from sigec.runtime import ort_ops
    from sigec.runtime.ort_binding import ort_value

    onnx_types = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
    np_types = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
    arrays = sparse_input(np.random.default_rng(0), 1, 128, 64, 64, 4, frac=0.05)
    coords = arrays["coords"]
    vals = arrays["vals"]
    for dtype in dtypes:
        base = arrays["base"].astype(np_types[dtype])
        gather = helper.make_node("TileGather", ["base", "vals", "grid", "coords"], ["g"], domain=ort_ops.DOMAIN,
                                  **conv_attrs(4))
        scatter = helper.make_node("TileScatter", ["base", "vals", "coords"], ["s"], domain=ort_ops.DOMAIN)
        inputs = [helper.make_tensor_value_info("base", onnx_types[dtype], list(base.shape)),
                  helper.make_tensor_value_info("vals", TensorProto.FLOAT, list(vals.shape)),
                  helper.make_tensor_value_info("grid", TensorProto.INT64, list(arrays["grid"].shape)),
                  helper.make_tensor_value_info("coords", TensorProto.INT64, list(coords.shape))]
        times = {}
        for node, out in ((gather, "g"), (scatter, "s")):
            graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                            helper.make_opsetid(ort_ops.DOMAIN, 1)])
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.log_severity_level = 3
            ort_ops.register(options)
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            feeds = {"base": ort_value(base), "vals": ort_value(vals), "grid": ort_value(arrays["grid"]),
                     "coords": ort_value(coords)}
            wanted = {i.name for i in session.get_inputs()}
            feeds = {k: v for k, v in feeds.items() if k in wanted}
            times[out] = _best_ms(lambda: session.run_with_ort_values([out], feeds), repeats)
        path = "portable" if dtype == "float16" and os.environ.get("SIGEC_ORT_NO_F16C") == "1" else \
            ("F16C" if dtype == "float16" else "")
        print(f"| {dtype}{' (' + path + ')' if path else ''} | {base.nbytes / 2**20:.1f} | {times['g']:.3f} | "
              f"{times['s']:.3f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "error", "speed", "ops"])
    parser.add_argument("--dtypes", default=None, help="ops: cache dtypes to time (default all)")
    parser.add_argument("--models", default=None, help="comma-separated zoo variants (tests/helpers.ZOO_VARIANTS)")
    parser.add_argument("--model", default="ddpm_unet")
    parser.add_argument("--small", action="store_true", help="memory/speed: the test-size models")
    parser.add_argument("--mode", default="approx", choices=["approx", "exact"])
    parser.add_argument("--edits", default="0.012,0.05,0.2")
    parser.add_argument("--edit", type=float, default=0.012)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    models = args.models.split(",") if args.models else list(SMALL_MODELS)
    if args.what == "memory":
        memory(models, args.small, args.mode)
    elif args.what == "error":
        error(models, [float(e) for e in args.edits.split(",")], args.mode)
    elif args.what == "speed":
        speed(args.model, args.edit, args.repeats, args.threads, args.mode, args.small)
    else:
        if args.dtypes is None:
            print(f"best of {args.repeats}, {args.threads} thread(s)")
            print("| base dtype | base MiB | TileGather ms | TileScatter ms |")
            print("|---|---|---|---|")
            ops(args.threads, args.repeats, list(DTYPES))
            env = {**os.environ, "SIGEC_ORT_NO_F16C": "1"}
            subprocess.run([sys.executable, __file__, "ops", "--dtypes", "float16", "--threads", str(args.threads),
                            "--repeats", str(args.repeats)], env=env, check=True)
        else:
            ops(args.threads, args.repeats, args.dtypes.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
