#!/usr/bin/env bash
# One-command set-up for sigec on a fresh machine, then the demo or the tests.
#   bash tools/dev.sh demo   # install everything, compile and run the built-in generator (out/demo/)
#   bash tools/dev.sh test   # install everything, run the test suite
#   bash tools/dev.sh install
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

install() {
  local extras="${1:-test,models}"
  # torch first, pinned: a range admitting newer releases would pull a multi-GB CUDA build.
  if ! "$PYTHON" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
  fi
  local isolation="--no-build-isolation"
  "$PYTHON" -c "import scikit_build_core, cmake, ninja" 2>/dev/null || \
    "$PYTHON" -m pip install --quiet "scikit-build-core>=0.10" cmake ninja
  # Builds plugins/ (ONNX Runtime custom ops); the build fetches ONNX Runtime's headers itself
  # (tools/fetch_ort_headers.py) unless SIGEC_ORT_INCLUDE_DIR names them.
  "$PYTHON" -m pip install --quiet $isolation -e ".[$extras]"
}

# tests/test_serve_page.py drives a real browser: Debian's Chromium (installed here when missing and
# when apt-get can run) through Playwright's Python package. Never `playwright install`: it would
# download a browser build of its own. Without a browser the page test skips and says why.
install_browser() {
  if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
      >/dev/null || echo "dev.sh: could not install chromium; the browser test will skip" >&2
  fi
  "$PYTHON" -c "import playwright" 2>/dev/null || "$PYTHON" -m pip install --quiet "playwright>=1.45" || \
    echo "dev.sh: could not install playwright; the browser test will skip" >&2
}

case "${1:-}" in
  install) install ;;
  demo) install; "$PYTHON" -m sigec.cli demo --out out/demo ;;
  # The tests also check the Triton GPU kernels on the CPU (TRITON_INTERPRET=1): install the gpu extra.
  # The serving tests need the serve extra (Ray Serve) and the browser.
  test) install "test,models,gpu,serve"; install_browser; shift; "$PYTHON" -m pytest -q "$@" ;;
  browser) install_browser ;;
  *) echo "usage: bash tools/dev.sh {demo|test|install|browser} [pytest args]" >&2; exit 2 ;;
esac
