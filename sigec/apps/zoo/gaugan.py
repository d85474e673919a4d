"""``spade``: the GauGAN / SPADE generator (Park et al., CVPR 2019), written from the paper.

Cityscapes setting: 35 label classes, 256x512 output, ngf 64, 5 nearest x2 upsamplings from an
8x16 start ("normal" upsampling), no VAE encoder (the generator starts from the label map resized to
8x16 through a 3x3 conv). Differences from the published code, on purpose: no spectral norm (it
only reparametrises the weights during training; random-weight inference does not need it) and
plain BatchNorm2d(affine=False) in eval mode instead of synchronized BatchNorm.

``spade_fused``: the same generator with fused SPADE blocks, the layout SIGE benchmarks GauGAN
with: each residual block computes the hidden maps of all its SPADEs with one convolution (then
splits them along channels), and each SPADE computes gamma and beta with one convolution of
2*C channels (then splits it). Full size: 25 channel splits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sigec.apps.zoo.label_maps import edit_label_map, label_boundaries, random_label_map
from sigec.apps.zoo.weights import calibrate_batchnorm, seeded

__all__ = ["FusedSPADE", "FusedSPADEResnetBlock", "SPADE", "SPADEGenerator", "SPADEResnetBlock", "edit_label_map",
           "label_boundaries", "random_label_map", "spade", "spade_fused"]

NUM_UPSAMPLINGS = 5


class SPADE(nn.Module):
    """Parameter-free BatchNorm modulated by gamma/beta predicted from the (nearest-resized) label map."""

    def __init__(self, channels: int, label_nc: int, nhidden: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(label_nc, nhidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(nhidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(nhidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if label.shape[-2:] != x.shape[-2:]:
            label = F.interpolate(label, size=x.shape[-2:], mode="nearest")
        hidden = self.shared(label)
        return self.norm(x) * (1 + self.gamma(hidden)) + self.beta(hidden)


class SPADEResnetBlock(nn.Module):
    """SPADE -> lrelu -> 3x3 conv, twice, plus a (SPADE -> 1x1 conv) shortcut when channels change."""

    def __init__(self, fin: int, fout: int, label_nc: int, nhidden: int) -> None:
        super().__init__()
        fmiddle = min(fin, fout)
        self.norm_0 = SPADE(fin, label_nc, nhidden)
        self.conv_0 = nn.Conv2d(fin, fmiddle, 3, padding=1)
        self.norm_1 = SPADE(fmiddle, label_nc, nhidden)
        self.conv_1 = nn.Conv2d(fmiddle, fout, 3, padding=1)
        self.learned_shortcut = fin != fout
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, label_nc, nhidden)
            self.conv_s = nn.Conv2d(fin, fout, 1, bias=False)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        # Resize the label map once for the block's two or three SPADEs (same result as each
        # SPADE resizing it, with fewer Resize nodes in the exported graph).
        if label.shape[-2:] != x.shape[-2:]:
            label = F.interpolate(label, size=x.shape[-2:], mode="nearest")
        shortcut = self.conv_s(self.norm_s(x, label)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, label), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, label), 0.2))
        return shortcut + dx


class FusedSPADE(nn.Module):
    """SPADE whose gamma and beta come from one 3x3 convolution of 2*C channels, split in two; the
    hidden map is given by the block."""

    def __init__(self, channels: int, nhidden: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gamma_beta = nn.Conv2d(nhidden, 2 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.gamma_beta(hidden).chunk(2, dim=1)
        return self.norm(x) * (1 + gamma) + beta


class FusedSPADEResnetBlock(nn.Module):
    """:class:`SPADEResnetBlock` with fused SPADEs: one convolution computes the hidden maps of the
    block's two or three SPADEs, split along channels."""

    def __init__(self, fin: int, fout: int, label_nc: int, nhidden: int) -> None:
        super().__init__()
        fmiddle = min(fin, fout)
        self.learned_shortcut = fin != fout
        self.spades = 3 if self.learned_shortcut else 2
        self.shared = nn.Sequential(nn.Conv2d(label_nc, self.spades * nhidden, 3, padding=1), nn.ReLU())
        self.norm_0 = FusedSPADE(fin, nhidden)
        self.conv_0 = nn.Conv2d(fin, fmiddle, 3, padding=1)
        self.norm_1 = FusedSPADE(fmiddle, nhidden)
        self.conv_1 = nn.Conv2d(fmiddle, fout, 3, padding=1)
        if self.learned_shortcut:
            self.norm_s = FusedSPADE(fin, nhidden)
            self.conv_s = nn.Conv2d(fin, fout, 1, bias=False)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if label.shape[-2:] != x.shape[-2:]:
            label = F.interpolate(label, size=x.shape[-2:], mode="nearest")
        hidden = self.shared(label).chunk(self.spades, dim=1)
        shortcut = self.conv_s(self.norm_s(x, hidden[2])) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, hidden[0]), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, hidden[1]), 0.2))
        return shortcut + dx


