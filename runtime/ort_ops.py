"""Locate and register sigec's ONNX Runtime custom-op library (``libsigec_ort_ops``).

The library implements the ``ai.sigec`` operator set (docs/ops.md) for ONNX Runtime's CPU
execution provider. It is built from ``plugins/ort`` by ``pip install`` (scikit-build-core/CMake)
and installed as ``sigec/_native/libsigec_ort_ops.so``.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sigec.core.errors import BackendError
from sigec.core.ops import DOMAIN

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime

OPSET_VERSION = 1
ENV_LIBRARY = "SIGEC_ORT_OPS_LIBRARY"

_BUILD_HINT = (
    "Build it with `pip install --no-build-isolation -e .` (or `pip install .`) from the sigec "
    "repository; the build needs a C++17 compiler, CMake >= 3.18 and the ONNX Runtime headers "
    "(fetched automatically on Debian, or set SIGEC_ORT_INCLUDE_DIR). "
    f"Set {ENV_LIBRARY}=/path/to/library to use a library built elsewhere."
)


def _library_names() -> tuple[str, ...]:
    if sys.platform == "win32":
        return ("sigec_ort_ops.dll",)
    if sys.platform == "darwin":
        return ("libsigec_ort_ops.dylib", "libsigec_ort_ops.so")
    return ("libsigec_ort_ops.so",)


def _package_dirs() -> list[Path]:
    """Directories of the ``sigec`` package (several in editable installs)."""
    spec = importlib.util.find_spec("sigec")  # the installed package, wherever this module lives
    if spec is None:
        return []
    dirs = [Path(p) for p in spec.submodule_search_locations or []]
    if spec.origin:
        dirs.append(Path(spec.origin).resolve().parent)
    return dirs


def _build_dirs() -> list[Path]:
    """scikit-build-core build directories of a source checkout (``<repo>/build/<wheel tag>``)."""
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "pyproject.toml").is_file():
        return []
    return [Path(p) for p in sorted(glob.glob(str(repo / "build" / "*"))) if Path(p).is_dir()]


def candidate_paths() -> list[Path]:
    """Every place ``library_path`` looks, in order (without the environment override)."""
    names = _library_names()
    candidates: list[Path] = []
    for directory in _package_dirs():
        candidates += [directory / "_native" / name for name in names]
    for directory in _build_dirs():
        candidates += [directory / name for name in names]
    unique: list[Path] = []
    for path in candidates:
        if path not in unique:
            unique.append(path)
    return unique


def library_path() -> Path:
    """Return the path of the built ``libsigec_ort_ops`` library.

    ``$SIGEC_ORT_OPS_LIBRARY`` wins when set; otherwise the installed package (``sigec/_native``)
    and, for editable installs, the scikit-build build directory are searched.
    Raises ``BackendError`` when no library is found.
    """
    override = os.environ.get(ENV_LIBRARY)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise BackendError(f"{ENV_LIBRARY}={override} does not name an existing file. {_BUILD_HINT}")
        return path.resolve()
    searched = candidate_paths()
    for path in searched:
        if path.is_file():
            return path.resolve()
    where = ", ".join(str(p) for p in searched) or "(no candidate directories)"
    raise BackendError(f"the sigec ONNX Runtime custom-op library was not found (searched {where}). {_BUILD_HINT}")


def register(options: onnxruntime.SessionOptions) -> None:
    """Register the ``ai.sigec`` custom operators with an ONNX Runtime ``SessionOptions``."""
    path = library_path()
    try:
        options.register_custom_ops_library(str(path))
    except Exception as exc:  # onnxruntime raises plain RuntimeError / its own Fail types
        raise BackendError(f"ONNX Runtime could not load the sigec custom-op library {path}: {exc}") from exc
