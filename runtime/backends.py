"""Graph runners: execute one engine graph (FULL, SPARSE or DENSE) on a backend.

Graphs in an engine file hold no weights; a runner attaches the engine's single copy of the
weights: ONNX Runtime sessions receive them as external initializers (no copy, shared between
the sessions), the PyTorch reference executor receives them as tensors.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable, Collection, Mapping, Protocol, Sequence

import numpy as np
import onnx

from sigec.core.errors import BackendError
from sigec.core.names import CACHE_PREFIX
from sigec.core.ops import DOMAIN
from sigec.core.options import BACKENDS
from sigec.runtime.device_mirror import DeviceMirror
from sigec.runtime.ort_binding import BFLOAT16, CacheBindings, ort_value, to_numpy



class GraphRunner(Protocol):
    """Runs one graph: feeds by name, returns the requested outputs as numpy arrays."""

    input_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Execute the graph."""


SMALL_WEIGHT_BYTES = 4096
# graph -> ONNX Runtime's CPU memory arena on. FULL runs without: its outputs are the caches, which
# the engine keeps (session.run's arrays wrap ONNX Runtime's buffers), so with the arena every primed
# key pins arena chunks and the arena extends by whole regions on the next prime: the church UNet
# held 1.2 GiB beyond 4 keys' 1.4 GiB of caches, and evicted keys never returned memory to the
# system. Without it each cache is its own allocation, freed with the key. SPARSE and DENSE keep
# theirs (buffers reused run after run). BENCHMARKS.md, "ONNX Runtime arena and primes".
ARENAS = {"full": False, "sparse": True, "dense": True}
OPTIMIZED_SUFFIX = "_optimized.onnx"  # written next to a profile: the graph after ONNX Runtime's optimisations


def _declare_external_weights(model: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> list[str]:
    """Attach the weights the graph reads: small ones (shapes, pads, scales, which ONNX Runtime's
    shape inference must see) embedded, large ones as external initializers; return the latter."""
    used = {i for node in model.graph.node for i in node.input}
    present = {t.name for t in model.graph.initializer}
    names = []
    for name in sorted(used & set(weights)):
        if name in present:
            continue
        array = weights[name]
        if array.nbytes <= SMALL_WEIGHT_BYTES or array.dtype.kind in "iub":
            model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
            continue
        t = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                             dims=list(array.shape), data_location=onnx.TensorProto.EXTERNAL)
        entry = t.external_data.add()
        entry.key, entry.value = "location", "sigec-engine-weights"
        model.graph.initializer.append(t)
        names.append(name)
    return names


