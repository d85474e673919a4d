"""Zero-argument factories for the command line (``sigec compile sigec.apps.zoo.cli_factories:NAME``).

Each returns ``(module, example_inputs)`` of the full-size model (``*_small`` for the test size).
"""

from __future__ import annotations

import torch
from torch import nn

from sigec.apps.zoo import build

Built = tuple[nn.Module, dict[str, torch.Tensor]]


def tiny_local() -> Built:
    """The built-in demo model, full size (256 px, 64 channels)."""
    return build("tiny_local")


def tiny_local_small() -> Built:
    """The built-in demo model, test size (32 px, 8 channels)."""
    return build("tiny_local", small=True)


def ddpm_unet() -> Built:
    """DDPM LSUN-church UNet, 256 px."""
    return build("ddpm_unet")


def ddpm_unet_small() -> Built:
    """DDPM UNet, test size (32 px)."""
    return build("ddpm_unet", small=True)


def sd_vae_decoder() -> Built:
    """Stable Diffusion v1 VAE decoder, 64x64 latent -> 512 px."""
    return build("sd_vae_decoder")


def sd_vae_decoder_small() -> Built:
    """SD VAE decoder, test size (8x8 latent -> 64 px)."""
    return build("sd_vae_decoder", small=True)


def spade() -> Built:
    """GauGAN / SPADE generator, Cityscapes 256x512, 35 classes."""
    return build("spade")


def spade_small() -> Built:
    """SPADE generator, test size (64x128)."""
    return build("spade", small=True)


def spade_fused() -> Built:
    """SPADE generator with fused SPADE blocks (channel splits), Cityscapes 256x512, 35 classes."""
    return build("spade_fused")


def spade_fused_small() -> Built:
    """Fused SPADE generator, test size (64x128)."""
    return build("spade_fused", small=True)


def resnet9() -> Built:
    """pix2pix / CycleGAN ResNet-9 generator, 256 px, InstanceNorm."""
    return build("resnet9")


def resnet9_small() -> Built:
    """ResNet-9 generator, test size (64 px)."""
    return build("resnet9", small=True)


def sd_unet() -> Built:
    """Stable Diffusion 1.5 UNet, 64x64 latent, batch 2 (classifier-free guidance); 3.2 GiB of
    float32 weights: over protobuf's 2 GiB, so it does not compile yet (use sd_unet_medium)."""
    return build("sd_unet")


def sd_unet_medium() -> Built:
    """SD 1.5 UNet layout with half the channels (160, 320, 640, 640), 64x64 latent, batch 2."""
    return build("sd_unet", size="medium")


def sd_unet_small() -> Built:
    """SD UNet, test size (16x16 latent, channels (32, 64), batch 2)."""
    return build("sd_unet", small=True)


def dit() -> Built:
    """DiT-XL/2 at 512 px (64x64 latent); 2.8 GiB of float32 weights: over protobuf's 2 GiB."""
    return build("dit")


def dit_small() -> Built:
    """DiT, test size (16x16 latent, 2 layers)."""
    return build("dit", small=True)


def sd_vae_encoder() -> Built:
    """Stable Diffusion v1 VAE encoder, 512 px -> 64x64 latent mean."""
    return build("sd_vae_encoder")


def sd_vae_encoder_small() -> Built:
    """SD VAE encoder, test size (64 px -> 8x8 latent)."""
    return build("sd_vae_encoder", small=True)


def mobile_det() -> Built:
    """PP-OCR-style DB text detector (MobileNetV3-large x0.5 with ten SE blocks, DBFPN 96), 640 px."""
    return build("mobile_det")


def mobile_det_small() -> Built:
    """Mobile DB detector, test size (64 px, scale 0.25, FPN 32)."""
    return build("mobile_det", small=True)
