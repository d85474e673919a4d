"""sigec: a graph compiler that makes image generators incremental.

Public API: :func:`compile`, :func:`load`, :class:`Engine` and the error hierarchy rooted at
:class:`SigecError`.
"""

from sigec.core.errors import BackendError, CacheError, CompileError, EngineFileError, InputError, SigecError

from sigec.compiler import compile
from sigec.core import VERSION as __version__
from sigec.loader import load
from sigec.runtime.engine import Engine

__all__ = ["compile", "load", "Engine", "SigecError", "CompileError", "EngineFileError", "InputError", "CacheError",
           "BackendError", "__version__"]
