"""Random-weight initialisation helpers shared by the zoo models."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def size_variant(small: bool, size: str | None, sizes: Mapping[str, object]) -> str:
    """The size variant a factory builds: ``size``, else "small" or "full" by ``small``
    (ValueError when they contradict or ``size`` is not one of ``sizes``)."""
    if size is None:
        size = "small" if small else "full"
    elif small and size != "small":
        raise ValueError(f"small=True contradicts size={size!r}")
    if size not in sizes:
        raise ValueError(f"size must be one of {', '.join(sizes)}, not {size!r}")
    return size


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with ``torch.manual_seed(seed)`` without disturbing the caller's CPU RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def randomize_batchnorm_affine(module: nn.Module, generator: torch.Generator) -> None:
    """Give every affine BatchNorm a random, moderate scale (0.75..1.25) and shift (std 0.1)."""
    for bn in module.modules():
        if isinstance(bn, _BATCH_NORMS) and bn.affine:
            with torch.no_grad():
                bn.weight.copy_(0.75 + 0.5 * torch.rand(bn.weight.shape, generator=generator))
                bn.bias.copy_(0.1 * torch.randn(bn.bias.shape, generator=generator))


@torch.no_grad()
def calibrate_batchnorm(module: nn.Module, inputs: Mapping[str, torch.Tensor]) -> None:
    """Set every BatchNorm's running statistics to the batch statistics of ``module(**inputs)``.

    With random weights the default running statistics (mean 0, variance 1) make BatchNorm an
    identity in eval mode and let activations drift; calibrating on the example inputs gives
    realistic, non-trivial statistics and keeps activations in a sane range. Leaves the module in
    eval mode.
    """
    norms = [m for m in module.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats]
    if not norms:
        module.eval()
        return
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch gives exactly its statistics
    module.train()
    try:
        module(**inputs)
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        module.eval()


def with_random_image(model: nn.Module, *, batch: int, size: int, seed: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Give ``model`` (built under :func:`seeded`) a random image input in [-1, 1], random BatchNorm
    affine parameters and calibrated statistics; return ``(model.eval(), {"image": ...})``."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    randomize_batchnorm_affine(model, generator)
    inputs = {"image": image}
    calibrate_batchnorm(model, inputs)
    return model.eval(), inputs
