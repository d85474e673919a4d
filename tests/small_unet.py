"""A small UNet for approx-mode tests: GroupNorm, SiLU, residual blocks, attention at 8x8."""

from __future__ import annotations

import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(4, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(4, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(nn.functional.silu(self.n1(x)))
        h = self.c2(nn.functional.silu(self.n2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.qkv, self.proj = nn.GroupNorm(4, c), nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x).reshape(b, c, h * w).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / c ** 0.5, dim=-1)
        return x + self.proj(a @ v).transpose(1, 2).reshape(b, c, h, w)


class SmallUNet(nn.Module):
    """32x32 -> 32x32; resolutions 32, 16, 8 with attention at 8."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.inp = nn.Conv2d(3, c, 3, padding=1)
        self.d1, self.down1 = ResBlock(c, c), nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.d2, self.down2 = ResBlock(c, 2 * c), nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)
        self.mid, self.attn = ResBlock(2 * c, 2 * c), Attention(2 * c)
        self.u2, self.u1 = ResBlock(4 * c, 2 * c), ResBlock(3 * c, c)
        self.out_norm, self.out = nn.GroupNorm(4, c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = self.d1(self.inp(x))
        h1 = self.d2(self.down1(h0))
        m = self.attn(self.mid(self.down2(h1)))
        u = self.u2(torch.cat([nn.functional.interpolate(m, scale_factor=2.0), h1], 1))
        u = self.u1(torch.cat([nn.functional.interpolate(u, scale_factor=2.0), h0], 1))
        return self.out(nn.functional.silu(self.out_norm(u)))


def small_unet(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model with random weights and an example input."""
    torch.manual_seed(seed)
    return SmallUNet().eval(), torch.randn(1, 3, 32, 32)
