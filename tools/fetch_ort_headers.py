#!/usr/bin/env python3
"""Fetch the ONNX Runtime C/C++ headers that the onnxruntime wheel does not ship.

Debian 13 ("trixie") packages them as ``libonnxruntime-dev`` (ONNX Runtime 1.21, C API 21). This
script downloads that .deb through a private apt configuration (the system's apt sources and
package lists are left untouched), unpacks it with ``dpkg -x`` into a destination directory and
prints the include directory (the one holding ``onnxruntime_cxx_api.h``) on stdout.

It is idempotent: when the headers are already there it only prints the directory.
CMake (plugins/CMakeLists.txt) runs it when no other header location is known.

Usage: ``python tools/fetch_ort_headers.py [--dest DIR]`` (default ``<repo>/third_party/onnxruntime``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO_ROOT / "third_party" / "onnxruntime"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SUITE = "trixie"
PACKAGE = "libonnxruntime-dev"
HEADER = "onnxruntime_cxx_api.h"
INCLUDE_SUBDIR = Path("usr") / "include" / "onnxruntime"


class FetchError(RuntimeError):
    """The headers could not be fetched (no apt, no network, package missing)."""


def include_dir(dest: Path) -> Path:
    """Return the include directory that ``fetch`` fills under ``dest``."""
    return dest / INCLUDE_SUBDIR


def headers_present(dest: Path) -> bool:
    """True when ``dest`` already holds the unpacked headers."""
    return (include_dir(dest) / HEADER).is_file()


def _require_tools() -> None:
    missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        raise FetchError(
            f"cannot fetch the ONNX Runtime headers: {', '.join(missing)} not found (a Debian-based "
            "system is needed for the automatic download). Install the ONNX Runtime C/C++ headers "
            "(onnxruntime_c_api.h, onnxruntime_cxx_api.h, onnxruntime_lite_custom_op.h, version >= 1.21) "
            "yourself and point the build at them: SIGEC_ORT_INCLUDE_DIR=/path/to/include pip install ."
        )


def _apt_options(work: Path) -> list[str]:
    """apt-get options that confine sources, lists and caches to ``work``."""
    options = {
        "Dir::Etc::sourcelist": str(work / "sources.list"),
        "Dir::Etc::sourceparts": "/nonexistent",
        "Dir::State::Lists": str(work / "lists"),
        "Dir::Cache::pkgcache": str(work / "pkgcache.bin"),
        "Dir::Cache::srcpkgcache": str(work / "srcpkgcache.bin"),
        "Debug::NoLocking": "1",
    }
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # The private work dir is not readable by apt's sandbox user "_apt".
        options["APT::Sandbox::User"] = "root"
    args: list[str] = []
    for key, value in options.items():
        args += ["-o", f"{key}={value}"]
    return args


def _run(cmd: list[str], cwd: Path) -> None:
    shown = [cmd[0]] + [arg for arg in cmd[1:] if not arg.startswith("-") and "=" not in arg]
    print("fetch_ort_headers: " + " ".join(shown), file=sys.stderr)
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if proc.returncode != 0:
        raise FetchError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout.strip()}")


def fetch(dest: Path, mirror: str = DEFAULT_MIRROR, suite: str = DEFAULT_SUITE) -> Path:
    """Make sure the headers are unpacked under ``dest``; return their include directory."""
    dest = dest.resolve()
    if headers_present(dest):
        return include_dir(dest)
    _require_tools()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sigec-ort-headers-") as tmp:
        work = Path(tmp)
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "sources.list").write_text(f"deb {mirror} {suite} main\n")
        apt = ["apt-get", "-q", *_apt_options(work)]
        _run([*apt, "update"], cwd=work)
        _run([*apt, "download", PACKAGE], cwd=work)
        debs = sorted(work.glob(f"{PACKAGE}_*.deb"))
        if not debs:
            raise FetchError(f"apt-get download did not produce a {PACKAGE} .deb in {work}")
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest.parent))
        try:
            _run(["dpkg", "-x", str(debs[-1]), str(staging)], cwd=work)
            if not (include_dir(staging) / HEADER).is_file():
                raise FetchError(f"{debs[-1].name} does not contain {INCLUDE_SUBDIR / HEADER}")
            if dest.exists():
                shutil.rmtree(dest)
            staging.rename(dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return include_dir(dest)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: fetch (if needed) and print the include directory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"target directory (default {DEFAULT_DEST})")
    parser.add_argument("--mirror", default=DEFAULT_MIRROR, help="Debian mirror URL")
    parser.add_argument("--suite", default=DEFAULT_SUITE, help="Debian suite that has libonnxruntime-dev >= 1.21")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.dest, mirror=args.mirror, suite=args.suite)
    except FetchError as exc:
        print(f"fetch_ort_headers: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
