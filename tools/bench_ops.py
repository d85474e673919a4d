#!/usr/bin/env python3
"""Micro-benchmark of the ONNX Runtime kernels TileGather and TileScatter (not a test).

Default case: C = 128, a 256 x 256 map, 8 x 8 tiles, 5% of the tiles active; TileGather reads the
10 x 10 window of a 3x3 convolution for every active tile (from vals where the neighbouring tile is
active, from base elsewhere); TileScatter writes the tiles into a copy of the map. Throughput is the
size of the op's output divided by its time, next to a plain numpy copy of the same number of bytes
(and, for TileGather, numpy slicing of the same windows).
The ops run through IOBinding with a preallocated output, on `--threads` intra-op threads.

Usage: python tools/bench_ops.py [--threads 2] [--channels 128] [--size 256] [--tile 8] [--frac 0.05]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from sigec.runtime import ort_ops


def _timeit(fn: Callable[[], object], repeat: int) -> float:
    """Wall-clock seconds of one call: the best of `repeat` calls after two warm-up calls (the
    minimum is the estimate least disturbed by other processes on a shared machine)."""
    fn()
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.min(times))


def _session(node, inputs: dict[str, np.ndarray], threads: int) -> ort.InferenceSession:
    infos = [
        helper.make_tensor_value_info(
            name, TensorProto.INT64 if arr.dtype == np.int64 else TensorProto.FLOAT, list(arr.shape)
        )
        for name, arr in inputs.items()
    ]
    graph = helper.make_graph([node], "bench", infos, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.sigec", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    ort_ops.register(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _bound_run(
    sess: ort.InferenceSession, inputs: dict[str, np.ndarray], out_shape
) -> tuple[Callable[[], None], np.ndarray]:
    """A zero-copy IOBinding run with a preallocated output; returns (run, output array)."""
    out = np.empty(out_shape, np.float32)
    binding = sess.io_binding()
    for name, arr in inputs.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
    binding.bind_ortvalue_output("out", ort.OrtValue.ortvalue_from_numpy(out))
    return (lambda: sess.run_with_iobinding(binding)), out


def _numpy_copy_gbps(nbytes: int, repeat: int) -> float:
    src = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    dst = np.empty_like(src)
    return nbytes / _timeit(lambda: np.copyto(dst, src), repeat) / 1e9


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one line per measurement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--tile", type=int, default=8)
    parser.add_argument("--frac", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    c, size, t = args.channels, args.size, args.tile
    cells = size // t
    active = np.argwhere(rng.random((1, cells, cells)) < args.frac)
    n = len(active)
    grid = -np.ones((1, cells, cells), np.int64)
    grid[tuple(active.T)] = np.arange(n)
    base = rng.standard_normal((1, c, size, size)).astype(np.float32)
    vals = rng.standard_normal((n, c, t, t)).astype(np.float32)
    coords = active.astype(np.int64)
    window = t + 2
    print(f"map 1x{c}x{size}x{size}, tile {t}, {n} active tiles ({n / cells**2:.1%}), {args.threads} threads")

    gather_inputs = {"base": base, "vals": vals, "grid": grid, "coords": coords}
    node = helper.make_node(
        "TileGather",
        list(gather_inputs),
        ["out"],
        domain="ai.sigec",
        window=[window, window],
        step=[t, t],
        offset=[-1, -1],
    )
    sess = _session(node, gather_inputs, args.threads)
    run, _ = _bound_run(sess, gather_inputs, (n, c, window, window))
    nbytes = n * c * window * window * 4
    secs = _timeit(run, args.repeat)
    copy = _numpy_copy_gbps(nbytes, args.repeat)
    print(
        f"TileGather  {window}x{window} windows: {nbytes / 1e6:7.2f} MB out in {secs * 1e3:7.3f} ms = "
        f"{nbytes / secs / 1e9:6.2f} GB/s | numpy copy of the same bytes: {copy:6.2f} GB/s"
    )

    padded = np.pad(base, ((0, 0), (0, 0), (1, 1), (1, 1)))
    origins = [(int(y) * t, int(x) * t) for _, y, x in coords]
    np_secs = _timeit(lambda: np.stack([padded[0, :, y : y + window, x : x + window] for y, x in origins]), args.repeat)
    print(f"            numpy slicing of the same windows from base (1 thread): {nbytes / np_secs / 1e9:6.2f} GB/s")

    affine_inputs = dict(
        gather_inputs, scale=rng.standard_normal(c).astype(np.float32), shift=rng.standard_normal(c).astype(np.float32)
    )
    node = helper.make_node(
        "TileGather",
        list(affine_inputs),
        ["out"],
        domain="ai.sigec",
        window=[window, window],
        step=[t, t],
        offset=[-1, -1],
        activation="silu",
    )
    sess = _session(node, affine_inputs, args.threads)
    run, _ = _bound_run(sess, affine_inputs, (n, c, window, window))
    secs = _timeit(run, args.repeat)
    print(f"TileGather  + scale/shift/SiLU prologue: {secs * 1e3:7.3f} ms = {nbytes / secs / 1e9:6.2f} GB/s")

    scatter_inputs = {"base": base, "vals": vals, "coords": coords}
    node = helper.make_node("TileScatter", list(scatter_inputs), ["out"], domain="ai.sigec")
    sess = _session(node, scatter_inputs, args.threads)
    run, _ = _bound_run(sess, scatter_inputs, base.shape)
    nbytes = base.nbytes
    secs = _timeit(run, args.repeat)
    copy = _numpy_copy_gbps(nbytes, args.repeat)
    print(
        f"TileScatter full map:     {nbytes / 1e6:7.2f} MB out in {secs * 1e3:7.3f} ms = "
        f"{nbytes / secs / 1e9:6.2f} GB/s | numpy copy of the same bytes: {copy:6.2f} GB/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
