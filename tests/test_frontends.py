"""The PyTorch frontend and the ONNX-file frontend give the same engine results on the same model."""

import numpy as np

import sigec
from small_unet import small_unet


def test_pytorch_and_onnx_paths_agree(small_unet_onnx, tmp_path):
    module, x = small_unet()
    from_torch = sigec.load(sigec.compile(module, tmp_path / "t.sigec", inputs={"x": x}, mode="approx"))
    from_onnx = sigec.load(sigec.compile(small_unet_onnx, tmp_path / "o.sigec", mode="approx"))
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    x1 = x0.copy()
    x1[..., 5:9, 20:26] += 1.0
    outs = []
    for engine in (from_torch, from_onnx):
        engine.prime({"x": x0})
        outs.append((engine.run({"x": x1})[0], engine.run_dense({"x": x1})[0]))
        engine.run({"x": x1})
        assert engine.stats.path == "sparse"  # the sparse outputs compared below are sparse runs
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)
    with __import__("torch").inference_mode():
        reference = module(__import__("torch").from_numpy(x1)).numpy()
    np.testing.assert_allclose(outs[0][1], reference, rtol=1e-4, atol=1e-4)
