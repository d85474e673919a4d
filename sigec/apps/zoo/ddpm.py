"""``ddpm_unet``: the DDPM LSUN-church UNet (diffusers ``UNet2DModel``) with random weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sigec.apps.zoo.weights import seeded

# google/ddpm-church-256 (the configuration SIGE's DDIM benchmark uses). Values used, all passed
# explicitly so a change of diffusers' defaults cannot alter the model:
#   sample_size 256, in/out channels 3, block_out_channels (128, 128, 256, 256, 512, 512),
#   layers_per_block 2, down: DownBlock2D x4, AttnDownBlock2D, DownBlock2D (attention at 16x16),
#   up: UpBlock2D, AttnUpBlock2D, UpBlock2D x4, mid block UNetMidBlock2D with attention,
#   downsample_padding 0, flip_sin_to_cos False, freq_shift 1, norm_num_groups 32, norm_eps 1e-6,
#   act_fn silu, positional time embedding, attention_head_dim None (one head per attention
#   layer, as in the original DDPM), mid_block_scale_factor 1, resnet_time_scale_shift default.
# 113.67 M parameters (checked by the tests).
CHURCH_256_CONFIG: dict[str, Any] = {
    "sample_size": 256,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "attention_head_dim": None,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}

# Test-sized variant: 32 px, three resolutions (32, 16, 8), attention at 8x8 and in the mid block,
# one resnet per down block (two per up block) to keep the graph small and its export fast.
SMALL_CONFIG: dict[str, Any] = {
    **CHURCH_256_CONFIG,
    "sample_size": 32,
    "block_out_channels": (32, 32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}


class UNetNoiseModel(nn.Module):
    """Wraps a diffusers ``UNet2DModel`` so ``forward`` returns the predicted noise as a plain tensor."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, return_dict=False)[0]


def ddpm_unet(
    small: bool = False,
    batch: int = 1,
    *,
    timestep: float = 500.0,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build the DDPM church UNet (small: 32 px, channels (32, 32, 64), 8 norm groups, 1 layer per block).

    Returns ``(module.eval(), inputs)`` with ``sample`` [batch, 3, S, S] (standard normal) and
    ``timestep`` [batch] float32 (every entry ``timestep``).
    """
    from diffusers import UNet2DModel  # optional dependency, imported on use

    config = SMALL_CONFIG if small else CHURCH_256_CONFIG
    size = config["sample_size"]
    with seeded(seed):
        unet = UNet2DModel(**config)
        generator = torch.Generator().manual_seed(seed)
        inputs = {
            "sample": torch.randn(batch, config["in_channels"], size, size, generator=generator),
            "timestep": torch.full((batch,), float(timestep), dtype=torch.float32),
        }
    return UNetNoiseModel(unet).eval(), inputs
