"""GPU kernels of the ``ai.sigec`` operators (importable as ``sigec.gpu``): Triton kernels
(:mod:`~sigec.gpu.triton_ops`), their TensorRT calling convention and ahead-of-time PTX
(:mod:`~sigec.gpu.tensorrt_kernels`) and the TensorRT plugin definitions
(:mod:`~sigec.gpu.tensorrt_plugins`). Imports only the contract layer (:mod:`sigec.core`)."""
