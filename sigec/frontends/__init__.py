"""Model frontends: bring PyTorch modules and ONNX files into sigec's ONNX form.

``load_factory`` and ``export_module`` (PyTorch) are loaded on first use, so importing the ONNX
frontend alone does not import torch.
"""

from __future__ import annotations

from typing import Any

_TORCH_NAMES = ("ExampleInputs", "export_module", "export_module_ir", "load_factory", "normalize_inputs")

__all__ = list(_TORCH_NAMES)


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        from sigec.frontends import torch_frontend

        return getattr(torch_frontend, name)
    raise AttributeError(f"module 'sigec.frontends' has no attribute {name!r}")
