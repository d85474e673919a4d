"""PyTorch frontend: load a model factory named on the command line and export a module to ONNX."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import onnx
import onnx_ir as ir
import torch
from torch import nn

from sigec.core.errors import CompileError

ExampleInputs = Union[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]
"""Example inputs in canonical form: positional tensors, or forward-parameter name -> tensor."""

_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch._export", "torch.fx",
                  "onnxscript", "onnx_ir")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_SUMMARY_LIMIT = 500


# ----------------------------------------------------------------------------------------------
# load_factory
# ----------------------------------------------------------------------------------------------


def normalize_inputs(inputs: object) -> ExampleInputs | None:
    """Bring example inputs into canonical form: a tensor -> 1-tuple, a list -> tuple, a dict kept.

    Raises CompileError for anything that is not a tensor, a sequence of tensors or a dict of
    str -> tensor. ``None`` stays ``None``.
    """
    if inputs is None:
        return None
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)):
        bad = [type(x).__name__ for x in inputs if not isinstance(x, torch.Tensor)]
        if bad:
            raise CompileError(f"example inputs must all be tensors, got {', '.join(bad)}")
        return tuple(inputs)
    if isinstance(inputs, Mapping):
        bad = [repr(k) for k, v in inputs.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise CompileError(f"example input dict must map str -> tensor; bad entries: {', '.join(bad)}")
        return dict(inputs)
    raise CompileError("example inputs must be a tensor, a tuple of tensors or a dict name -> tensor, "
                       f"got {type(inputs).__name__}")


def _import_module(module_name: str) -> Any:
    """Import ``module_name``; retry once with the working directory on sys.path (console scripts lack it)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing_self = exc.name is not None and module_name.startswith(exc.name)
        cwd = os.getcwd()
        if missing_self and cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)
            return _import_module(module_name)
        raise


