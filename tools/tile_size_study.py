"""How the tile size trades wasted MACs against kernel efficiency (cost model input, no timing).

Usage: python tools/tile_size_study.py MODEL.onnx [--tiles 4,6,8,12,16] [--edits 0.012,0.05,0.2]
Compiles the model once per tile size (approx mode) and prints the MAC reduction that the mask
program gives for centred square edits.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile


import sigec
from sigec import inspection as insp
from sigec.runtime.synthetic_edits import square_mask
from sigec.core.engine_file import read_manifest


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--tiles", default="4,6,8,12,16")
    parser.add_argument("--edits", default="0.012,0.05,0.2")
    parser.add_argument("--mode", default="approx")
    args = parser.parse_args()
    edits = [float(e) for e in args.edits.split(",")]
    print("| tile | " + " | ".join(f"MAC reduction at {e * 100:.1f}%" for e in edits) + " |")
    print("|---|" + "---|" * len(edits))
    with tempfile.TemporaryDirectory() as tmp:
        for tile in (int(t) for t in args.tiles.split(",")):
            path = sigec.compile(args.model, pathlib.Path(tmp) / f"t{tile}.sigec", mode=args.mode, tile_size=tile)
            manifest = read_manifest(path)
            h, w = manifest["mask_program"]["input_size"]
            cells = [f"{insp.report(manifest, square_mask(h, w, e))['mask']['mac_reduction']:.2f}x" for e in edits]
            print(f"| {tile} | " + " | ".join(cells) + " |", flush=True)
            path.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