class SPADEGenerator(nn.Module):
    """GauGAN generator: label map [B, label_nc, H, W] -> image [B, 3, H, W] in [-1, 1]
    (``fused``: with :class:`FusedSPADEResnetBlock` blocks)."""

    def __init__(self, label_nc: int, ngf: int = 64, nhidden: int = 128,
                 height: int = 256, width: int = 512, fused: bool = False) -> None:
        super().__init__()
        factor = 2**NUM_UPSAMPLINGS
        if height % factor or width % factor:
            raise ValueError(f"SPADE output size must be a multiple of {factor}, got {height}x{width}")
        self.start_size = (height // factor, width // factor)
        nf = ngf
        self.fc = nn.Conv2d(label_nc, 16 * nf, 3, padding=1)
        block_type = FusedSPADEResnetBlock if fused else SPADEResnetBlock
        block = lambda fin, fout: block_type(fin, fout, label_nc, nhidden)  # noqa: E731
        self.head_0 = block(16 * nf, 16 * nf)
        self.G_middle_0 = block(16 * nf, 16 * nf)
        self.G_middle_1 = block(16 * nf, 16 * nf)
        self.up_0 = block(16 * nf, 8 * nf)
        self.up_1 = block(8 * nf, 4 * nf)
        self.up_2 = block(4 * nf, 2 * nf)
        self.up_3 = block(2 * nf, nf)
        self.conv_img = nn.Conv2d(nf, 3, 3, padding=1)

    @staticmethod
    def _up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        x = self.fc(F.interpolate(label, size=self.start_size, mode="nearest"))
        x = self._up(self.head_0(x, label))
        x = self.G_middle_1(self.G_middle_0(x, label), label)
        for stage in (self.up_0, self.up_1, self.up_2):
            x = stage(self._up(x), label)
        x = self.up_3(self._up(x), label)
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))


def spade(
    small: bool = False,
    batch: int = 1,
    *,
    classes: int = 35,
    instance_edges: bool = False,
    ngf: int | None = None,
    nhidden: int | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    fused: bool = False,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build the SPADE generator: full = 256x512, ngf 64, 128 hidden; small = 64x128, ngf 4, 16 hidden.

    Returns ``(module.eval(), {"label": [batch, classes (+1), H, W]})`` where ``label`` is a random
    one-hot map (``random_label_map``). With ``instance_edges`` the input gets one more channel, the
    label-boundary map, as in the published Cityscapes model (36 input channels). ``fused`` builds
    fused SPADE blocks (:class:`FusedSPADEResnetBlock`). BatchNorm running statistics are calibrated on the example input.
    """
    height = height or (64 if small else 256)
    width = width or (128 if small else 512)
    ngf = ngf or (4 if small else 64)
    nhidden = nhidden or (16 if small else 128)
    label = random_label_map(batch, classes, height, width, seed=seed)
    if instance_edges:
        label = torch.cat([label, label_boundaries(label)], dim=1)
    with seeded(seed):
        model = SPADEGenerator(label.shape[1], ngf=ngf, nhidden=nhidden, height=height, width=width, fused=fused)
    inputs = {"label": label}
    calibrate_batchnorm(model, inputs)
    return model.eval(), inputs


def spade_fused(small: bool = False, batch: int = 1, **kw: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The SPADE generator with fused SPADE blocks (sizes and options as :func:`spade`)."""
    return spade(small, batch, fused=True, **kw)
