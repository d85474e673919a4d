"""``resnet9``: the pix2pix / CycleGAN ResNet generator with 9 residual blocks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sigec.apps.zoo.weights import seeded, with_random_image


def _norm_factory(norm: str) -> Callable[[int], nn.Module]:
    if norm == "instance":
        return lambda ch: nn.InstanceNorm2d(ch, affine=False, track_running_stats=False)
    if norm == "batch":
        return nn.BatchNorm2d
    raise ValueError(f"norm must be 'instance' or 'batch', got {norm!r}")


class ResnetBlock(nn.Module):
    """x + (reflect pad 1, 3x3 conv, norm, ReLU, reflect pad 1, 3x3 conv, norm)(x)."""

    def __init__(self, dim: int, norm: Callable[[int], nn.Module], bias: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), norm(dim), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), norm(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """7x7 conv, two stride-2 convs, ``n_blocks`` residual blocks, two transposed convs, 7x7 conv, tanh."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64,
                 n_blocks: int = 9, norm: str = "instance") -> None:
        super().__init__()
        make_norm = _norm_factory(norm)
        bias = norm == "instance"  # convs before an affine BatchNorm need no bias
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7, bias=bias), make_norm(ngf), nn.ReLU(),
        ]
        for mult in (1, 2):
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=bias),
                       make_norm(ngf * mult * 2), nn.ReLU()]
        layers += [ResnetBlock(ngf * 4, make_norm, bias) for _ in range(n_blocks)]
        for mult in (4, 2):
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1,
                                          output_padding=1, bias=bias),
                       make_norm(ngf * mult // 2), nn.ReLU()]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)


def resnet9(
    small: bool = False,
    batch: int = 1,
    *,
    norm: str = "instance",
    size: int | None = None,
    ngf: int | None = None,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build the ResNet-9 generator: full = 256 px, ngf 64; small = 64 px, ngf 8.

    ``norm="instance"`` (the published default, InstanceNorm without affine) or ``"batch"``
    (BatchNorm with random affine parameters and statistics calibrated on the example input).
    Returns ``(module.eval(), {"image": [batch, 3, size, size] in [-1, 1]})``; size must be a
    multiple of 4.
    """
    size = size or (64 if small else 256)
    ngf = ngf or (8 if small else 64)
    if size % 4:
        raise ValueError(f"resnet9 needs a size that is a multiple of 4, got {size}")
    with seeded(seed):
        model = ResnetGenerator(ngf=ngf, norm=norm)
        return with_random_image(model, batch=batch, size=size, seed=seed)
