"""sigec's operators as TensorRT quickly deployable plugins (``tensorrt.plugin``) with AOT kernels.

Importing this module registers, in namespace ``sigec``, one plugin per annotated node form of
:mod:`sigec.passes.annotate_tensorrt` (``TileScatter`` and the eight ``TileGather[_vals][_scale][_shift]``):

- ``@trtp.register``: output ``[N, C, window_h, window_w]`` (TileGather; ``N`` = coords' first,
  dynamic, dimension) or ``base``'s shape (TileScatter), the dtype of ``base``;
- ``@trtp.autotune``: float I/O all FP32 or all FP16, index inputs INT64, linear formats;
- ``@trtp.aot_impl``: the PTX of :mod:`sigec.gpu.tensorrt_kernels` compiled by Triton for the
  build GPU, the launch grid and the int32 extra arguments (``N`` symbolic). The PTX is stored in
  the plan, so a plan runs without Python or this module (TensorRT's C++ runtime, ``trtexec``).

Everything that does not need TensorRT lives in ``tensorrt_kernels`` and is tested without it;
this module needs ``tensorrt >= 10.9`` and was written against these documentation pages (it has
NOT run here: no TensorRT or GPU on the development machine):

- https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/tensorrt.plugin/trt_plugin_register.html
  (attribute types: int, float, str, bool, bytes, 1-D ``numpy.typing.NDArray``)
- https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/tensorrt.plugin/trt_plugin_aot_impl/index.html
  (returns kernel name, PTX, ``KernelLaunchParams``, ``SymIntExprs``; attributes are not serialized)
- https://docs.nvidia.com/deeplearning/tensorrt/latest/%5Fstatic/python-api/infer/tensorrt.plugin/trt_plugin_aot_impl/KernelLaunchParams.html
- https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/tensorrt.plugin/Functions/index.html
  (``trtp.max``, ``trtp.cdiv``) and .../tensorrt.plugin/Shape/ShapeExpr.html
- https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/tensorrt.plugin/trt_plugin_autotune/AutoTuneCombination.html
- NVIDIA/TensorRT samples/python/quickly_deployable_plugins (README, qdp_defs.py): ONNX nodes map
  to a plugin by ``op_type`` + string attribute ``plugin_namespace``, ``aot = 1`` picks the AOT
  implementation; AOT kernels take inputs, then ``SymIntExprs`` extra args, then outputs; a plan
  with AOT plugins "does not require any Python modules or definitions to be present at runtime".
"""

from __future__ import annotations

from typing import Any, Callable, List, Tuple

import numpy as np
import numpy.typing as npt
import tensorrt as trt
import tensorrt.plugin as trtp

from sigec.core.errors import BackendError
from sigec.core.tensorrt_abi import ALL_GATHER_PLUGINS, PLUGIN_NAMESPACE, decode_gather_attrs, gather_plugin_groups
from sigec.gpu import tensorrt_kernels as tk

_DTYPES = {trt.float32: "float32", trt.float16: "float16"}


def _dtype(desc: Any, where: str) -> str:
    if desc.dtype not in _DTYPES:
        raise BackendError(f"{where}: unsupported dtype {desc.dtype} (float32 or float16)")
    return _DTYPES[desc.dtype]


def _static(desc: Any, where: str) -> list[int]:
    dims = []
    for d in desc.shape_expr:
        if not d.is_constant:
            raise BackendError(f"{where}: input dimensions other than the tile count must be static")
        dims.append(int(d.constant_value()))
    return dims


def _capability() -> int:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _aot_result(plan: tk.LaunchPlan, n_expr: Any) -> tuple[bytes, bytes, Any, Any]:
    """(kernel name, PTX, launch params, extra args) for ``plan`` with ``N`` = ``n_expr``."""
    kernel = tk.compile_plugin_kernel(plan, _capability())
    params = trtp.KernelLaunchParams()
    grid = [trtp.max(n_expr, 1) if g is tk.GRID_N else int(g) for g in plan.grid]
    params.grid_x, params.grid_y, params.grid_z = grid
    params.block_x = kernel.block_x
    params.shared_mem = kernel.shared_mem
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(n_expr if v is tk.N else int(v)) for _, v in plan.extra_args])
    return kernel.name.encode(), kernel.ptx.encode(), params, extra


