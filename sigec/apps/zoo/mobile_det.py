"""``mobile_det``: a mobile-class text detector in the layout of PP-OCR's DB detector.

Backbone: MobileNetV3-large (Howard et al., ICCV 2019) as PP-OCR's ``MobileNetV3`` detection
backbone builds it (``ppocr/modeling/backbones/det_mobilenet_v3.py``, model_name "large"): a
stride-2 3x3 stem (BN, HardSwish), fifteen inverted-residual blocks with the published kernels,
expansions, widths, activations and strides (all widths times ``scale``, rounded to multiples of 8),
and a final 1x1 conv (BN, HardSwish) to ``960 * scale`` channels; the four stage outputs at 1/4,
1/8, 1/16 and 1/32 of the input feed the neck. Squeeze-excitation (SE) blocks as PP-OCR writes
them: AdaptiveAvgPool2d(1) -> 1x1 conv (C/4) -> ReLU -> 1x1 conv (C) -> HardSigmoid -> the map
times the gate, on the depthwise output of the eight blocks MobileNetV3-large puts them on and,
on purpose, of the two 1/4-scale blocks too (``SE_EXTRA``): ten SE blocks, every scale from 1/4 to
1/32 pooling globally, as the trained PP-OCRv4 detector also pools at 1/4 (its RSE neck).

Neck: PP-OCR's ``DBFPN``: 1x1 lateral convs to ``fpn`` channels, top-down nearest x2 upsampling +
add, a 3x3 conv to ``fpn / 4`` channels per level, the levels upsampled (nearest) to 1/4 and
concatenated (no bias, no norm, as published).

Head: ``DBHead``'s probability branch: 3x3 conv (``fpn / 4``) + BN + ReLU, ConvTranspose 2x2
stride 2 + BN + ReLU, ConvTranspose 2x2 stride 2 to one channel, sigmoid: the shrink
(probability) map at full resolution, ``[B, 1, H, W]``.

Full size: 640x640 input, scale 0.5, ``fpn`` 96: the widths of PP-OCR's ``ch_det_mv3_db_v2.0``
(MobileNetV3-large x0.5, DBFPN 96; that configuration switches SE off, here it is on): 1.91 GMACs
(backbone 0.52, neck 0.79, head 0.60), 0.94 M parameters. Small (tests): 64x64, scale 0.25,
``fpn`` 32, the same ten SE blocks. Random weights from a fixed seed (no download):
PyTorch's default initialisation, random BatchNorm affine parameters, statistics calibrated on the
example image and random images (``CALIBRATION_IMAGES`` in all).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sigec.apps.zoo.weights import calibrate_batchnorm, randomize_batchnorm_affine, seeded

__all__ = ["BLOCKS", "CALIBRATION_IMAGES", "DBFPN", "DBHead", "MobileDet", "MobileNetV3Backbone", "SE_EXTRA",
           "SqueezeExcite", "mobile_det"]

BLOCKS: tuple[tuple[int, int, int, bool, str, int], ...] = (
    # kernel, expanded, out, SE (as published), activation, stride: MobileNetV3-large
    (3, 16, 16, False, "relu", 1),
    (3, 64, 24, False, "relu", 2),
    (3, 72, 24, False, "relu", 1),
    (5, 72, 40, True, "relu", 2),
    (5, 120, 40, True, "relu", 1),
    (5, 120, 40, True, "relu", 1),
    (3, 240, 80, False, "hardswish", 2),
    (3, 200, 80, False, "hardswish", 1),
    (3, 184, 80, False, "hardswish", 1),
    (3, 184, 80, False, "hardswish", 1),
    (3, 480, 112, True, "hardswish", 1),
    (3, 672, 112, True, "hardswish", 1),
    (5, 672, 160, True, "hardswish", 2),
    (5, 960, 160, True, "hardswish", 1),
    (5, 960, 160, True, "hardswish", 1),
)
"""The inverted-residual blocks of MobileNetV3-large (before scaling the widths)."""

SE_EXTRA = (1, 2)
"""Indices of BLOCKS that get an SE block beyond the published eight: the two 1/4-scale blocks."""

LAST_CHANNELS = 960
"""Width of the backbone's final 1x1 conv (before scaling): PP-OCR's ``cls_ch_squeeze``."""

CALIBRATION_IMAGES = 8
"""BatchNorm statistics come from the example images plus random images up to this many: on the
64-px variant the 1/32 maps have 4 pixels, and one image leaves some depthwise channels with variances
near 1e-4 (BN scales above 100, float32 rounding amplified to 4e-5 of the output)."""


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, not below 90% of it (MobileNet's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _activation(name: str) -> nn.Module:
    return nn.Hardswish() if name == "hardswish" else nn.ReLU()


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
             act: str | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(_activation(act))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """PP-OCR's SEModule: global average pool, 1x1 conv to C/4, ReLU, 1x1 conv to C, hard sigmoid;
    the map times the gate."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv1 = nn.Conv2d(channels, channels // reduction, 1)
        self.conv2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.hardsigmoid(self.conv2(F.relu(self.conv1(self.pool(x)))))
        return x * gate


