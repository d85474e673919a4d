"""ONNX ops that move, select or create data: shapes, slicing, gathering, padding, constants."""

from __future__ import annotations

import math

import torch

from .torch_onnx_ops_common import Inputs, NodeAttrs, OpFn, normalize_axis, opt, present, to_ints


def _shape_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """A 1-D int64 tensor of shape values."""
    return torch.tensor(values, dtype=torch.int64, device=device)


# -- joining and splitting -----------------------------------------------------------------------


def concat(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Join the inputs along ``axis``."""
    tensors = [t for t in x if t is not None]
    return torch.cat(tensors, dim=normalize_axis(attrs["axis"], tensors[0].dim()))


def split(attrs: NodeAttrs, x: Inputs) -> tuple[torch.Tensor, ...]:
    """Split along ``axis`` by the ``split`` input/attribute, else into equal parts.

    Without ``split`` the parts number ``num_outputs`` (opset 18) or the node's outputs; when the
    axis does not divide evenly the last part is the smaller one.
    """
    data = x[0]
    axis = normalize_axis(attrs.get("axis", 0), data.dim())
    split_input = opt(x, 1)
    sizes = to_ints(split_input) if present(split_input) else attrs.ints("split")
    if sizes is None:
        parts = int(attrs.get("num_outputs", attrs.num_outputs))
        dim = data.shape[axis]
        chunk = -(-dim // parts)
        sizes = [chunk] * (parts - 1) + [dim - chunk * (parts - 1)]
    return tuple(torch.split(data, sizes, dim=axis))


# -- slicing and gathering ---------------------------------------------------------------------


def _slice_axis(data: torch.Tensor, axis: int, start: int, end: int, step: int) -> torch.Tensor:
    """``data[start:end:step]`` along one axis with ONNX Slice clamping (steps may be negative)."""
    if step == 0:
        raise ValueError("Slice step must not be 0")
    dim = data.shape[axis]
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        index = (slice(None),) * axis + (slice(start, end, step),)
        return data[index]
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    positions = torch.arange(start, end, step, device=data.device)
    return data.index_select(axis, positions)


def slice_(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Strided slices over ``axes``: inputs ``starts, ends, axes, steps`` (attributes before opset 10)."""
    data = x[0]
    if attrs.opset < 10:
        starts, ends, axes, steps = attrs.ints("starts"), attrs.ints("ends"), attrs.ints("axes"), None
    else:
        starts, ends = to_ints(x[1]), to_ints(x[2])
        axes = to_ints(x[3]) if opt(x, 3) is not None else None
        steps = to_ints(x[4]) if opt(x, 4) is not None else None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for axis, start, end, step in zip(axes, starts, ends, steps):
        data = _slice_axis(data, normalize_axis(axis, data.dim()), start, end, step)
    return data


def gather(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``data`` indexed along ``axis`` by ``indices`` (negative indices count from the end)."""
    data, indices = x[0], x[1].long()
    axis = normalize_axis(attrs.get("axis", 0), data.dim())
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    out = data.index_select(axis, indices.reshape(-1))
    return out.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1 :])


def gather_elements(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``out[i][j] = data[indices[i][j]][j]`` for ``axis`` 0, and so on (``torch.gather``)."""
    data, indices = x[0], x[1].long()
    axis = normalize_axis(attrs.get("axis", 0), data.dim())
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    return torch.gather(data, axis, indices)


# -- shape manipulation ------------------------------------------------------------------------


def scatter_nd(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """A copy of ``data`` with the slices addressed by the last axis of ``indices`` replaced by
    ``updates`` (reduction ``none`` only; duplicate indices are undefined in ONNX)."""
    if (attrs.get("reduction", "none") or "none") != "none":
        raise ValueError("ScatterND with a reduction is not supported")
    data, indices, updates = x[0], x[1].long(), x[2]
    k = indices.shape[-1]
    out = data.clone()
    index = tuple(indices.reshape(-1, k).unbind(1))
    out[index] = updates.reshape(-1, *data.shape[k:]).to(out.dtype)
    return out


def scatter_elements(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """A copy of ``data`` with ``data[..., indices[i], ...] = updates[i]`` along ``axis`` (reduction
    ``none`` only; negative indices count from the end)."""
    if (attrs.get("reduction", "none") or "none") != "none":
        raise ValueError("ScatterElements with a reduction is not supported")
    data, indices, updates = x[0], x[1].long(), x[2]
    axis = normalize_axis(attrs.get("axis", 0), data.dim())
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    return data.clone().scatter_(axis, indices, updates.to(data.dtype))


def reshape(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Reshape to the ``shape`` input: ``-1`` is inferred, ``0`` copies the input dim unless ``allowzero``."""
    data, shape = x[0], to_ints(x[1])
    if not attrs.get("allowzero", 0):
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return data.reshape(shape)


def flatten(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Reshape to 2-D: dims before ``axis`` (default 1) become rows, the rest columns."""
    data = x[0]
    axis = attrs.get("axis", 1)
    axis = axis + data.dim() if axis < 0 else axis
    return data.reshape(math.prod(data.shape[:axis]), math.prod(data.shape[axis:]))


def transpose(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Permute the axes by ``perm`` (default: reversed)."""
    perm = attrs.ints("perm", list(reversed(range(x[0].dim()))))
    return x[0].permute(perm)


def _axes_arg(attrs: NodeAttrs, x: Inputs) -> list[int] | None:
    """``axes`` from the second input (opset >= 13) or the attribute (older)."""
    axes_input = opt(x, 1)
    return to_ints(axes_input) if axes_input is not None else attrs.ints("axes")


def squeeze(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Remove the size-1 ``axes`` (all size-1 axes when none are given)."""
    data, axes = x[0], _axes_arg(attrs, x)
    if axes is None:
        axes = [i for i, d in enumerate(data.shape) if d == 1]
    axes = {normalize_axis(a, data.dim()) for a in axes}
    if any(data.shape[a] != 1 for a in axes):
        raise ValueError(f"Squeeze axes {sorted(axes)} of shape {list(data.shape)} are not all 1")
    return data.reshape([d for i, d in enumerate(data.shape) if i not in axes])


def unsqueeze(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Insert size-1 ``axes`` (positions in the output)."""
    data, axes = x[0], _axes_arg(attrs, x)
    out_rank = data.dim() + len(axes)
    for axis in sorted(normalize_axis(a, out_rank) for a in axes):
        data = data.unsqueeze(axis)
    return data


def expand(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Broadcast to the ``shape`` input (bidirectionally, as numpy)."""
    shape = torch.broadcast_shapes(x[0].shape, tuple(to_ints(x[1])))
    return x[0].expand(shape)


def tile(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Repeat along each axis by the ``repeats`` input."""
    return x[0].repeat(to_ints(x[1]))


def shape(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """The input's dims ``start:end`` (opset 15 attributes, clamped) as int64."""
    dims = list(x[0].shape)
    return _shape_tensor(dims[slice(attrs.get("start", 0), attrs.get("end"))], x[0].device)


def size(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """The input's element count as an int64 scalar."""
    return torch.tensor(x[0].numel(), dtype=torch.int64, device=x[0].device)


def depth_to_space(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Move ``blocksize**2`` channel groups into space; ``mode`` DCR (default) or CRD."""
    data, b = x[0], int(attrs["blocksize"])
    n, c, h, w = data.shape
    if attrs.get("mode", "DCR") == "DCR":
        out = data.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        out = data.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return out.reshape(n, c // (b * b), h * b, w * b)


def space_to_depth(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Move ``blocksize x blocksize`` spatial blocks into channels (inverse of DepthToSpace DCR)."""
    data, b = x[0], int(attrs["blocksize"])
    n, c, h, w = data.shape
    out = data.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return out.reshape(n, c * b * b, h // b, w // b)


# -- padding -----------------------------------------------------------------------------------


def _pad_positions(size: int, begin: int, end: int, mode: str, device: torch.device) -> torch.Tensor:
    """Source positions of a padded axis for modes ``edge``, ``reflect`` and ``wrap``."""
    pos = torch.arange(-begin, size + end, device=device)
    if mode == "edge":
        return pos.clamp(0, size - 1)
    if mode == "wrap":
        return torch.remainder(pos, size)
    if mode == "reflect":
        if size == 1:
            return torch.zeros_like(pos)
        period = 2 * (size - 1)
        r = torch.remainder(pos, period)
        return torch.where(r < size, r, period - r)
    raise ValueError(f"unknown Pad mode {mode!r}")


def _pad_axis(data: torch.Tensor, axis: int, begin: int, end: int, mode: str, value: float) -> torch.Tensor:
    """Pad (positive) or crop (negative) one axis."""
    dim = data.shape[axis]
    lo, hi = max(-begin, 0), dim - max(-end, 0)
    data = data.narrow(axis, lo, max(hi - lo, 0))
    begin, end = max(begin, 0), max(end, 0)
    if begin == 0 and end == 0:
        return data
    if mode != "constant":
        return data.index_select(axis, _pad_positions(data.shape[axis], begin, end, mode, data.device))
    parts = []
    for count in (begin, None, end):
        if count is None:
            parts.append(data)
        elif count > 0:
            fill_shape = list(data.shape)
            fill_shape[axis] = count
            parts.append(torch.full(fill_shape, value, dtype=data.dtype, device=data.device))
    return torch.cat(parts, dim=axis)


def pad(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Pad by ``pads`` (``[begin..., end...]`` over ``axes``), mode constant/reflect/edge/wrap.

    ``pads``/``constant_value``/``axes`` are inputs from opset 11 (``axes`` from 18) and
    attributes before; negative pads crop.
    """
    data = x[0]
    if attrs.opset < 11:
        pads, value, axes = attrs.ints("pads"), float(attrs.get("value", 0.0)), None
    else:
        pads = to_ints(x[1])
        value_t = opt(x, 2)
        value = value_t.reshape(-1)[0].item() if present(value_t) else 0
        axes = to_ints(x[3]) if opt(x, 3) is not None else None
    axes = list(range(data.dim())) if axes is None else axes
    n = len(axes)
    mode = attrs.get("mode", "constant")
    for axis, begin, end in zip(axes, pads[:n], pads[n:]):
        data = _pad_axis(data, normalize_axis(axis, data.dim()), begin, end, mode, value)
    return data


# -- creation ----------------------------------------------------------------------------------


def constant(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """The constant of whichever ``value*`` attribute is set (tensors decoded by the executor)."""
    for name in ("value", "sparse_value"):
        if name in attrs:
            return attrs[name]
    if "value_float" in attrs:
        return torch.tensor(attrs["value_float"], dtype=torch.float32, device=attrs.device)
    if "value_floats" in attrs:
        return torch.tensor(attrs["value_floats"], dtype=torch.float32, device=attrs.device)
    if "value_int" in attrs:
        return torch.tensor(attrs["value_int"], dtype=torch.int64, device=attrs.device)
    if "value_ints" in attrs:
        return torch.tensor(attrs["value_ints"], dtype=torch.int64, device=attrs.device)
    raise ValueError(f"Constant needs a supported value attribute, got {sorted(attrs.values)}")


def constant_of_shape(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """A tensor of the ``shape`` input filled with the one-element ``value`` (default float 0)."""
    value = attrs.get("value")
    if value is None:
        value = torch.zeros(1, dtype=torch.float32)
    return torch.full(to_ints(x[0]), value.reshape(-1)[0].item(), dtype=value.dtype, device=x[0].device)


def range_(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``start + i * delta`` for ``i < max(ceil((limit - start) / delta), 0)``."""
    start, limit, delta = x[0], x[1], x[2]
    count = max(math.ceil((limit - start).item() / delta.item()), 0)
    steps = torch.arange(count, dtype=start.dtype, device=start.device)
    return start + steps * delta


def trilu(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Upper (``upper`` 1, default) or lower triangle of the last two axes, diagonal offset ``k``."""
    k = int(x[1].item()) if opt(x, 1) is not None else 0
    return torch.triu(x[0], k) if attrs.get("upper", 1) else torch.tril(x[0], k)


def cum_sum(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Cumulative sum along the ``axis`` input; ``exclusive`` and ``reverse`` flags."""
    data = x[0]
    axis = normalize_axis(int(x[1].item()), data.dim())
    if attrs.get("reverse", 0):
        data = data.flip(axis)
    out = torch.cumsum(data, axis, dtype=data.dtype)
    if attrs.get("exclusive", 0):
        zeros = torch.zeros_like(data.narrow(axis, 0, 1))
        out = torch.cat([zeros, out.narrow(axis, 0, data.shape[axis] - 1)], dim=axis)
    return out.flip(axis) if attrs.get("reverse", 0) else out


def top_k(attrs: NodeAttrs, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``K`` largest (or smallest) values along ``axis`` and their int64 indices, sorted.

    Equal values keep the lower index first, as ONNX requires (stable sort).
    """
    data, k = x[0], int(x[1].reshape(-1)[0].item())
    axis = normalize_axis(attrs.get("axis", -1), data.dim())
    values, indices = torch.sort(data, dim=axis, descending=bool(attrs.get("largest", 1)), stable=True)
    return values.narrow(axis, 0, k), indices.narrow(axis, 0, k)


def non_zero(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Indices of the non-zero elements, ``[rank, count]`` int64, row-major order."""
    return torch.nonzero(x[0]).T.contiguous()


TENSOR_OPS: dict[str, OpFn] = {
    "Concat": concat,
    "Split": split,
    "Slice": slice_,
    "Gather": gather,
    "ScatterND": scatter_nd,
    "ScatterElements": scatter_elements,
    "GatherElements": gather_elements,
    "Reshape": reshape,
    "Flatten": flatten,
    "Transpose": transpose,
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Expand": expand,
    "Tile": tile,
    "Shape": shape,
    "Size": size,
    "DepthToSpace": depth_to_space,
    "SpaceToDepth": space_to_depth,
    "Pad": pad,
    "Constant": constant,
    "ConstantOfShape": constant_of_shape,
    "Range": range_,
    "Trilu": trilu,
    "CumSum": cum_sum,
    "TopK": top_k,
    "NonZero": non_zero,
}