# ---------------------------------------------------------------------------------------------- implementations


def _gather_desc(name: str, inputs: dict[str, Any], geometry: Any, params: Any) -> Any:
    base, coords = inputs["base"], inputs["coords"]
    window = [int(geometry[0]), int(geometry[1])]
    return trtp.from_shape_expr((coords.shape_expr[0], base.shape_expr[1], *window), dtype=base.dtype)


def _gather_autotune(name: str, inputs: dict[str, Any], geometry: Any, params: Any) -> list[Any]:
    kinds = ["INT64|INT64" if key in ("grid", "coords") else "FP32|FP16" for key in inputs] + ["FP32|FP16"]
    return [trtp.AutoTuneCombination(",".join(kinds))]


def _gather_plan(name: str, geometry: Any, params: Any, *, dtype: str, base_shape: list[int],
                 vals_tile: int | None, grid_shape: list[int] | None, scale_rank: int | None,
                 shift_rank: int | None) -> tk.LaunchPlan:
    where = f"{PLUGIN_NAMESPACE}::{name}"
    attrs = decode_gather_attrs(geometry, params, where)
    return tk.gather_launch(attrs, dtype=dtype, base_shape=base_shape, vals_tile=vals_tile, grid_shape=grid_shape,
                            scale_rank=scale_rank, shift_rank=shift_rank, where=where)


def _gather_aot(name: str, inputs: dict[str, Any], geometry: Any, params: Any) -> tuple:
    where = f"{PLUGIN_NAMESPACE}::{name}"
    vals, grid = inputs.get("vals"), inputs.get("grid")
    plan = _gather_plan(
        name, geometry, params, dtype=_dtype(inputs["base"], where), base_shape=_static(inputs["base"], where),
        vals_tile=None if vals is None else int(vals.shape_expr[2].constant_value()),
        grid_shape=None if grid is None else _static(grid, where),
        scale_rank=len(inputs["scale"].shape_expr) if "scale" in inputs else None,
        shift_rank=len(inputs["shift"].shape_expr) if "shift" in inputs else None)
    return _aot_result(plan, inputs["coords"].shape_expr[0])


def _launch_jit(plan: tk.LaunchPlan, inputs: list[Any], output: Any, n: int, stream: int) -> None:
    """The Python (JIT) implementation: the same kernel launched by Triton on TensorRT's stream."""
    import torch

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        tensors = [torch.as_tensor(t, device="cuda") for t in inputs]
        tk.launch(plan, tensors, torch.as_tensor(output, device="cuda"), n)


def _gather_impl(name: str, inputs: dict[str, Any], geometry: Any, params: Any, outputs: Any, stream: int) -> None:
    where = f"{PLUGIN_NAMESPACE}::{name}"
    shape = {k: [int(d) for d in t.shape] for k, t in inputs.items()}
    plan = _gather_plan(
        name, geometry, params, dtype=_dtype(inputs["base"], where), base_shape=shape["base"],
        vals_tile=shape["vals"][2] if "vals" in shape else None, grid_shape=shape.get("grid"),
        scale_rank=len(shape["scale"]) if "scale" in shape else None,
        shift_rank=len(shape["shift"]) if "shift" in shape else None)
    _launch_jit(plan, list(inputs.values()), outputs[0], shape["coords"][0], stream)


def _scatter_plan(base_shape: list[int], vals_tile: int, dtype: str) -> tk.LaunchPlan:
    return tk.scatter_launch(dtype=dtype, base_shape=base_shape, tile=vals_tile,
                             where=f"{PLUGIN_NAMESPACE}::TileScatter")


# ---------------------------------------------------------------------------------------------- registration

