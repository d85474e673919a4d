"""``sd_unet``: the Stable Diffusion 1.5 denoising UNet (diffusers ``UNet2DConditionModel``) with random weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sigec.apps.zoo.weights import seeded, size_variant

# runwayml/stable-diffusion-v1-5, subfolder unet (config.json; the same as CompVis v1-4). Values
# used, all passed explicitly so a change of diffusers' defaults cannot alter the model:
#   sample_size 64 (a 64x64 latent, 512 px images), in/out channels 4,
#   block_out_channels (320, 640, 1280, 1280), layers_per_block 2,
#   down: CrossAttnDownBlock2D x3, DownBlock2D; up: UpBlock2D, CrossAttnUpBlock2D x3;
#   mid block UNetMidBlock2DCrossAttn, cross_attention_dim 768 (CLIP ViT-L/14 text features),
#   attention_head_dim 8 (in diffusers' SD 1.x configs this is the number of heads: 8 heads of
#   320/8 = 40 ... 1280/8 = 160 channels), one transformer layer per block, no linear projection
#   (1x1 conv proj_in/proj_out), norm_num_groups 32, norm_eps 1e-5, act_fn silu,
#   flip_sin_to_cos True, freq_shift 0, downsample_padding 1, mid_block_scale_factor 1.
# 859.52 M parameters (3.44 GB in float32: its ONNX export exceeds protobuf's 2 GiB).
SD15_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "upcast_attention": False,
}

# Benchmark-sized variant (not a published model): the SD 1.5 layout and text width with half the
# channels, (160, 320, 640, 640), so that the float32 weights (219.79 M parameters, 0.88 GB) fit in
# one ONNX protobuf (< 2 GiB); still 8 heads per attention layer (head widths 20 ... 80).
MEDIUM_CONFIG: dict[str, Any] = {
    **SD15_CONFIG,
    "block_out_channels": (160, 320, 640, 640),
}

# Test-sized variant: 16x16 latent, two resolutions (16, 8): CrossAttnDownBlock2D + DownBlock2D /
# UpBlock2D + CrossAttnUpBlock2D, the cross-attention mid block, one resnet per down block, 32-wide
# text features of 7 tokens.
SMALL_CONFIG: dict[str, Any] = {
    **SD15_CONFIG,
    "sample_size": 16,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

SIZES: dict[str, dict[str, Any]] = {"small": SMALL_CONFIG, "medium": MEDIUM_CONFIG, "full": SD15_CONFIG}
"""``size`` -> configuration."""

TEXT_LENGTH = 77
"""Tokens of the CLIP text encoder's output (``encoder_hidden_states`` [B, 77, 768])."""

SMALL_TEXT_LENGTH = 7


class UNetConditionalNoiseModel(nn.Module):
    """Wraps a diffusers ``UNet2DConditionModel`` so ``forward(sample, timestep, encoder_hidden_states)``
    returns the predicted noise as a plain tensor."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def sd_unet(
    small: bool = False,
    batch: int = 2,
    *,
    size: str | None = None,
    timestep: float = 500.0,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build the SD 1.5 UNet: ``size`` "full" (the published configuration, the default), "medium"
    (half the channels, fits in one ONNX protobuf) or "small" (``small=True``: 16x16 latent,
    channels (32, 64), 8 norm groups, 32-wide text features of 7 tokens).

    ``batch`` defaults to 2: classifier-free guidance runs the unconditional and the conditional
    prediction as one batch. Returns ``(module.eval(), inputs)`` with ``sample`` [batch, 4, S, S]
    (standard normal), ``timestep`` [batch] float32 (every entry ``timestep``) and
    ``encoder_hidden_states`` [batch, L, D] (standard normal, standing in for the text encoder's
    output; L = 77, D = 768 at sizes full and medium). ``timestep`` and ``encoder_hidden_states`` are
    non-spatial: an engine caches per value of them (one key per step and prompt).
    """
    from diffusers import UNet2DConditionModel  # optional dependency, imported on use

    size = size_variant(small, size, SIZES)
    config = SIZES[size]
    side = config["sample_size"]
    length = SMALL_TEXT_LENGTH if size == "small" else TEXT_LENGTH
    with seeded(seed):
        unet = UNet2DConditionModel(**config)
        generator = torch.Generator().manual_seed(seed)
        inputs = {
            "sample": torch.randn(batch, config["in_channels"], side, side, generator=generator),
            "timestep": torch.full((batch,), float(timestep), dtype=torch.float32),
            "encoder_hidden_states": torch.randn(batch, length, config["cross_attention_dim"], generator=generator),
        }
    return UNetConditionalNoiseModel(unet).eval(), inputs
