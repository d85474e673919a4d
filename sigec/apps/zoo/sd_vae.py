"""``sd_vae_decoder`` and ``sd_vae_encoder``: the two halves of the Stable Diffusion v1 VAE (diffusers
``AutoencoderKL``) with random weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sigec.apps.zoo.weights import seeded

# Stable Diffusion v1 (CompVis/stable-diffusion-v1-4, subfolder vae) AutoencoderKL configuration:
# 4 down/up blocks, block_out_channels (128, 256, 512, 512), layers_per_block 2 (the decoder has 3
# resnets per up block), latent_channels 4, norm_num_groups 32, act_fn silu, sample_size 512,
# mid block with attention. The decoder maps a [B, 4, 64, 64] latent to a [B, 3, 512, 512] image.
SD_V1_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}

# Test-sized variant: same 4-block layout (8x upsampling), 8x8 latent -> 64 px image.
SMALL_CONFIG: dict[str, Any] = {
    **SD_V1_CONFIG,
    "block_out_channels": (16, 16, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}


class VaeDecoder(nn.Module):
    """``post_quant_conv`` + ``decoder`` of an ``AutoencoderKL``: latent -> image (no latent scaling)."""

    def __init__(self, post_quant_conv: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.post_quant_conv = post_quant_conv
        self.decoder = decoder

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latent))


def sd_vae_decoder(
    small: bool = False, batch: int = 1, *, seed: int = 0
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build the SD v1 VAE decoder (small: 8x8 latent -> 64 px, channels (16, 16, 32, 32)).

    Returns ``(module.eval(), {"latent": [batch, 4, S/8, S/8] standard normal})``. Parameter names
    match the published checkpoint's ``post_quant_conv.*`` and ``decoder.*`` entries.
    """
    from diffusers import AutoencoderKL  # optional dependency, imported on use

    config = SMALL_CONFIG if small else SD_V1_CONFIG
    side = config["sample_size"] // 2 ** (len(config["block_out_channels"]) - 1)
    with seeded(seed):
        vae = AutoencoderKL(**config)
        generator = torch.Generator().manual_seed(seed)
        latent = torch.randn(batch, config["latent_channels"], side, side, generator=generator)
    return VaeDecoder(vae.post_quant_conv, vae.decoder).eval(), {"latent": latent}


class VaeEncoder(nn.Module):
    """``encoder`` + ``quant_conv`` of an ``AutoencoderKL``: image -> latent mean (no latent scaling).

    The encoder's output ("moments", 2 x ``latent_channels`` channels) parametrises a diagonal
    Gaussian: the first ``latent_channels`` channels are its mean, the rest its log-variance. Only
    the mean (``latent_dist.mode()``) is returned, so the output is deterministic; diffusers'
    img2img pipelines by default sample around it (mean + exp(logvar / 2) * noise), which a caller
    can add outside the model. The log-variance convolution output channels are sliced away.
    """

    def __init__(self, encoder: nn.Module, quant_conv: nn.Module, latent_channels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.quant_conv = quant_conv
        self.latent_channels = latent_channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.quant_conv(self.encoder(image))
        return moments[:, : self.latent_channels]


def sd_vae_encoder(
    small: bool = False, batch: int = 1, *, seed: int = 0
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build the SD v1 VAE encoder (small: 64 px -> 8x8 latent, channels (16, 16, 32, 32)).

    Returns ``(module.eval(), {"image": [batch, 3, S, S] uniform in [-1, 1]})``; the output is the
    latent mean [batch, 4, S/8, S/8] (unscaled: SD multiplies it by 0.18215). Same configurations
    and seed as :func:`sd_vae_decoder`, so the two halves of one seed are one autoencoder.
    Parameter names match the published checkpoint's ``encoder.*`` and ``quant_conv.*`` entries
    (34.16 M parameters at full size).
    """
    from diffusers import AutoencoderKL  # optional dependency, imported on use

    config = SMALL_CONFIG if small else SD_V1_CONFIG
    size = config["sample_size"]
    with seeded(seed):
        vae = AutoencoderKL(**config)
        generator = torch.Generator().manual_seed(seed)
        image = torch.rand(batch, config["in_channels"], size, size, generator=generator) * 2 - 1
    encoder = VaeEncoder(vae.encoder, vae.quant_conv, config["latent_channels"])
    return encoder.eval(), {"image": image}