# TensorRT reads each plugin's inputs and attributes from the decorated functions' signatures, so
# every plugin gets real functions with its own parameter list (generated below).
_NAMESPACE = {"trtp": trtp, "np": np, "npt": npt, "Tuple": Tuple, "List": List}


def _define(fn_name: str, params: list[str], returns: str, body: str, env: dict[str, Any]) -> Callable:
    source = f"def {fn_name}({', '.join(params)}) -> {returns}:\n    return {body}\n"
    scope = {**_NAMESPACE, **env}
    exec(compile(source, f"<sigec plugin {fn_name}>", "exec"), scope)  # noqa: S102 - fixed templates, no user input
    return scope[fn_name]


def _register_gather(name: str) -> None:
    groups = gather_plugin_groups(name)
    inputs = ["base"] + (["vals", "grid"] if "vals" in groups else []) + ["coords"] + \
        [g for g in ("scale", "shift") if g in groups]
    tensors = [f"{i}: trtp.TensorDesc" for i in inputs]
    attrs = ["geometry: npt.NDArray[np.int32]", "params: npt.NDArray[np.float32]"]
    call = f"{name!r}, {{{', '.join(f'{i!r}: {i}' for i in inputs)}}}, geometry, params"
    env = {"_desc": _gather_desc, "_tune": _gather_autotune, "_aot": _gather_aot, "_impl": _gather_impl}
    plugin_id = f"{PLUGIN_NAMESPACE}::{name}"
    trtp.register(plugin_id)(_define(f"{name}_desc", tensors + attrs, "trtp.TensorDesc", f"_desc({call})", env))
    trtp.autotune(plugin_id)(_define(f"{name}_autotune", tensors + attrs + ["outputs: Tuple[trtp.TensorDesc]"],
                                     "List[trtp.AutoTuneCombination]", f"_tune({call})", env))
    trtp.aot_impl(plugin_id)(_define(f"{name}_aot", tensors + attrs + ["outputs: Tuple[trtp.TensorDesc]",
                                                                       "tactic: int"],
                                     "Tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymExprs]",
                                     f"_aot({call})", env))
    impl_params = [t.replace("TensorDesc", "Tensor") for t in tensors] + attrs + ["outputs: Tuple[trtp.Tensor]",
                                                                              "stream: int"]
    trtp.impl(plugin_id)(_define(f"{name}_impl", impl_params, "None", f"_impl({call}, outputs, stream)", env))


def _register_scatter() -> None:
    plugin_id = f"{PLUGIN_NAMESPACE}::TileScatter"

    @trtp.register(plugin_id)
    def tile_scatter_desc(base: trtp.TensorDesc, vals: trtp.TensorDesc, coords: trtp.TensorDesc) -> trtp.TensorDesc:
        return base.like()

    @trtp.autotune(plugin_id)
    def tile_scatter_autotune(base: trtp.TensorDesc, vals: trtp.TensorDesc, coords: trtp.TensorDesc,
                              outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16,FP32|FP16,INT64|INT64,FP32|FP16")]

    @trtp.aot_impl(plugin_id)
    def tile_scatter_aot(base: trtp.TensorDesc, vals: trtp.TensorDesc, coords: trtp.TensorDesc,
                         outputs: Tuple[trtp.TensorDesc], tactic: int
                         ) -> Tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        where = f"{plugin_id} (base)"
        plan = _scatter_plan(_static(base, where), int(vals.shape_expr[2].constant_value()), _dtype(base, where))
        return _aot_result(plan, coords.shape_expr[0])

    @trtp.impl(plugin_id)
    def tile_scatter_impl(base: trtp.Tensor, vals: trtp.Tensor, coords: trtp.Tensor, outputs: Tuple[trtp.Tensor],
                          stream: int) -> None:
        plan = _scatter_plan([int(d) for d in base.shape], int(vals.shape[2]), _dtype(base, plugin_id))
        _launch_jit(plan, [base, vals, coords], outputs[0], int(coords.shape[0]), stream)


for _name in ALL_GATHER_PLUGINS:
    _register_gather(_name)
_register_scatter()
