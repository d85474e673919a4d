"""Model zoo: image generators built from their published configurations with random weights.

Every factory takes ``small`` (test size) and ``batch`` and returns ``(module.eval(), inputs)``
where ``inputs`` maps the forward's parameter names to example tensors. Nothing is downloaded;
weights come from a fixed seed. ``mobile_det`` (a PP-OCR-style DB text detector) returns a
one-channel probability map. ``ddpm_unet``, ``sd_vae_decoder``, ``sd_vae_encoder``, ``sd_unet``
and ``dit`` need diffusers. ``sd_unet``'s ``batch`` defaults to 2 (classifier-free guidance).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sigec.apps.zoo.ddpm import ddpm_unet
from sigec.apps.zoo.dit import dit
from sigec.apps.zoo.label_maps import edit_label_map, label_boundaries, random_label_map
from sigec.apps.zoo.pix2pix import resnet9
from sigec.apps.zoo.sd_unet import sd_unet
from sigec.apps.zoo.sd_vae import sd_vae_decoder, sd_vae_encoder
from sigec.apps.zoo.gaugan import spade, spade_fused
from sigec.apps.zoo.local_conv import tiny_local
from sigec.apps.zoo.mobile_det import mobile_det

ModelFactory = Callable[..., tuple[nn.Module, dict[str, torch.Tensor]]]

MODELS: dict[str, ModelFactory] = {
    "tiny_local": tiny_local,
    "ddpm_unet": ddpm_unet,
    "sd_vae_decoder": sd_vae_decoder,
    "spade": spade,
    "spade_fused": spade_fused,
    "resnet9": resnet9,
    "sd_unet": sd_unet,
    "dit": dit,
    "sd_vae_encoder": sd_vae_encoder,
    "mobile_det": mobile_det,
}


def build(name: str, **kw: object) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build zoo model ``name`` with factory keyword arguments ``kw`` (``small``, ``batch``, ...).

    An unknown ``name`` raises ValueError listing the available models (nothing is compiled here).
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(sorted(MODELS))}") from None
    return factory(**kw)


__all__ = [
    "MODELS",
    "ModelFactory",
    "build",
    "ddpm_unet",
    "dit",
    "edit_label_map",
    "label_boundaries",
    "mobile_det",
    "random_label_map",
    "resnet9",
    "sd_unet",
    "sd_vae_decoder",
    "sd_vae_encoder",
    "spade",
    "spade_fused",
    "tiny_local",
]
