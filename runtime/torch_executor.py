"""The PyTorch reference executor: runs an ONNX model (standard ops and ``ai.sigec`` ops) on any
torch device. It is the executable specification native backends are tested against, so it uses
no ONNX Runtime code; op semantics live in :mod:`sigec.runtime.torch_onnx_ops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import external_data_helper, helper, inliner, numpy_helper

from sigec.core.errors import BackendError, InputError, SigecError

from .torch_onnx_ops import ONNX_DOMAINS, lookup_op
from .torch_onnx_ops_common import NodeAttrs, OpFn, torch_dtype

TensorLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class _Step:
    """One node, resolved: its implementation, decoded attributes and value names ("" = absent)."""

    label: str
    op: OpFn
    attrs: NodeAttrs
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class _Plan:
    """The steps needed for a set of outputs, each with the values to free after it runs."""

    steps: tuple[tuple[_Step, tuple[str, ...]], ...]
    required_inputs: frozenset[str]


def _node_label(index: int, node: onnx.NodeProto) -> str:
    """How errors name a node: its name (or position) and its op type."""
    domain = f"{node.domain}::" if node.domain not in ONNX_DOMAINS else ""
    name = repr(node.name) if node.name else f"#{index}"
    return f"node {name} ({domain}{node.op_type})"


_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``array``'s memory (C-contiguous arrays; bfloat16 ones, ``ml_dtypes``',
    through their 16-bit patterns, so half caches stay bfloat16)."""
    if array.dtype == _BFLOAT16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def tensor_to_array(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array (bfloat16 as ``ml_dtypes.bfloat16``, which numpy lacks)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(_BFLOAT16)
    return tensor.numpy()


def _numpy_to_torch(array: np.ndarray, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """Copy a numpy array to a torch tensor on ``device`` (optionally converting its dtype)."""
    array = np.asarray(array, order="C")  # (np.ascontiguousarray would turn 0-D into 1-D)
    try:
        tensor = array_to_tensor(array if array.flags.writeable else array.copy())
    except TypeError:  # numpy dtypes torch lacks (e.g. ml_dtypes float8): go through float32
        tensor = torch.from_numpy(array.astype(np.float32))
    return tensor.to(device=device, dtype=dtype or tensor.dtype)


def _tensor_from_proto(proto: onnx.TensorProto, device: torch.device) -> torch.Tensor:
    """Decode a ``TensorProto`` (inline data) to a torch tensor on ``device``."""
    if external_data_helper.uses_external_data(proto) and not proto.raw_data:
        raise BackendError(
            f"tensor {proto.name!r} stores its data externally; load the model with its external data "
            "or pass the tensor through initializers="
        )
    return _numpy_to_torch(numpy_helper.to_array(proto), torch_dtype(proto.data_type), device)


def _sparse_from_proto(proto: onnx.SparseTensorProto, device: torch.device) -> torch.Tensor:
    """Decode a ``SparseTensorProto`` to a dense torch tensor."""
    values = numpy_helper.to_array(proto.values)
    indices = numpy_helper.to_array(proto.indices).astype(np.int64)
    dims = tuple(proto.dims)
    dense = np.zeros(int(np.prod(dims)), dtype=values.dtype)
    flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), dims)
    dense[flat] = values
    return _numpy_to_torch(dense.reshape(dims), torch_dtype(proto.values.data_type), device)


def _decode_attribute(attr: onnx.AttributeProto, device: torch.device) -> Any:
    """An attribute as a Python value: strings decoded, tensors as torch tensors."""
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, onnx.TensorProto):
        return _tensor_from_proto(value, device)
    if isinstance(value, onnx.SparseTensorProto):
        return _sparse_from_proto(value, device)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8") for v in value]
    if isinstance(value, list) and value and isinstance(value[0], onnx.TensorProto):
        return [_tensor_from_proto(v, device) for v in value]
    return value


