"""The public error hierarchy: every error sigec raises on purpose derives from SigecError."""


class SigecError(Exception):
    """Base class of every error sigec raises on purpose."""


class CompileError(SigecError):
    """The model cannot be compiled (unsupported node, dynamic shape, bad option)."""


class EngineFileError(SigecError):
    """An engine file is missing, truncated, corrupted, of a wrong version or unsafe."""


class InputError(SigecError):
    """A request to an engine is malformed (input name, shape, dtype, mask, values)."""


class CacheError(SigecError):
    """A cache is missing (run before prime, unknown key) or inconsistent."""


class BackendError(SigecError):
    """A backend is unavailable or failed (native library missing, runtime failure)."""
