"""``sigec inspect``: what the rewrite did, and what a given mask would cost."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import onnx

from sigec.runtime import costs
from sigec.core.mask_program import normalize_mask, tiles_for_mask


def report(manifest: dict[str, Any], mask: np.ndarray | None = None) -> dict[str, Any]:
    """The inspection report as plain data (what ``--json`` prints)."""
    nodes = [dict(n) for n in manifest["nodes"]]
    out: dict[str, Any] = {
        "mode": manifest["mode"], "backend": manifest["backend"], "sigec_version": manifest.get("sigec_version"),
        "inputs": manifest["inputs"], "outputs": manifest["outputs"],
        "resolutions": manifest["resolutions"],
        "caches": {"count": len(manifest["caches"]),
                   "bytes": int(sum(np.prod(c["shape"]) * np.dtype(c["dtype"]).itemsize for c in manifest["caches"]))},
        "approximations": manifest["approximations"],
        "kinds": {k: sum(1 for n in nodes if n["kind"] == k) for k in sorted({n["kind"] for n in nodes})},
        "dense_macs": costs.dense_macs(nodes),
        "nodes": nodes,
    }
    if mask is not None:
        tiles = tiles_for_mask(manifest, normalize_mask(mask, manifest["mask_program"]["input_size"],
                                                        int(manifest.get("batch", 1))))
        for n in nodes:
            n["executed_macs"] = costs.node_macs(n, tiles)
        executed = costs.executed_macs(nodes, tiles)
        out["mask"] = {
            "edited_fraction": float(np.asarray(mask).astype(bool).mean()),
            "active_tiles": {k: t.count for k, t in tiles.items()},
            "active_fraction": {k: t.fraction for k, t in tiles.items()},
            "executed_macs": executed,
            "mac_reduction": out["dense_macs"] / max(executed, 1),
        }
    return out


def render(rep: dict[str, Any], console: Any = None) -> None:
    """Print the report as rich tables."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        console = Console(width=max(console.width, 150))  # the node table needs room; pipes report 80
    console.print(f"[bold]sigec engine[/bold] mode={rep['mode']} backend={rep['backend']} "
                  f"version={rep['sigec_version']}  nodes: " + ", ".join(f"{k} {v}" for k, v in rep["kinds"].items()))
    res = Table(title="resolutions")
    for col in ("name", "size", "tile", "active tiles", "active fraction"):
        res.add_column(col)
    for r in rep["resolutions"]:
        m = rep.get("mask", {})
        res.add_row(r["name"], f"{r['size'][0]}x{r['size'][1]}", str(r["tile"]),
                    str(m.get("active_tiles", {}).get(r["name"], "")),
                    f"{m['active_fraction'][r['name']]:.3f}" if m else "")
    console.print(res)
    table = Table(title="nodes")
    for col in ("node", "op", "kind", "resolution", "tile", "window", "dense MMACs", "executed MMACs", "note"):
        table.add_column(col, overflow="fold")
    for n in rep["nodes"]:
        if n["kind"] == "constant":
            continue
        table.add_row(n["name"], n["op_type"], n["kind"], n.get("resolution", ""), str(n.get("tile", "")),
                      "x".join(map(str, n["window"])) if n.get("window") else "",
                      f"{n.get('dense_macs', 0) / 1e6:.2f}" if n.get("dense_macs") else "",
                      f"{n['executed_macs'] / 1e6:.2f}" if "executed_macs" in n else "", n.get("note", ""))
    console.print(table)
    console.print(f"caches: {rep['caches']['count']} tensors, {rep['caches']['bytes'] / 2**20:.1f} MiB per key")
    for a in rep["approximations"]:
        console.print(f"[yellow]approximation[/yellow] {a['node']} ({a['op_type']}): {a['detail']}")
    console.print(f"dense MACs: {rep['dense_macs'] / 1e9:.4f} G")
    if "mask" in rep:
        m = rep["mask"]
        console.print(f"mask: {m['edited_fraction'] * 100:.2f}% of pixels edited -> executed MACs "
                      f"{m['executed_macs'] / 1e9:.4f} G, MAC reduction {m['mac_reduction']:.2f}x")


def export_onnx(path: str | os.PathLike, out_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Write the engine's FULL, SPARSE and DENSE graphs (with weights) as .onnx files for Netron."""
    from sigec.core.engine_file import read_engine

    contents = read_engine(path)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in contents.graphs.items():
        model = onnx.ModelProto.FromString(data)
        used = {i for node in model.graph.node for i in node.input}
        for wname in sorted(used & set(contents.weights)):
            model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(contents.weights[wname]), wname))
        target = out / f"{name}.onnx"
        onnx.save(model, target)
        written.append(target)
    return written