def load_factory(spec: str) -> tuple[nn.Module, ExampleInputs | None]:
    """Call the factory named ``pkg.module:factory`` and return ``(module, example_inputs)``.

    The factory (a zero-argument callable; dotted attribute paths allowed) returns either a module
    or ``(module, example_inputs)`` with inputs a tensor, a tuple of tensors or a dict
    name -> tensor (normalised by :func:`normalize_inputs`; ``None`` when the factory gives none).
    An ``nn.Module`` instance named directly is returned as is. Every failure is a CompileError.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name.strip() or not attr_path.strip():
        raise CompileError(f"bad model spec {spec!r}: expected 'pkg.module:factory'")
    try:
        owner = _import_module(module_name)
    except Exception as exc:
        raise CompileError(f"cannot import module {module_name!r} (from {spec!r}): "
                           f"{type(exc).__name__}: {exc}") from exc
    target: Any = owner
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CompileError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    if isinstance(target, nn.Module):
        return target, None
    if not callable(target):
        raise CompileError(f"{spec!r} is a {type(target).__name__}, not a callable factory")
    try:
        result = target()
    except Exception as exc:
        raise CompileError(f"factory {spec!r} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(result, nn.Module):
        return result, None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        return result[0], normalize_inputs(result[1])
    raise CompileError(f"factory {spec!r} must return an nn.Module or (nn.Module, example_inputs), "
                       f"got {type(result).__name__}")


# ----------------------------------------------------------------------------------------------
# export_module
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters: warnings, their loggers and what they print to stdout/stderr."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()),
              contextlib.redirect_stderr(io.StringIO())):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _summarize(error: BaseException) -> str:
    """One line for an exporter error: its type and the first line of its (exception summary) text."""
    text = _ANSI_ESCAPE.sub("", str(error))
    marker = "## Exception summary"
    body = text.split(marker, 1)[1] if marker in text else text
    first = next((line.strip() for line in body.splitlines() if line.strip()), "")
    summary = f"{type(error).__name__}: {first}"
    return summary if len(summary) <= _SUMMARY_LIMIT else summary[: _SUMMARY_LIMIT - 3] + "..."


def _forward_parameters(module: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return []


def _bind_inputs(module: nn.Module, inputs: ExampleInputs) -> tuple[tuple, dict, list[str]]:
    """Split example inputs into exporter ``args``/``kwargs`` and the Python name of every tensor, in order."""
    params = _forward_parameters(module)
    if isinstance(inputs, tuple):
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        var = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), "input")
        names = [positional[i].name if i < len(positional) else f"{var}_{i}" for i in range(len(inputs))]
        return inputs, {}, names
    try:
        bound = inspect.signature(module.forward).bind(**inputs)
    except (TypeError, ValueError) as exc:
        accepted = ", ".join(p.name for p in params) or "?"
        raise CompileError(f"example inputs {sorted(inputs)} do not fit forward({accepted}): {exc}") from exc
    args, kwargs = tuple(bound.args), dict(bound.kwargs)
    names = [p.name for p in params[: len(args)]] + list(kwargs)
    return args, kwargs, names


def _export_dynamo(module: nn.Module, args: tuple, kwargs: dict, opset: int) -> ir.Model:
    program = torch.onnx.export(module, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                                verbose=False, external_data=False)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model


def _export_torchscript(module: nn.Module, args: tuple, kwargs: dict, opset: int) -> ir.Model:
    buffer = io.BytesIO()
    torch.onnx.export(module, args, buffer, kwargs=kwargs or None, dynamo=False, opset_version=opset,
                      verbose=False, do_constant_folding=True)
    return ir.from_proto(onnx.load_from_string(buffer.getvalue()))


def _all_value_names(graph: ir.Graph) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {}
    for value in [*graph.inputs, *graph.initializers.values()]:
        if value.name:
            values[value.name] = value
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in node.outputs:
            if value.name:
                values[value.name] = value
    return values


def _rename(graph: ir.Graph, value: ir.Value, name: str) -> None:
    """Give ``value`` the name ``name``, first moving any other value of that name out of the way."""
    if value.name == name:
        return
    taken = _all_value_names(graph)
    other = taken.get(name)
    if other is not None and other is not value:
        suffix = 1
        while f"{name}_{suffix}" in taken:
            suffix += 1
        other.name = f"{name}_{suffix}"
    value.name = name


def _name_inputs(graph: ir.Graph, python_names: list[str], wanted: Sequence[str]) -> None:
    """Rename the graph inputs (one per example tensor, same order) to ``wanted``."""
    if len(graph.inputs) == len(python_names):
        pairs = list(zip(graph.inputs, wanted))
    else:  # the exporter dropped unused inputs: match the rest by their Python names
        by_name = dict(zip(python_names, wanted))
        pairs = [(v, by_name[v.name]) for v in graph.inputs if v.name in by_name]
    for value, name in pairs:
        _rename(graph, value, name)


def _name_outputs(graph: ir.Graph, wanted: Sequence[str]) -> None:
    """Rename the graph outputs to ``wanted``, giving each output a value of its own if needed."""
    if len(wanted) != len(graph.outputs):
        raise CompileError(f"{len(wanted)} output names given, but the model has {len(graph.outputs)} outputs")
    for index, name in enumerate(wanted):
        value = graph.outputs[index]
        shared = (value in graph.inputs or value.is_initializer()
                  or sum(v is value for v in graph.outputs) > 1)
        if shared:  # a graph input/initializer or repeated output: give the output its own value
            node = ir.node("Identity", [value])
            graph.append(node)
            value = node.outputs[0]
            graph.outputs[index] = value
        _rename(graph, value, name)


def export_module_ir(
    module: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = 18,
) -> ir.Model:
    """Export ``module`` (put in eval mode) with static shapes to an in-memory ONNX model whose
    weights stay the module's tensors (no copy, no protobuf: any size).

    Uses ``torch.onnx.export(dynamo=True)``; if that fails, warns and retries with the TorchScript
    exporter. Input names: ``input_names``, else the dict keys, else the forward's parameter names
    (in forward order). Output names: ``output_names``, else ``output`` (one output) or
    ``output_0``, ``output_1``, ... Raises CompileError with the exporter's message on failure.
    """
    if not isinstance(module, nn.Module):
        raise CompileError(f"export_module needs an nn.Module, got {type(module).__name__}")
    example = normalize_inputs(inputs)
    if example is None:
        raise CompileError("export_module needs example inputs")
    module.eval()
    args, kwargs, python_names = _bind_inputs(module, example)
    if input_names is not None and len(input_names) != len(python_names):
        raise CompileError(f"{len(input_names)} input names given for {len(python_names)} example inputs")
    try:
        with _quiet(), torch.no_grad():
            model = _export_dynamo(module, args, kwargs, opset)
    except Exception as dynamo_error:
        warnings.warn(f"dynamo export failed ({_summarize(dynamo_error)}); "
                      "falling back to the TorchScript exporter", RuntimeWarning, stacklevel=2)
        try:
            with _quiet(), torch.no_grad():
                model = _export_torchscript(module, args, kwargs, opset)
        except Exception as script_error:
            raise CompileError(f"cannot export {type(module).__name__} to ONNX; dynamo exporter: "
                               f"{_summarize(dynamo_error)}; TorchScript exporter: "
                               f"{_summarize(script_error)}") from script_error
    graph = model.graph
    _name_inputs(graph, python_names, list(input_names) if input_names is not None else python_names)
    if output_names is None:
        count = len(graph.outputs)
        output_names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    _name_outputs(graph, list(output_names))
    return model


def export_module(
    module: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = 18,
) -> onnx.ModelProto:
    """:func:`export_module_ir` as an ``onnx.ModelProto`` with inferred shapes (protobuf holds at
    most 2 GiB: larger models compile from :func:`export_module_ir`'s in-memory model)."""
    model = export_module_ir(module, inputs, input_names=input_names, output_names=output_names, opset=opset)
    try:
        proto = ir.to_proto(model)
        return onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise CompileError(f"shape inference failed on the exported model: {exc}") from exc
