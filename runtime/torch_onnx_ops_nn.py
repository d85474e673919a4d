"""Neural-network ONNX ops: convolutions, normalizations, pooling, matrix products, softmax, attention."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .torch_onnx_ops_common import (
    Inputs,
    NodeAttrs,
    OpFn,
    compute_dtype,
    normalize_axis,
    opt,
    resolve_pads,
    torch_pad_list,
)

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _channel_view(t: torch.Tensor, rank: int) -> torch.Tensor:
    """A per-channel ``[C]`` tensor shaped ``[1, C, 1, ...]`` to broadcast over an NC... map."""
    return t.reshape([1, -1] + [1] * (rank - 2))


# -- convolutions ------------------------------------------------------------------------------


def conv(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """N-D convolution (``group``, ``dilations``, ``strides``, ``pads`` or ``auto_pad``), bias optional."""
    data, weight, bias = x[0], x[1], opt(x, 2)
    n = data.dim() - 2
    strides = attrs.ints("strides", [1] * n)
    dilations = attrs.ints("dilations", [1] * n)
    begins, ends = resolve_pads(attrs, data.shape[2:], weight.shape[2:], strides, dilations)
    padding = begins
    if begins != ends:
        data, padding = F.pad(data, torch_pad_list(begins, ends)), [0] * n
    return _CONV[n](data, weight, bias, strides, padding, dilations, attrs.get("group", 1))


def _conv_transpose_pads(attrs: NodeAttrs, full: list[int], in_sizes: list[int], strides: list[int]):
    """Begin/end pads of ConvTranspose, from ``pads`` or derived from ``output_shape``/``auto_pad``.

    ``full`` is the output size with zero pads (including ``output_padding``).
    """
    n = len(full)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    output_shape = attrs.ints("output_shape")
    if output_shape is None and auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        if auto_pad == "VALID":
            return [0] * n, [0] * n
        pads = attrs.ints("pads", [0] * (2 * n))
        return pads[:n], pads[n:]
    target = output_shape[-n:] if output_shape is not None else [i * s for i, s in zip(in_sizes, strides)]
    totals = [f - t for f, t in zip(full, target)]
    if auto_pad == "SAME_UPPER":
        begins = [t // 2 for t in totals]
    else:
        begins = [t - t // 2 for t in totals]
    return begins, [t - b for t, b in zip(totals, begins)]


def conv_transpose(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """N-D transposed convolution: ``group``, ``dilations``, ``strides``, ``pads``,
    ``output_padding``, ``output_shape``/``auto_pad``; bias optional."""
    data, weight, bias = x[0], x[1], opt(x, 2)
    n = data.dim() - 2
    in_sizes, kernel = list(data.shape[2:]), list(weight.shape[2:])
    strides = attrs.ints("strides", [1] * n)
    dilations = attrs.ints("dilations", [1] * n)
    out_pad = attrs.ints("output_padding", [0] * n)
    full = [(i - 1) * s + (k - 1) * d + 1 + p for i, s, k, d, p in zip(in_sizes, strides, kernel, dilations, out_pad)]
    begins, ends = _conv_transpose_pads(attrs, full, in_sizes, strides)
    out = _CONV_TRANSPOSE[n](data, weight, None, strides, 0, 0, attrs.get("group", 1), dilations)
    # Positions past the last kernel tap (output_padding) receive no contribution; pads crop.
    out = F.pad(out, torch_pad_list([-b for b in begins], [p - e for p, e in zip(out_pad, ends)]))
    return out if bias is None else out + _channel_view(bias, out.dim())


# -- normalizations ----------------------------------------------------------------------------


def _standardize(data: torch.Tensor, dims: list[int], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` (biased variance), in float32 for half inputs.

    Returns the normalized tensor (compute dtype), the mean and the inverse standard deviation.
    """
    data = data.to(compute_dtype(data))
    mean = data.mean(dim=dims, keepdim=True)
    var = (data - mean).square().mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(var + eps)
    return (data - mean) * inv_std, mean, inv_std


