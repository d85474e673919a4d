"""Compile and run options shared by the compiler, the manifest and the runtime: the one place of
every choice list and default."""

MODES = ("exact", "approx")
DEFAULT_MODE = "approx"
BACKENDS = ("ort", "torch", "tensorrt")
DEFAULT_BACKEND = "ort"
FALLBACKS = ("error", "dense")
DEFAULT_TILE_SIZE = 4  # measured on the DDPM UNet: see BENCHMARKS.md, "Tile size"
DEFAULT_THRESHOLD = {"exact": 0.0, "approx": 2e-2}  # |edited - primed| above this marks a pixel as edited
DEFAULT_DILATION = {"exact": 0, "approx": 1}  # pixels added around the edit mask before tiling
DENSE_FALLBACK_FRACTION = 0.6  # run dense when the sparse run would execute this share of dense MACs
DEFAULT_OPSET = 18