class ResidualUnit(nn.Module):
    """1x1 expand (BN, act; absent when the width does not change, as in torchvision's MobileNetV3,
    where PP-OCR keeps a 1x1 conv), depthwise kxk (BN, act), SE, 1x1 project (BN), plus the input
    when stride is 1 and the widths match."""

    def __init__(self, cin: int, expanded: int, cout: int, kernel: int, stride: int, se: bool, act: str) -> None:
        super().__init__()
        self.expand = _conv_bn(cin, expanded, 1, act=act) if expanded != cin else nn.Identity()
        self.depthwise = _conv_bn(expanded, expanded, kernel, stride, groups=expanded, act=act)
        self.se = SqueezeExcite(expanded) if se else nn.Identity()
        self.project = _conv_bn(expanded, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3Backbone(nn.Module):
    """Stem, BLOCKS (widths times ``scale``), final 1x1 conv; returns the outputs at 1/4, 1/8, 1/16, 1/32."""

    def __init__(self, scale: float = 0.5, se_extra: tuple[int, ...] = SE_EXTRA) -> None:
        super().__init__()
        width = make_divisible(16 * scale)
        self.stem = _conv_bn(3, width, 3, stride=2, act="hardswish")
        stages: list[list[nn.Module]] = [[]]
        self.out_channels: list[int] = []
        for i, (kernel, expanded, out, se, act, stride) in enumerate(BLOCKS):
            if stride == 2 and i > 1:  # a new stage starts where the resolution halves (after 1/4)
                self.out_channels.append(width)
                stages.append([])
            exp_w, out_w = make_divisible(expanded * scale), make_divisible(out * scale)
            stages[-1].append(ResidualUnit(width, exp_w, out_w, kernel, stride, se or i in se_extra, act))
            width = out_w
        last = make_divisible(LAST_CHANNELS * scale)
        stages[-1].append(_conv_bn(width, last, 1, act="hardswish"))
        self.out_channels.append(last)
        self.stages = nn.ModuleList(nn.Sequential(*s) for s in stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


def _up(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=float(factor), mode="nearest")


class DBFPN(nn.Module):
    """PP-OCR's DBFPN: lateral 1x1 convs, top-down nearest x2 + add, 3x3 convs to C/4, levels upsampled
    to the finest and concatenated (C channels at 1/4)."""

    def __init__(self, in_channels: list[int], channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1, bias=False) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels // 4, 3, padding=1, bias=False) for _ in in_channels)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):  # 1/16, 1/8, 1/4
            merged.insert(0, lateral + _up(merged[0], 2))
        levels = [conv(m) for conv, m in zip(self.smooth, merged)]
        return torch.cat([_up(p, 2 ** i) if i else p for i, p in reversed(list(enumerate(levels)))], dim=1)


class DBHead(nn.Module):
    """DBHead's probability branch: 3x3 conv + BN + ReLU, two ConvTranspose 2x2 stride 2 (BN + ReLU
    after the first), sigmoid."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        mid = channels // 4
        self.conv = _conv_bn(channels, mid, 3, act="relu")
        self.up1 = nn.Sequential(nn.ConvTranspose2d(mid, mid, 2, 2), nn.BatchNorm2d(mid), nn.ReLU())
        self.up2 = nn.ConvTranspose2d(mid, 1, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.up2(self.up1(self.conv(x))))


class MobileDet(nn.Module):
    """Backbone -> DBFPN -> DBHead: image [B, 3, H, W] -> probability map [B, 1, H, W] (H, W multiples of 32)."""

    def __init__(self, scale: float = 0.5, fpn: int = 96) -> None:
        super().__init__()
        self.backbone = MobileNetV3Backbone(scale)
        self.neck = DBFPN(self.backbone.out_channels, fpn)
        self.head = DBHead(fpn)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.backbone(image)))


def mobile_det(
    small: bool = False,
    batch: int = 1,
    *,
    size: int | None = None,
    scale: float | None = None,
    fpn: int | None = None,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build ``mobile_det`` with random weights: full = 640 px, scale 0.5, fpn 96 (1.91 GMACs, ten SE
    blocks); small = 64 px, scale 0.25, fpn 32.

    Returns ``(module.eval(), {"image": [batch, 3, size, size] in [-1, 1]})``; ``size`` must be a
    multiple of 32.
    """
    size = size or (64 if small else 640)
    scale = scale or (0.25 if small else 0.5)
    fpn = fpn or (32 if small else 96)
    if size % 32:
        raise ValueError(f"mobile_det needs a size that is a multiple of 32, got {size}")
    if fpn % 4:
        raise ValueError(f"mobile_det needs fpn channels divisible by 4, got {fpn}")
    with seeded(seed):
        model = MobileDet(scale=scale, fpn=fpn)
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    randomize_batchnorm_affine(model, generator)
    extra = max(0, CALIBRATION_IMAGES - batch)
    calibration = torch.cat([image, torch.rand(extra, 3, size, size, generator=generator) * 2 - 1])
    calibrate_batchnorm(model, {"image": calibration})
    return model.eval(), {"image": image}