def batch_normalization(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Inference batch norm: ``(x - mean) / sqrt(var + epsilon) * scale + bias`` per channel."""
    data, scale, bias, mean, var = x[0], x[1], x[2], x[3], x[4]
    ct, rank = compute_dtype(data), data.dim()
    inv_std = torch.rsqrt(var.to(ct) + attrs.get("epsilon", 1e-5))
    out = (data.to(ct) - _channel_view(mean.to(ct), rank)) * _channel_view(inv_std * scale.to(ct), rank)
    return (out + _channel_view(bias.to(ct), rank)).to(data.dtype)


def instance_normalization(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Normalize each (sample, channel) over its spatial axes, then per-channel ``scale``/``B``."""
    data, scale, bias = x[0], x[1], x[2]
    normed, _, _ = _standardize(data, list(range(2, data.dim())), attrs.get("epsilon", 1e-5))
    rank, ct = data.dim(), normed.dtype
    out = normed * _channel_view(scale.to(ct), rank) + _channel_view(bias.to(ct), rank)
    return out.to(data.dtype)


def group_normalization(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Normalize each of ``num_groups`` channel groups per sample, then scale/bias.

    ``scale``/``bias`` are per group in opset 18 and per channel from opset 21.
    """
    data, scale, bias = x[0], x[1], x[2]
    groups, channels = int(attrs["num_groups"]), data.shape[1]
    grouped = data.reshape(data.shape[0], groups, -1)
    normed, _, _ = _standardize(grouped, [2], attrs.get("epsilon", 1e-5))
    normed = normed.reshape(data.shape)
    if attrs.opset < 21:
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    rank, ct = data.dim(), normed.dtype
    out = normed * _channel_view(scale.to(ct), rank) + _channel_view(bias.to(ct), rank)
    return out.to(data.dtype)


def layer_normalization(attrs: NodeAttrs, x: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize over axes ``axis..`` (default -1), then ``* Scale + B``; also Mean and InvStdDev."""
    data, scale, bias = x[0], x[1], opt(x, 2)
    axis = normalize_axis(attrs.get("axis", -1), data.dim())
    normed, mean, inv_std = _standardize(data, list(range(axis, data.dim())), attrs.get("epsilon", 1e-5))
    out = normed * scale.to(normed.dtype)
    if bias is not None:
        out = out + bias.to(normed.dtype)
    return out.to(data.dtype), mean, inv_std


# -- pooling -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PoolGeometry:
    """Window geometry of a pool node over the spatial axes."""

    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    begins: list[int]  # begin pads
    ends: list[int]  # end pads
    ceil_extension: list[int]  # extra end positions read by the last ceil_mode windows

    @property
    def padded_ends(self) -> list[int]:
        """End pads including the ceil-mode extension."""
        return [e + x for e, x in zip(self.ends, self.ceil_extension)]


def _pool_geometry(attrs: NodeAttrs, in_sizes: list[int]) -> _PoolGeometry:
    """Kernel, strides, dilations and pads of a pool; with ``ceil_mode`` the output size rounds
    up, but the last window must start inside the input or its begin padding."""
    n = len(in_sizes)
    kernel = attrs.ints("kernel_shape")
    strides = attrs.ints("strides", [1] * n)
    dilations = attrs.ints("dilations", [1] * n)
    begins, ends = resolve_pads(attrs, in_sizes, kernel, strides, dilations)
    extension = []
    for size, k, s, d, b, e in zip(in_sizes, kernel, strides, dilations, begins, ends):
        span = (k - 1) * d + 1
        count = (size + b + e - span) // s + 1
        if attrs.get("ceil_mode", 0):
            count = -(-(size + b + e - span) // s) + 1
            if (count - 1) * s >= size + b:
                count -= 1
        extension.append(max((count - 1) * s + span - (size + b + e), 0))
    return _PoolGeometry(kernel, strides, dilations, begins, ends, extension)


def max_pool(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Max over windows (``kernel_shape``, ``strides``, ``pads``, ``dilations``, ``ceil_mode``)."""
    data = x[0]
    if attrs.num_outputs > 1:
        raise NotImplementedError("MaxPool's Indices output is not supported")
    g = _pool_geometry(attrs, list(data.shape[2:]))
    lowest = -math.inf if data.is_floating_point() else torch.iinfo(data.dtype).min
    padded = F.pad(data, torch_pad_list(g.begins, g.padded_ends), value=lowest)
    return _MAX_POOL[len(g.kernel)](padded, g.kernel, g.strides, 0, g.dilations)


def _window_sum(data: torch.Tensor, g: _PoolGeometry) -> torch.Tensor:
    """Sum over every (dilated) window of each channel of an already padded map."""
    n, c = data.shape[:2]
    flat = data.reshape(n * c, 1, *data.shape[2:])
    ones = torch.ones([1, 1, *g.kernel], dtype=data.dtype, device=data.device)
    out = _CONV[len(g.kernel)](flat, ones, None, g.strides, 0, g.dilations)
    return out.reshape(n, c, *out.shape[2:])


def average_pool(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Mean over windows; the divisor counts pad positions only with ``count_include_pad``, and
    never the positions past the end pads read by ceil-mode windows."""
    data = x[0]
    ct = compute_dtype(data)
    spatial = list(data.shape[2:])
    g = _pool_geometry(attrs, spatial)
    total = _window_sum(F.pad(data.to(ct), torch_pad_list(g.begins, g.padded_ends)), g)
    counted = torch.ones([1, 1, *spatial], dtype=ct, device=data.device)
    if attrs.get("count_include_pad", 0):
        counted = F.pad(counted, torch_pad_list(g.begins, g.ends), value=1.0)
        counted = F.pad(counted, torch_pad_list([0] * len(spatial), g.ceil_extension))
    else:
        counted = F.pad(counted, torch_pad_list(g.begins, g.padded_ends))
    return (total / _window_sum(counted, g)).to(data.dtype)


def global_average_pool(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Mean over all spatial axes, kept as size-1 axes."""
    data = x[0]
    return data.to(compute_dtype(data)).mean(dim=list(range(2, data.dim())), keepdim=True).to(data.dtype)


def global_max_pool(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Max over all spatial axes, kept as size-1 axes."""
    return torch.amax(x[0], dim=list(range(2, x[0].dim())), keepdim=True)


# -- matrix products and softmax -----------------------------------------------------------------


def matmul(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """numpy ``matmul`` semantics (batched, 1-D operands promoted)."""
    return torch.matmul(x[0], x[1])


def gemm(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """``alpha * A' @ B' + beta * C`` with optional transposes and broadcast ``C``."""
    a, b, c = x[0], x[1], opt(x, 2)
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    out = a @ b
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        out = out * alpha
    if c is not None:
        out = out + (c if beta == 1.0 else c * beta)
    return out


def einsum(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Einstein summation by ``equation`` (numpy conventions, ``...`` allowed)."""
    return torch.einsum(attrs["equation"].replace(" ", ""), *[t for t in x if t is not None])


def _softmax_family(fn: Callable[..., torch.Tensor]) -> OpFn:
    """Softmax/LogSoftmax: along ``axis`` (default -1) from opset 13; before that the input is
    coerced to 2-D at ``axis`` (default 1) and normalized over the trailing block."""

    def op(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
        data = x[0]
        if attrs.opset >= 13:
            return fn(data, dim=attrs.get("axis", -1))
        axis = normalize_axis(attrs.get("axis", 1), data.dim())
        flat = data.reshape(math.prod(data.shape[:axis]), -1)
        return fn(flat, dim=1).reshape(data.shape)

    return op


# -- attention -----------------------------------------------------------------------------------


def _to_heads(t: torch.Tensor, heads: int | None) -> torch.Tensor:
    """``[B, S, H*D]`` -> ``[B, H, S, D]``; 4-D inputs are already in head layout."""
    if t.dim() == 4:
        return t
    b, s, hidden = t.shape
    return t.reshape(b, s, heads, hidden // heads).transpose(1, 2)


def attention(attrs: NodeAttrs, x: Inputs) -> tuple[torch.Tensor, ...]:
    """ONNX Attention (opset 23): ``softmax(softcap(Q K^T * scale) + mask) V``.

    Supports 3-D and 4-D layouts, grouped KV heads, boolean or additive ``attn_mask``,
    ``past_key``/``past_value`` (returned concatenated as present_*), ``is_causal``
    (bottom-right aligned with the past), ``scale``, ``softcap`` and ``qk_matmul_output_mode``.
    Fully masked rows give zeros.
    """
    q_in, k, v = x[0], x[1], x[2]
    mask, past_key, past_value = opt(x, 3), opt(x, 4), opt(x, 5)
    q = _to_heads(q_in, attrs.get("q_num_heads"))
    k = _to_heads(k, attrs.get("kv_num_heads"))
    v = _to_heads(v, attrs.get("kv_num_heads"))
    if past_key is not None:
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    present_key, present_value = k, v
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scale = attrs.get("scale", 1.0 / math.sqrt(q.shape[3]))
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    raw_scores = scores
    softcap = attrs.get("softcap", 0.0)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    capped_scores = scores
    q_len, kv_len = q.shape[2], k.shape[2]
    bias = torch.zeros((q_len, kv_len), dtype=scores.dtype, device=scores.device)
    if mask is not None:
        if mask.shape[-1] < kv_len:
            mask = F.pad(mask, [0, kv_len - mask.shape[-1]], value=False if mask.dtype == torch.bool else -math.inf)
        bias = bias + (torch.where(mask, 0.0, -math.inf).to(scores.dtype) if mask.dtype == torch.bool else mask)
    if attrs.get("is_causal", 0):
        offset = 0 if past_key is None else past_key.shape[2]
        rows = torch.arange(q_len, device=scores.device)[:, None]
        cols = torch.arange(kv_len, device=scores.device)[None, :]
        bias = bias + torch.where(cols <= rows + offset, 0.0, -math.inf).to(scores.dtype)
    scores = scores + bias
    row_max = scores.amax(dim=-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(torch.isneginf(row_max), torch.zeros_like(probs), probs)
    out = torch.matmul(probs, v)
    if q_in.dim() == 3:
        out = out.transpose(1, 2).reshape(q_in.shape[0], q_len, -1)
    mode = attrs.get("qk_matmul_output_mode", 0)
    qk_out = (raw_scores, capped_scores, scores, probs)[mode]
    return out, present_key, present_value, qk_out


NN_OPS: dict[str, OpFn] = {
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "BatchNormalization": batch_normalization,
    "InstanceNormalization": instance_normalization,
    "GroupNormalization": group_normalization,
    "LayerNormalization": layer_normalization,
    "MaxPool": max_pool,
    "AveragePool": average_pool,
    "GlobalAveragePool": global_average_pool,
    "GlobalMaxPool": global_max_pool,
    "MatMul": matmul,
    "Gemm": gemm,
    "Einsum": einsum,
    "Softmax": _softmax_family(torch.softmax),
    "LogSoftmax": _softmax_family(torch.log_softmax),
    "Attention": attention,
}
