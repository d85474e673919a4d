"""``tiny_local``: a small generator built only of spatially local ops (sigec's built-in demo model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sigec.apps.zoo.weights import seeded, with_random_image


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv (padding keeps the size at stride 1) followed by BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class TinyLocalGenerator(nn.Module):
    """Encoder-decoder with one downsampling level, a residual block and a concat skip.

    stem 3x3 -> stride-2 3x3 -> residual block (3x3, 1x1, add) -> nearest x2 -> 3x3 ->
    concat with the stem output -> 1x1 -> 3x3 -> tanh. Every op is local, so sparse
    recomputation of this model can be exact.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, channels: int = 16) -> None:
        super().__init__()
        c = channels
        self.stem = _conv_bn(in_channels, c, 3)
        self.down = _conv_bn(c, 2 * c, 3, stride=2)
        self.res_a = _conv_bn(2 * c, 2 * c, 3)
        self.res_b = _conv_bn(2 * c, 2 * c, 1)
        self.up = _conv_bn(2 * c, c, 3)
        self.fuse = nn.Conv2d(2 * c, c, 1)
        self.head = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        skip = F.leaky_relu(self.stem(image), 0.2)
        x = F.relu(self.down(skip))
        x = F.relu(x + self.res_b(F.relu(self.res_a(x))))
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.leaky_relu(self.up(x), 0.2)
        x = F.relu(self.fuse(torch.cat([x, skip], dim=1)))
        return torch.tanh(self.head(x))


def tiny_local(
    small: bool = False,
    batch: int = 1,
    *,
    size: int | None = None,
    channels: int | None = None,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build ``tiny_local`` with random weights: small = 32 px, 8 channels; full = 256 px, 64 channels.

    Returns ``(module.eval(), {"image": [batch, 3, size, size] in [-1, 1]})``; ``size`` must be even.
    """
    size = size or (32 if small else 256)
    channels = channels or (8 if small else 64)
    if size % 2:
        raise ValueError(f"tiny_local needs an even size, got {size}")
    with seeded(seed):
        model = TinyLocalGenerator(channels=channels)
        return with_random_image(model, batch=batch, size=size, seed=seed)
