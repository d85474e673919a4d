"""``dit``: the class-conditional Diffusion Transformer DiT-XL/2 (diffusers ``DiTTransformer2DModel``)
with random weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sigec.apps.zoo.weights import seeded, size_variant

# facebook/DiT-XL-2-512, subfolder transformer (config.json; Peebles & Xie 2023, DiT-XL/2 at 512 px).
# Values used, all passed explicitly so a change of diffusers' defaults cannot alter the model:
#   sample_size 64 (a 64x64 SD-VAE latent), in_channels 4, out_channels 8 (noise and the learned
#   variance), patch_size 2 (32x32 = 1024 tokens), num_layers 28, num_attention_heads 16,
#   attention_head_dim 72 (width 1152), norm_type ada_norm_zero (adaLN-Zero conditioned on the
#   timestep and class), num_embeds_ada_norm 1000 (ImageNet classes; the table has one more row,
#   the null class of classifier-free guidance), activation_fn gelu-approximate, attention_bias True,
#   norm_elementwise_affine False, norm_eps 1e-5, dropout 0.
# 749.83 M parameters (3.00 GB in float32: its ONNX export exceeds protobuf's 2 GiB). The paper's
# 675 M counts one timestep/class embedder; diffusers' AdaLayerNormZero gives each of the 28 blocks
# its own (as the converted checkpoint does), 2.77 M parameters each.
DIT_XL_2_512_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 8,
    "patch_size": 2,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "norm_type": "ada_norm_zero",
    "num_embeds_ada_norm": 1000,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "dropout": 0.0,
    "upcast_attention": False,
}

# Test-sized variant: 16x16 latent (64 tokens), 2 layers of 2 heads x 16 channels, 10 classes.
SMALL_CONFIG: dict[str, Any] = {
    **DIT_XL_2_512_CONFIG,
    "sample_size": 16,
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_embeds_ada_norm": 10,
}


# Benchmark variant: DiT-XL/2 at 512 px with 8 of its 28 layers (same width, heads, 1024 tokens and
# per-layer cost; 214 M parameters, so its ONNX export fits in one protobuf).
MEDIUM_CONFIG: dict[str, Any] = {**DIT_XL_2_512_CONFIG, "num_layers": 8}

SIZES: dict[str, dict[str, Any]] = {"small": SMALL_CONFIG, "medium": MEDIUM_CONFIG, "full": DIT_XL_2_512_CONFIG}


class DiTNoiseModel(nn.Module):
    """Wraps a diffusers ``DiTTransformer2DModel`` so ``forward(sample, timestep, class_labels)``
    returns its output (predicted noise and variance, [B, 8, S, S]) as a plain tensor."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.transformer(sample, timestep=timestep, class_labels=class_labels, return_dict=False)[0]


def dit(
    small: bool = False,
    batch: int = 1,
    *,
    size: str | None = None,
    timestep: int = 500,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build DiT-XL/2 at 512 px: ``size`` "full" (the default), "medium" (8 of the 28 layers: fits in
    one ONNX protobuf) or "small" (``small=True``: 16x16 latent, 2 layers, 2 heads x 16 channels, 10 classes).

    Returns ``(module.eval(), inputs)`` with ``sample`` [batch, 4, S, S] (standard normal),
    ``timestep`` [batch] int64 (every entry ``timestep``) and ``class_labels`` [batch] int64 (random
    classes drawn from the seed). Both are non-spatial: an engine caches per value of them.
    """
    from diffusers import DiTTransformer2DModel  # optional dependency, imported on use

    size = size_variant(small, size, SIZES)
    config = SIZES[size]
    side = config["sample_size"]
    with seeded(seed):
        transformer = DiTTransformer2DModel(**config)
        generator = torch.Generator().manual_seed(seed)
        inputs = {
            "sample": torch.randn(batch, config["in_channels"], side, side, generator=generator),
            "timestep": torch.full((batch,), int(timestep), dtype=torch.int64),
            "class_labels": torch.randint(0, config["num_embeds_ada_norm"], (batch,), generator=generator),
        }
    return DiTNoiseModel(transformer).eval(), inputs
