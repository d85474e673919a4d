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
# Approx mode: cells each resolution's mask is dilated by (SIGE's 1; trained detectors gain inside the
# edit from 2-4 at 1.3-2x the time, so it stays a per-model choice: BENCHMARKS.md, "Trained models")
DEFAULT_APPROX_DILATION = 1
# Precision of the caches a sparse run reads only through TileGather/TileScatter (the others stay float32):
# passes/half_caches.py. Approx mode: float16 halves a key's caches (church UNet 694 -> 350 MiB) for at most
# 5e-6 more relative L2 error on the zoo and the same speed (BENCHMARKS.md, "Half-precision caches"); exact
# mode keeps float32 (float16 caches would make it approximate). The TensorRT backend takes float32 only.
CACHE_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_CACHE_DTYPE = {"exact": "float32", "approx": "float16"}
DENSE_FALLBACK_FRACTION = 0.6  # run dense when the sparse run would execute this share of dense MACs
DEFAULT_OPSET = 18
# Approx mode: the statistics GroupNorm / InstanceNorm of an edited map uses: "frozen" from the original
# run, or "updated" (the original's per-group moments plus the active tiles' change: passes/norm_stats.py).
# Chosen by measurement: BENCHMARKS.md, "Normalisation statistics".
NORM_STATS = ("frozen", "updated")
DEFAULT_NORM_STATS = "frozen"
