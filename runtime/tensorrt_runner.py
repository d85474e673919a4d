"""Run an engine file's TensorRT plans (backend ``tensorrt``): one GraphRunner per graph.

Plans are tied to the TensorRT version and the GPU they were built on; both are recorded in the
manifest section ``tensorrt`` (:mod:`sigec.passes.tensorrt_build`) and checked before a plan is
deserialized. The sigec plugins' kernels are inside the plans (AOT), so running needs neither
Triton nor :mod:`sigec.gpu.tensorrt_plugins`. Feeds and results are numpy arrays (the
GraphRunner protocol); they travel through torch CUDA tensors on the current stream.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from sigec.core.errors import BackendError

from sigec.core.tensorrt_abi import blob_name, missing_requirements


def select_plans(manifest: Mapping[str, Any], blobs: Mapping[str, bytes], graphs: Sequence[str],
                 precision: str | None) -> dict[str, bytes]:
    """The plan of each graph in ``precision`` (default: fp32 when built, else the first built one)."""
    section = manifest.get("tensorrt")
    if not section or not section.get("plans"):
        raise BackendError("this engine file has no TensorRT plans; add them on the GPU machine with "
                           "`sigec build-trt ENGINE` (or compile with --backend tensorrt there)")
    built = list(section["precisions"])
    chosen = precision or ("fp32" if "fp32" in built else built[0])
    if chosen not in built:
        raise BackendError(f"this engine file has TensorRT plans for {built}, not {chosen!r}")
    plans = {}
    for graph in graphs:
        name = blob_name(graph, chosen)
        if name not in blobs:
            raise BackendError(f"the TensorRT plan '{name}' for the {graph.upper()} graph is missing from the engine")
        plans[graph] = blobs[name]
    return plans


def check_environment(section: Mapping[str, Any], tensorrt_version: str, capability: Sequence[int],
                      device_name: str) -> None:
    """Raise BackendError when the plans were built for another TensorRT version or GPU."""
    if section["tensorrt_version"] != tensorrt_version:
        raise BackendError(f"the TensorRT plans were built with TensorRT {section['tensorrt_version']}, this is "
                           f"{tensorrt_version}; rebuild them here with `sigec build-trt ENGINE`")
    built = [int(v) for v in section["device"]["compute_capability"]]
    if built != [int(v) for v in capability]:
        raise BackendError(f"the TensorRT plans were built for {section['device']['name']} (compute capability "
                           f"{built[0]}.{built[1]}), this GPU is {device_name} ({capability[0]}.{capability[1]}); "
                           "rebuild them here with `sigec build-trt ENGINE`")


class TensorRTRunner:
    """One deserialized plan with its execution context."""

    def __init__(self, plan: bytes, *, graph: str, device: str = "cuda") -> None:
        import tensorrt as trt
        import torch

        self.trt, self.torch, self.graph = trt, torch, graph
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise BackendError(f"TensorRT could not deserialize the plan of the {graph.upper()} graph")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Execute the plan on the feeds (numpy) and return the requested outputs (numpy)."""
        torch = self.torch
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BackendError(f"the {self.graph.upper()} plan needs inputs {missing}")
        unknown = [n for n in output_names if n not in self.output_names]
        if unknown:
            raise BackendError(f"the {self.graph.upper()} plan has no outputs {unknown}")
        keep = []
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream()
            for name in self.input_names:
                array = np.ascontiguousarray(feeds[name], dtype=self._dtype(name))
                # an empty input still gets a valid address (a one-element buffer)
                tensor = torch.from_numpy(array if array.size else np.zeros(1, array.dtype)).to(self.device)
                keep.append(tensor)
                if not self.context.set_input_shape(name, tuple(array.shape)):
                    raise BackendError(f"the {self.graph.upper()} plan rejects input '{name}' of shape "
                                       f"{list(array.shape)} (outside its optimization profile?)")
                self.context.set_tensor_address(name, tensor.data_ptr())
            results = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = torch.from_numpy(np.zeros(0, self._dtype(name))).dtype
                buffer = torch.empty(max(int(np.prod(shape)), 1), dtype=dtype, device=self.device)
                results[name] = (buffer, shape)
                self.context.set_tensor_address(name, buffer.data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise BackendError(f"TensorRT failed to run the {self.graph.upper()} plan")
            stream.synchronize()
            out = []
            for name in output_names:
                buffer, shape = results[name]
                count = int(np.prod(shape))
                out.append(buffer[:count].reshape(shape).cpu().numpy())
        return out


def make_tensorrt_runners(manifest: Mapping[str, Any], blobs: Mapping[str, bytes], graphs: Sequence[str], *,
                          precision: str | None = None, device: str = "cuda") -> dict[str, TensorRTRunner]:
    """One TensorRTRunner per graph; BackendError naming what is missing or mismatched."""
    problems = missing_requirements()
    if problems:
        raise BackendError("the TensorRT backend cannot run here: " + "; ".join(problems)
                           + ". Use backend='ort' or backend='torch' on this machine")
    plans = select_plans(manifest, blobs, graphs, precision)
    import tensorrt as trt
    import torch

    dev = torch.device("cuda" if device in ("cpu", "cuda") else device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    check_environment(manifest["tensorrt"], trt.__version__, torch.cuda.get_device_capability(index),
                      torch.cuda.get_device_name(index))
    return {graph: TensorRTRunner(plan, graph=graph, device=f"cuda:{index}") for graph, plan in plans.items()}
