"""Shared fixtures: test models are exported and compiled once per session; Hypothesis profiles.

Hypothesis profiles: "ci" (derandomised, no example database, failing examples printed as
reproduction blobs) is used by default and always when CI=true; "sweep" (HYPOTHESIS_PROFILE=sweep,
random seeds, 20x the examples of each property test) is for hand-run searches for new failures.
"""

import os
import sys
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

# Triton's CPU interpreter must be chosen before triton is first imported, whichever test module
# imports it first; SIGEC_TEST_DEVICE=cuda (tools/gpu_check.sh) runs the kernels compiled on a GPU.
if os.environ.setdefault("SIGEC_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

from helpers import CI_MAX_EXAMPLES, LOCAL_NET, ZOO_VARIANTS, ZooModel  # noqa: E402

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow], "print_blob": True}
settings.register_profile("ci", derandomize=True, database=None, max_examples=CI_MAX_EXAMPLES, **_COMMON)
settings.register_profile("sweep", derandomize=False, max_examples=20 * CI_MAX_EXAMPLES, **_COMMON)
settings.load_profile("ci" if os.environ.get("CI") == "true" else os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def small_unet_onnx(tmp_path_factory) -> Path:
    """The small UNet exported to an .onnx file (dynamo exporter, opset 18)."""
    from sigec.frontends.torch_frontend import export_module
    from small_unet import small_unet

    model, x = small_unet()
    path = tmp_path_factory.mktemp("models") / "small_unet.onnx"
    onnx.save(export_module(model, {"x": x}), path)
    return path


@pytest.fixture(scope="session")
def small_unet_approx_path(small_unet_onnx, tmp_path_factory) -> Path:
    """The small UNet compiled in approx mode (default tile size, ORT backend); load it with any backend."""
    import sigec

    return sigec.compile(small_unet_onnx, tmp_path_factory.mktemp("engines") / "small_unet_approx.sigec",
                         mode="approx")


@pytest.fixture(scope="session")
def local_net_path(tmp_path_factory) -> Path:
    """``random_local_net(**LOCAL_NET)`` compiled in exact mode (default tile size, ORT backend)."""
    import sigec
    from random_nets import random_local_net

    return sigec.compile(random_local_net(**LOCAL_NET), tmp_path_factory.mktemp("engines") / "local.sigec",
                         mode="exact")


@pytest.fixture(scope="session")
def zoo_model() -> Callable[[str], ZooModel]:
    """``zoo_model(variant)``: a small zoo model (helpers.ZOO_VARIANTS) built and exported once."""
    from sigec.apps.zoo import build
    from sigec.frontends.torch_frontend import export_module

    cache: dict[str, ZooModel] = {}

    def get(variant: str) -> ZooModel:
        if variant not in cache:
            name, kwargs = ZOO_VARIANTS[variant]
            module, example = build(name, small=True, **kwargs)
            cache[variant] = ZooModel(variant, module, example, export_module(module, example))
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def zoo_engine_path(zoo_model, tmp_path_factory) -> Callable[[str, str], Path]:
    """``zoo_engine_path(variant, mode)``: the variant's export compiled once in ``mode`` (ORT backend)."""
    import sigec

    folder = tmp_path_factory.mktemp("zoo_engines")
    cache: dict[tuple[str, str], Path] = {}

    def get(variant: str, mode: str) -> Path:
        if (variant, mode) not in cache:
            cache[variant, mode] = sigec.compile(zoo_model(variant).proto, folder / f"{variant}_{mode}.sigec",
                                                 mode=mode)
        return cache[variant, mode]

    return get
