"""sigec: a graph compiler that makes image generators incremental.

Public API: :func:`compile`, :func:`load`, :class:`Engine` and the error hierarchy rooted at
:class:`SigecError`.
"""

from sigec.errors import BackendError, CacheError, CompileError, EngineFileError, InputError, SigecError

__version__ = "0.1.0"

from sigec.compiler import compile  # noqa: E402
from sigec.loader import load  # noqa: E402
from sigec.runtime.engine import Engine  # noqa: E402

__all__ = ["compile", "load", "Engine", "SigecError", "CompileError", "EngineFileError", "InputError", "CacheError",
           "BackendError", "__version__"]