def _as_output_tuple(result: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Normalize an op's result to a tuple of tensors."""
    return (result,) if isinstance(result, torch.Tensor) else tuple(result)


class TorchExecutor:
    """Run an ONNX model with PyTorch on CPU or CUDA.

    ``initializers`` supplies weights that are not stored in the graph: names read by the graph
    that the proto does not hold (graph inputs or external initializers) are looked up there, and
    they override graph initializers of the same name. Everything is converted to torch once.
    Nodes run in proto order (which must be topological); intermediates are freed after their
    last use.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        *,
        device: str | torch.device = "cpu",
        initializers: Mapping[str, np.ndarray | torch.Tensor] | None = None,
    ) -> None:
        self._device = torch.device(device)
        if len(model.functions) > 0:
            model = inliner.inline_local_functions(model)
        graph = model.graph
        self._opsets = {("" if o.domain in ONNX_DOMAINS else o.domain): o.version for o in model.opset_import}
        self._weights = self._load_weights(graph, initializers or {})
        self._graph_inputs = {vi.name: vi for vi in graph.input}
        self._input_names = [vi.name for vi in graph.input if vi.name not in self._weights]
        self._output_names = [vi.name for vi in graph.output]
        self._steps = self._resolve_nodes(graph)
        self._check_order()
        self._plans: dict[tuple[str, ...], _Plan] = {}

    # -- public interface ----------------------------------------------------------------------

    @property
    def input_names(self) -> list[str]:
        """Graph inputs that must be fed (not initializers, not supplied weights)."""
        return list(self._input_names)

    @property
    def output_names(self) -> list[str]:
        """Graph outputs, in graph order."""
        return list(self._output_names)

    @property
    def device(self) -> torch.device:
        """The device the model runs on."""
        return self._device

    def run(
        self,
        feeds: Mapping[str, np.ndarray | torch.Tensor],
        output_names: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the graph on ``feeds`` and return the requested outputs (default: all graph outputs).

        ``output_names`` may also name intermediate values; only the nodes they need run.
        Raises :class:`InputError` for missing, unknown or mistyped feeds and
        :class:`BackendError` when a node fails.
        """
        names = tuple(output_names) if output_names is not None else tuple(self._output_names)
        plan = self._plan(names)
        env = self._bind_feeds(feeds, plan.required_inputs)
        with torch.inference_mode():
            for step, release in plan.steps:
                args = [self._value(env, name) if name else None for name in step.inputs]
                for name, value in zip(step.outputs, self._call(step, args)):
                    if name:
                        env[name] = value
                for name in release:
                    env.pop(name, None)
            return {name: self._output_value(env, name) for name in names}

    # -- construction --------------------------------------------------------------------------

    def _load_weights(self, graph: onnx.GraphProto, supplied: Mapping[str, TensorLike]) -> dict[str, torch.Tensor]:
        """Graph initializers and the supplied weights the graph refers to, as torch tensors."""
        referenced = {vi.name for vi in graph.input} | {vi.name for vi in graph.output}
        referenced |= {name for node in graph.node for name in node.input}
        weights: dict[str, torch.Tensor] = {}
        for proto in graph.initializer:
            if proto.name not in supplied:
                weights[proto.name] = _tensor_from_proto(proto, self._device)
        for name, value in supplied.items():
            if name in referenced:
                weights[name] = self._to_device(value)
        return weights

    def _to_device(self, value: TensorLike) -> torch.Tensor:
        """A feed or weight as a torch tensor on the executor's device."""
        if isinstance(value, torch.Tensor):
            return value.to(self._device)
        return _numpy_to_torch(np.asarray(value), None, self._device)

    def _resolve_nodes(self, graph: onnx.GraphProto) -> list[_Step]:
        """Look up every node's implementation and decode its attributes; evaluate Constant nodes."""
        steps = []
        for index, node in enumerate(graph.node):
            label = _node_label(index, node)
            domain = "" if node.domain in ONNX_DOMAINS else node.domain
            op = lookup_op(domain, node.op_type)
            if op is None:
                raise BackendError(
                    f"{label}: op type {node.op_type!r} (domain {domain or 'ai.onnx'!r}) is not supported"
                )
            try:
                values = {attr.name: _decode_attribute(attr, self._device) for attr in node.attribute}
            except SigecError:
                raise
            except Exception as exc:
                raise BackendError(f"{label}: cannot decode attributes: {exc}") from exc
            attrs = NodeAttrs(values, self._opsets.get(domain, 1), len(node.output), self._device)
            step = _Step(label, op, attrs, tuple(node.input), tuple(node.output))
            if node.op_type == "Constant" and domain == "":
                self._weights[node.output[0]] = self._call(step, [])[0]
            else:
                steps.append(step)
        return steps

    def _check_order(self) -> None:
        """Every value must be available before it is read (the proto must be topologically sorted)."""
        produced_anywhere = {name for step in self._steps for name in step.outputs if name}
        available = set(self._weights) | set(self._graph_inputs)
        for step in self._steps:
            for name in step.inputs:
                if name and name not in available:
                    if name in produced_anywhere:
                        raise BackendError(
                            f"graph is not topologically sorted: {step.label} reads {name!r} before it is produced"
                        )
                    raise BackendError(
                        f"{step.label} reads {name!r}, which is neither a graph input, an initializer, a "
                        "supplied weight nor a node output"
                    )
            available.update(name for name in step.outputs if name)
        missing = [name for name in self._output_names if name not in available]
        if missing:
            raise BackendError(f"graph outputs {missing} are never produced")

    # -- execution -----------------------------------------------------------------------------

    def _plan(self, names: tuple[str, ...]) -> _Plan:
        """The needed steps for ``names`` with last-use release lists (cached per output tuple)."""
        if names in self._plans:
            return self._plans[names]
        produced = {name for step in self._steps for name in step.outputs if name}
        unknown = [n for n in names if n not in produced and n not in self._weights and n not in self._graph_inputs]
        if unknown:
            raise InputError(f"unknown output names {unknown}")
        needed, chosen = set(names), []
        for step in reversed(self._steps):
            if any(name in needed for name in step.outputs if name):
                chosen.append(step)
                needed.update(name for name in step.inputs if name)
        chosen.reverse()
        last_use: dict[str, int] = {}
        for index, step in enumerate(chosen):
            for name in (*step.inputs, *step.outputs):
                if name:
                    last_use[name] = index
        keep = set(names) | set(self._weights)
        release: list[list[str]] = [[] for _ in chosen]
        for name, index in last_use.items():
            if name not in keep:
                release[index].append(name)
        required = frozenset(n for n in needed if n in self._graph_inputs and n not in self._weights)
        plan = _Plan(tuple((s, tuple(r)) for s, r in zip(chosen, release)), required)
        self._plans[names] = plan
        return plan

    def _bind_feeds(self, feeds: Mapping[str, TensorLike], required: frozenset[str]) -> dict[str, torch.Tensor]:
        """Validate the feeds against the graph inputs and move them to the device."""
        unknown = [name for name in feeds if name not in self._graph_inputs]
        if unknown:
            raise InputError(f"unknown input names {unknown}; the model's inputs are {self._input_names}")
        missing = sorted(required - set(feeds))
        if missing:
            raise InputError(f"missing inputs {missing}")
        env = {}
        for name, value in feeds.items():
            try:
                tensor = self._to_device(value)
            except (TypeError, ValueError) as exc:
                raise InputError(f"input {name!r} cannot be converted to a tensor: {exc}") from exc
            self._check_feed(name, tensor)
            env[name] = tensor
        return env

    def _check_feed(self, name: str, tensor: torch.Tensor) -> None:
        """Check a feed's dtype and static dims against the graph input's declared type."""
        tensor_type = self._graph_inputs[name].type.tensor_type
        if tensor_type.elem_type and torch_dtype(tensor_type.elem_type) != tensor.dtype:
            expected = torch_dtype(tensor_type.elem_type)
            raise InputError(f"input {name!r} must have dtype {expected}, got {tensor.dtype}")
        if not tensor_type.HasField("shape"):
            return
        dims = tensor_type.shape.dim
        if len(dims) != tensor.dim():
            raise InputError(f"input {name!r} must have rank {len(dims)}, got shape {list(tensor.shape)}")
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value != tensor.shape[axis]:
                raise InputError(f"input {name!r} axis {axis} must be {dim.dim_value}, got shape {list(tensor.shape)}")

    def _value(self, env: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        """A value by name: computed/fed values first, then weights."""
        return env[name] if name in env else self._weights[name]

    def _output_value(self, env: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        """A requested output; weights are copied so that callers cannot modify them."""
        if name in env:
            return env[name]
        if name in self._weights:
            return self._weights[name].clone()
        raise InputError(f"output {name!r} is a graph input that was not fed")

    @staticmethod
    def _call(step: _Step, args: list[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
        """Run one node, turning unexpected failures into a :class:`BackendError` naming it."""
        try:
            outputs = _as_output_tuple(step.op(step.attrs, args))
        except SigecError:
            raise
        except Exception as exc:
            raise BackendError(f"{step.label} failed: {type(exc).__name__}: {exc}") from exc
        if len(outputs) < len(step.outputs):
            declared = [i for i, name in enumerate(step.outputs) if name]
            if declared and declared[-1] >= len(outputs):
                raise BackendError(f"{step.label} declares {len(step.outputs)} outputs but produces {len(outputs)}")
        return outputs
