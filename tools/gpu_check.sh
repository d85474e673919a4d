#!/usr/bin/env bash
# GPU check of sigec: the Triton kernel tests on CUDA, then dense PyTorch vs sigec sparse timings.
#
# Usage:
#   bash tools/gpu_check.sh OUTDIR [--quick] [--wheels DIR]
#   bash tools/gpu_check.sh --make-wheels DIR      # on a machine with PyPI access: fetch diffusers & co.
#
# Needs python3 with PyTorch (CUDA) and Triton; onnx, onnx-ir, onnxscript, numpy, rich and pytest
# must be importable too (or come as wheels in --wheels DIR). Nothing is downloaded and nothing is
# built: sigec runs from this source tree through PYTHONPATH (a folder of symbolic links gives the
# installed layout sigec/{passes,runtime,gpu}), so the native ONNX Runtime operators are not needed.
# Without diffusers the ddpm UNet rows are skipped with a message.
#
# Writes OUTDIR/environment.txt, OUTDIR/triton_tests.log, OUTDIR/tensorrt_kernel_tests.log, OUTDIR/gpu_bench.md (the table),
# OUTDIR/gpu_bench.json and OUTDIR/gpu_bench.log. Exit status: 0 when the tests passed and the
# benchmark measured something, 1 otherwise, 2 when the machine cannot run the check (no GPU,
# missing packages). Stays under SIGEC_GPU_CHECK_BUDGET_S seconds (default 450) in all.
# --quick: small models, fp32, one edit (a first look in about two minutes).
# --cpu-dry-run: exercise this script without a GPU (Triton interpreter, tiny model; numbers meaningless).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
BUDGET_S=${SIGEC_GPU_CHECK_BUDGET_S:-450}
WHEEL_NAMES=(diffusers==0.42.1 importlib_metadata lazy-importer hypothesis sortedcontainers)

log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
die() { echo "[gpu_check] ERROR: $*" >&2; exit 2; }

# ------------------------------------------------------------------------------------------ arguments
OUTDIR="" WHEELS="" QUICK=0 DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --make-wheels)
      [ $# -ge 2 ] || die "--make-wheels needs a folder"
      mkdir -p "$2" && exec "$PY" -m pip download --no-deps --only-binary=:all: -d "$2" "${WHEEL_NAMES[@]}" ;;
    --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; WHEELS=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --cpu-dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$OUTDIR" ] || die "one OUTDIR only"; OUTDIR=$1; shift ;;
  esac
done
[ -n "$OUTDIR" ] || die "usage: bash tools/gpu_check.sh OUTDIR [--quick] [--wheels DIR] (see --help)"
mkdir -p "$OUTDIR" || die "cannot create $OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d) || die "mktemp failed"
trap 'rm -rf "$WORK"' EXIT
# Python puts the current folder first on sys.path (python -c, -m): run from $WORK so that the
# repository's own sigec/ folder (which lacks passes/, runtime/ and gpu/) is never imported.
cd "$WORK" || die "cannot enter $WORK"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}

# ------------------------------------------------------------------------------------------ the machine
command -v "$PY" >/dev/null || die "$PY not found (set PYTHON=...)"
"$PY" -c "import torch" 2>/dev/null || die "PyTorch is not importable with $PY"
if [ "$DRY" = 1 ]; then
  log "--cpu-dry-run: no GPU used; Triton runs in its interpreter, timings are meaningless"
  export TRITON_INTERPRET=1 SIGEC_TEST_DEVICE=cpu
  DEVICE=cpu