def session_options(threads: int | None, *, spinning: bool = False, arena: bool = True) -> Any:
    """ONNX Runtime options of every sigec session (and of the benchmarks' dense baselines): all graph
    optimisations, ``threads`` intra-op threads (None: ONNX Runtime's choice) and one inter-op thread,
    intra-op spin-waiting off by default: an engine holds three sessions (a service often several
    engines), and idle workers spinning after a run steal cores from the next session's run
    (BENCHMARKS.md, "Thread spinning"); ``arena``: ONNX Runtime's CPU memory arena (``ARENAS``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.enable_cpu_mem_arena = arena
    return options


class OrtRunner:
    """An ONNX Runtime session with sigec's custom operators registered."""

    def __init__(self, model: onnx.ModelProto, weights: Mapping[str, np.ndarray], *, threads: int | None,
                 weight_values: dict[str, object], profile_prefix: str | None = None, arena: bool = True) -> None:
        import onnxruntime as ort

        from sigec.runtime import ort_ops

        model = onnx.ModelProto.FromString(model.SerializeToString())
        names = _declare_external_weights(model, weights)
        options = session_options(threads, arena=arena)
        self.run_options: Any = None  # onnxruntime.RunOptions of every run (None: the defaults)
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
            # The graph ONNX Runtime actually runs (layout reorders included), to attribute kernel times.
            options.optimized_model_filepath = profile_prefix + OPTIMIZED_SUFFIX
            options.log_severity_level = 3  # the saved graph is machine-specific: expected, not worth a warning
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             os.path.basename(profile_prefix) + OPTIMIZED_SUFFIX + ".data")
        if any(n.domain == DOMAIN for n in model.graph.node):
            ort_ops.register(options)
        for name in names:
            if name not in weight_values:
                weight_values[name] = ort.OrtValue.ortvalue_from_numpy(np.asarray(weights[name], order="C"))
        if names:
            options.add_external_initializers(names, [weight_values[n] for n in names])
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BackendError(f"ONNX Runtime could not create a session for graph '{model.graph.name}': {exc}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._input_set = frozenset(self.input_names)  # a set: feeds hold hundreds of names
        # bfloat16 outputs (FULL's half caches) cannot come back through session.run's numpy conversion
        self._bfloat16_outputs = frozenset(o.name for o in self.session.get_outputs() if o.type == "tensor(bfloat16)")

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Execute the graph with ONNX Runtime (bfloat16 inputs or outputs go through ``OrtValue``s)."""
        feeds = {k: v for k, v in feeds.items() if k in self._input_set}
        if self._bfloat16_outputs.isdisjoint(output_names) and \
                not any(getattr(v, "dtype", None) == BFLOAT16 for v in feeds.values()):
            return self.session.run(list(output_names), feeds, self.run_options)
        values = {k: ort_value(np.ascontiguousarray(v)) for k, v in feeds.items()}
        return [to_numpy(v) for v in self.session.run_with_ort_values(list(output_names), values, self.run_options)]

    def bind_caches(self, caches: Mapping[str, np.ndarray]) -> CacheBindings:
        """Bindings of this session with ``caches`` bound once (runtime/ort_binding.py); their ``run``
        takes only the per-run inputs."""
        return CacheBindings(self.session, caches, owner=self)


class TorchRunner:
    """The PyTorch reference executor (CPU or CUDA).

    With ``resident_caches`` (default: on for any device but the CPU) the engine's cache arrays are
    copied to the device once and reused by later runs (``runtime/device_mirror.py``); the engine
    calls :meth:`forget` for caches it changes.
    """

    def __init__(self, model: onnx.ModelProto, weights: Mapping[str, np.ndarray], *, device: str = "cpu",
                 threads: int | None = None, resident_caches: bool | None = None) -> None:
        import torch

        from sigec.runtime.torch_executor import TorchExecutor, array_to_tensor

        if threads:
            torch.set_num_threads(int(threads))
        used = {i for node in model.graph.node for i in node.input}
        self.executor = TorchExecutor(model, device=device, initializers={k: v for k, v in weights.items() if k in used})
        self.input_names = list(self.executor.input_names)
        target = torch.device(device)
        resident = resident_caches if resident_caches is not None else target.type != "cpu"
        self.mirror = DeviceMirror(lambda a: array_to_tensor(np.ascontiguousarray(a)).to(target, copy=True)) \
            if resident else None

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Execute the graph with the reference executor."""
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        if self.mirror is not None:
            feeds = {k: self.mirror.get(v) if k.startswith(CACHE_PREFIX) and isinstance(v, np.ndarray) else v
                     for k, v in feeds.items()}
        from sigec.runtime.torch_executor import tensor_to_array

        out = self.executor.run(feeds, list(output_names))
        return [tensor_to_array(out[n].detach().cpu()) for n in output_names]

    def forget(self, arrays: Sequence[np.ndarray]) -> None:
        """Drop device copies of cache arrays the engine changed."""
        if self.mirror is not None:
            self.mirror.forget(arrays)


class LazyRunner:
    """A runner created on its first run (thread-safe): an ONNX Runtime session holds its own
    prepacked copy of the weights, so a session that may never run should not exist yet."""

    def __init__(self, make: Callable[[], GraphRunner], input_names: list[str]) -> None:
        self._make = make
        self._runner: GraphRunner | None = None
        self._lock = threading.Lock()
        self.input_names = input_names

    @property
    def created(self) -> bool:
        """Whether the runner exists (it has run, or is being created now)."""
        return self._runner is not None

    def runner(self) -> GraphRunner:
        """The runner, created now if it does not exist yet."""
        runner = self._runner
        if runner is None:
            with self._lock:
                if self._runner is None:
                    self._runner = self._make()
                runner = self._runner
        return runner

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Create the runner if needed, then run it."""
        return self.runner().run(feeds, output_names)

    def __getattr__(self, name: str) -> Any:
        """Other attributes are the runner's once it exists; ``session`` creates it (the engine's optional
        hooks such as ``forget`` must not)."""
        if name == "session":
            return self.runner().session  # type: ignore[attr-defined]
        if name.startswith("_") or self._runner is None:
            raise AttributeError(name)
        return getattr(self._runner, name)


# Graphs whose ONNX Runtime session is created on first use. DENSE runs only for edits past the dense
# fallback fraction and for run_dense; its session's copy of the weights is a third of a loaded
# engine's private memory (full-size SD 1.5 UNet: 10.2 GiB of anonymous memory after load with it,
# 7.3 GiB without; the memory-mapped weights.bin adds 3.2 GiB of clean, reclaimable file pages).
LAZY_SESSIONS = frozenset({"dense"})


def make_runners(backend: str, graphs: Mapping[str, onnx.ModelProto], weights: Mapping[str, np.ndarray], *,
                 threads: int | None = None, device: str = "cpu",
                 profile: Mapping[str, str] | None = None, manifest: Mapping[str, object] | None = None,
                 blobs: Mapping[str, bytes] | None = None, precision: str | None = None,
                 arenas: Mapping[str, bool] | None = None,
                 lazy: Collection[str] = LAZY_SESSIONS) -> dict[str, GraphRunner]:
    """One runner per graph name, sharing one copy of the weights (``profile``: graph -> ORT profile prefix;
    ``arenas``: graph -> ONNX Runtime memory arena on, overriding ``ARENAS``; ``lazy``: graphs whose
    ONNX Runtime session is created on first use, see ``LAZY_SESSIONS``).

    ``tensorrt`` runs the engine file's plans (``manifest`` and ``blobs`` of the engine file; ``precision``
    picks fp32 or fp16 plans) instead of the graphs.
    """
    if backend == "tensorrt":
        from sigec.runtime.tensorrt_runner import make_tensorrt_runners

        return make_tensorrt_runners(manifest or {}, blobs or {}, list(graphs), precision=precision, device=device)
    if backend == "ort":
        shared: dict[str, object] = {}
        arenas = {**ARENAS, **(arenas or {})}

        def ort_runner(name: str, g: onnx.ModelProto) -> OrtRunner:
            return OrtRunner(g, weights, threads=threads, weight_values=shared,
                             profile_prefix=(profile or {}).get(name), arena=arenas.get(name, True))

        return {name: LazyRunner(functools.partial(ort_runner, name, g), [i.name for i in g.graph.input])
                if name in lazy else ort_runner(name, g) for name, g in graphs.items()}
    if backend == "torch":
        return {name: TorchRunner(g, weights, device=device, threads=threads) for name, g in graphs.items()}
    raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
