"""``sigec inspect``: what the rewrite did, and what a given mask would cost."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

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


NO_RESOLUTION = "-"
"""Summary row of the nodes outside every tile grid (dense islands, static nodes)."""


def plural(count: int, noun: str) -> str:
    """'1 resolution', '3 resolutions' (nouns with a plain -s plural)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _group(rep: dict[str, Any], key: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for n in rep["nodes"]:
        if n["kind"] != "constant":  # folded constants cost nothing and would only add rows
            groups.setdefault(key(n), []).append(n)
    rows = []
    for name, members in groups.items():
        kinds: dict[str, int] = {}
        for n in members:
            kinds[n["kind"]] = kinds.get(n["kind"], 0) + 1
        row = {"name": name, "nodes": len(members), "kinds": kinds, "dense_macs": costs.dense_macs(members)}
        if "mask" in rep:
            row["executed_macs"] = sum(int(n.get("executed_macs", 0)) for n in members)
        rows.append(row)
    return rows


def summary(rep: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The report's nodes (constants left out) aggregated per resolution and per op type.

    Each row has ``name``, ``nodes``, ``kinds`` (count per kind), ``dense_macs`` and, when the
    report has a mask, ``executed_macs``: sums over the row's nodes as ``report`` counts them.
    Resolutions come in the manifest's order, then resolutions that run dense, then
    ``NO_RESOLUTION``; op types by dense MACs, largest first.
    """
    order = {r["name"]: i for i, r in enumerate(rep["resolutions"])}

    def resolution_rank(row: dict[str, Any]) -> tuple[int, int, str]:
        if row["name"] in order:
            return 0, order[row["name"]], ""
        return (2, 0, "") if row["name"] == NO_RESOLUTION else (1, 0, row["name"])

    by_resolution = sorted(_group(rep, lambda n: n.get("resolution") or NO_RESOLUTION), key=resolution_rank)
    by_op = sorted(_group(rep, lambda n: n["op_type"]), key=lambda r: (-r["dense_macs"], -r["nodes"], r["name"]))
    return {"resolutions": by_resolution, "ops": by_op}


def _kinds_text(kinds: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))


def _mmacs(macs: int) -> str:
    return f"{macs / 1e6:.2f}" if macs else ""


def _share(macs: int, total: int) -> str:
    return f"{macs / max(total, 1):.1%}" if macs else ""


def _render_summary(rep: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    rows = summary(rep)
    mask = rep.get("mask")
    total = rep["dense_macs"]
    sizes = {r["name"]: r for r in rep["resolutions"]}
    outside = any(row["name"] == NO_RESOLUTION for row in rows["resolutions"])
    res = Table(title="per resolution",
                caption=f"{NO_RESOLUTION}: nodes outside the tile grids (dense islands, static)" if outside else None)
    columns = ["resolution", "size", "tile", "nodes", "dense MMACs", "share"]
    if mask:
        columns += ["active tiles", "active fraction", "executed MMACs"]
    for col in columns:
        res.add_column(col)
    for row in rows["resolutions"]:
        r = sizes.get(row["name"])
        size = f"{r['size'][0]}x{r['size'][1]}" if r else ""
        tile = str(r["tile"]) if r else ("" if row["name"] == NO_RESOLUTION else "dense")
        cells = [row["name"], size, tile, _kinds_text(row["kinds"]), _mmacs(row["dense_macs"]),
                 _share(row["dense_macs"], total)]
        if mask:
            cells += [str(mask["active_tiles"].get(row["name"], "")),
                      f"{mask['active_fraction'][row['name']]:.3f}" if row["name"] in mask["active_fraction"] else "",
                      _mmacs(row["executed_macs"])]
        res.add_row(*cells)
    console.print(res)
    ops = Table(title="per op type")
    for col in ("op", "nodes", "dense MMACs", "share") + (("executed MMACs",) if mask else ()):
        ops.add_column(col)
    for row in rows["ops"]:
        cells = [row["name"], _kinds_text(row["kinds"]), _mmacs(row["dense_macs"]), _share(row["dense_macs"], total)]
        ops.add_row(*cells, *((_mmacs(row["executed_macs"]),) if mask else ()))
    console.print(ops)


def _render_nodes(rep: dict[str, Any], console: Any) -> None:
    from rich.table import Table

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


def render(rep: dict[str, Any], console: Any = None, *, nodes: bool = False) -> None:
    """Print the report as rich tables: a summary per resolution and per op type, or with
    ``nodes=True`` the table of every node and every approximation."""
    from rich.console import Console

    if console is None:
        console = Console()
        console = Console(width=max(console.width, 150))  # the node table needs room; pipes report 80
    console.print(f"[bold]sigec engine[/bold] mode={rep['mode']} backend={rep['backend']} "
                  f"version={rep['sigec_version']}  nodes: " + ", ".join(f"{k} {v}" for k, v in rep["kinds"].items()))
    if nodes:
        _render_nodes(rep, console)
    else:
        _render_summary(rep, console)
    console.print(f"caches: {plural(rep['caches']['count'], 'tensor')}, "
                  f"{rep['caches']['bytes'] / 2**20:.1f} MiB per key")
    per_node = [a for a in rep["approximations"] if a["node"] != "*"]
    for a in rep["approximations"]:
        if nodes or a["node"] == "*":  # engine-wide approximations are always worth a line
            console.print(f"[yellow]approximation[/yellow] {a['node']} ({a['op_type']}): {a['detail']}")
    if per_node and not nodes:
        ops: dict[str, int] = {}
        for a in per_node:
            ops[a["op_type"]] = ops.get(a["op_type"], 0) + 1
        console.print(f"[yellow]approximations[/yellow] at {plural(len(per_node), 'node')} ({_kinds_text(ops)}), "
                      f"each listed with the node table")
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