else
  unset TRITON_INTERPRET
  export SIGEC_TEST_DEVICE=cuda
  DEVICE=cuda
  GPU=$("$PY" -c "
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f'no CUDA device visible to PyTorch {torch.__version__} (built for CUDA {torch.version.cuda})')
print(torch.cuda.get_device_name(0))" 2>&1) || die "this check needs an NVIDIA GPU: ${GPU##*$'\n'}"
  log "GPU: $GPU"
fi
"$PY" -c "import triton" 2>/dev/null || die "Triton is not importable (pip install triton, or the gpu extra: pip install -e .[gpu])"

if [ -n "$WHEELS" ]; then
  compgen -G "$WHEELS/*.whl" >/dev/null || die "no wheels in $WHEELS"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl \
    || die "could not install the wheels of $WHEELS"
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  log "installed $(ls "$WHEELS"/*.whl | wc -l) wheel(s) from $WHEELS into a temporary folder"
fi
MISSING=$("$PY" -c "
import importlib.util
names = ['numpy', 'onnx', 'onnx_ir', 'onnxscript', 'rich', 'pytest']
print(' '.join(n for n in names if importlib.util.find_spec(n) is None))")
[ -z "$MISSING" ] || die "missing Python packages: $MISSING (carry them as wheels: --wheels DIR)"
"$PY" -c "import diffusers" 2>/dev/null || log "NOTE: diffusers is not importable: the ddpm UNet rows will be \
skipped (make wheels with: bash tools/gpu_check.sh --make-wheels DIR, then pass --wheels DIR)"

# ------------------------------------------------------------------------------------------ sigec from the source tree
mkdir -p "$WORK/src/sigec"
for entry in "$REPO"/sigec/*; do ln -s "$entry" "$WORK/src/sigec/$(basename "$entry")"; done
ln -s "$REPO/passes" "$WORK/src/sigec/passes"
ln -s "$REPO/runtime" "$WORK/src/sigec/runtime"
ln -s "$REPO/plugins/gpu" "$WORK/src/sigec/gpu"
export PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}"
SIGEC_AT=$("$PY" -c "import sigec, sigec.passes, sigec.gpu.triton_ops; print(sigec.__file__)") \
  || die "sigec does not import from the source tree (see the error above)"
case "$SIGEC_AT" in "$WORK/src/"*) ;; *) log "NOTE: sigec imports from $SIGEC_AT, not from this tree" ;; esac

{
  echo "date: $(date -Iseconds)"; echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "
import sys, torch, triton, onnx
print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda,
      '| triton', triton.__version__, '| onnx', onnx.__version__)"
} >"$OUTDIR/environment.txt" 2>&1
log "environment written to $OUTDIR/environment.txt"

# ------------------------------------------------------------------------------------------ 1. kernel tests
log "running tests/test_triton_ops.py on $DEVICE"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider "$REPO/tests/test_triton_ops.py" 2>&1 | tee "$OUTDIR/triton_tests.log"
TESTS_RC=${PIPESTATUS[0]}
if [ "$TESTS_RC" = 0 ]; then log "kernel tests passed"; else log "kernel tests FAILED (exit $TESTS_RC)"; fi

# The TensorRT plugin kernels (TensorRT's calling convention, launched by Triton; no TensorRT needed).
if "$PY" -c "import hypothesis" 2>/dev/null; then
  log "running the TensorRT plugin kernel launches of tests/test_tensorrt_lowering.py on $DEVICE"
  timeout 180 "$PY" -m pytest -q -p no:cacheprovider "$REPO/tests/test_tensorrt_lowering.py" \
    -k "calling_convention or gather_fp16 or single_launch or ptx" 2>&1 | tee "$OUTDIR/tensorrt_kernel_tests.log"
  TRT_RC=${PIPESTATUS[0]}
  if [ "$TRT_RC" = 0 ]; then log "TensorRT plugin kernel tests passed"; else
    log "TensorRT plugin kernel tests FAILED (exit $TRT_RC)"; TESTS_RC=$TRT_RC; fi
else
  log "hypothesis not installed: TensorRT plugin kernel tests skipped (add it with --wheels)"
fi

# ------------------------------------------------------------------------------------------ 2. benchmark
LEFT=$((BUDGET_S - SECONDS - 30))
if [ "$DRY" = 1 ]; then
  BENCH_ARGS=(--device cpu --models ddpm_unet_small --precisions fp32 --edits 0.05 --repeats 1)
elif [ "$QUICK" = 1 ]; then
  BENCH_ARGS=(--models ddpm_unet_small,spade_small --precisions fp32 --edits 0.05 --repeats 5)
else
  BENCH_ARGS=(--models ddpm_unet_small,ddpm_unet,spade --precisions fp32,fp16 --edits 0.012,0.05,0.2 --repeats 10)
fi
BENCH_RC=1
if [ "$LEFT" -lt 30 ]; then
  log "no time left for the benchmark ($SECONDS s spent)"
else
  log "benchmark: ${BENCH_ARGS[*]} (budget ${LEFT} s)"
  timeout $((LEFT + 25)) "$PY" "$REPO/tools/gpu_bench.py" --out "$OUTDIR" --budget-s "$((LEFT - 60 > 20 ? LEFT - 60 : 20))" \
    "${BENCH_ARGS[@]}" 2>&1 | tee "$OUTDIR/gpu_bench.log"
  BENCH_RC=${PIPESTATUS[0]}
  [ "$BENCH_RC" = 124 ] && log "benchmark stopped at the time limit; the table holds what was measured"
fi

# ------------------------------------------------------------------------------------------ summary
log "done in ${SECONDS} s: tests exit ${TESTS_RC}, benchmark exit ${BENCH_RC}; table: $OUTDIR/gpu_bench.md"
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ] && exit 0
exit 1
