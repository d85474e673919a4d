"""The contract layer between sigec's compile side (``sigec.passes``) and run side (``sigec.runtime``).

It holds what both sides must agree on and imports nothing else of sigec:

- :mod:`~sigec.core.errors`: the error hierarchy;
- :mod:`~sigec.core.ops`: the ``ai.sigec`` operator vocabulary (domain, op names, pad and activation codes);
- :mod:`~sigec.core.reference_ops`: the executable semantics of those ops (docs/ops.md);
- :mod:`~sigec.core.names`: how cache and tile-index inputs of the SPARSE graph are named;
- :mod:`~sigec.core.options`: modes, backends and every compile/run default;
- :mod:`~sigec.core.manifest_schema`, :mod:`~sigec.core.engine_file`: the engine file and its manifest;
- :mod:`~sigec.core.mask_program`: the mask program (pixel mask -> active tiles per resolution);
- :mod:`~sigec.core.tensorrt_abi`: how sigec ops appear to TensorRT (plugin names, attribute encoding, plans).
"""

VERSION = "0.1.0"
