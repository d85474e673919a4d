"""The package's layers import only downwards, and no module imports itself through others.

Layers, bottom to top (docs/architecture.md, "Layers"):

    core (sigec.core)            contract: errors, op vocabulary, names, options, manifest, engine file, mask program
    gpu (sigec.gpu)              Triton kernels and TensorRT plugins        -> core
    passes (sigec.passes)        compile side                               -> core, gpu
    runtime (sigec.runtime)      run side                                   -> core, gpu
    api (sigec, compiler, loader, autotune, inspection, frontends, progress) -> everything below
    apps (sigec.apps)            zoo, SDEdit, demo, bench, serve           -> everything below
    cli (sigec.cli)              the command line                           -> everything

Every import counts, also those inside functions: a late import must not hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = {"sigec": ROOT / "sigec", "sigec.passes": ROOT / "passes", "sigec.runtime": ROOT / "runtime",
               "sigec.gpu": ROOT / "plugins" / "gpu"}
ALLOWED = {
    "core": {"core"},
    "gpu": {"core", "gpu"},
    "passes": {"core", "gpu", "passes"},
    "runtime": {"core", "gpu", "runtime"},
    "api": {"core", "gpu", "passes", "runtime", "api"},
    "apps": {"core", "gpu", "passes", "runtime", "api", "apps"},
    "cli": {"core", "gpu", "passes", "runtime", "api", "apps", "cli"},
}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in SOURCE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _modules()


def layer_of(module: str) -> str:
    """The layer a sigec module belongs to."""
    for prefix, layer in (("sigec.core", "core"), ("sigec.gpu", "gpu"), ("sigec.passes", "passes"),
                          ("sigec.runtime", "runtime"), ("sigec.apps", "apps"), ("sigec.cli", "cli")):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return "api"


def _resolve(module: str, name: str) -> str:
    """The sigec module an import of ``name`` from ``module`` refers to (the longest known prefix)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(module: str) -> list[tuple[str, int]]:
    """(imported sigec module, line) for every import in ``module``'s source, at any depth."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule when there is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            if name == "sigec" or name.startswith("sigec."):
                found.append((_resolve(module, name), node.lineno))
    return found


def test_modules_were_found():
    assert {"sigec.core.errors", "sigec.passes.sparse_rewrite", "sigec.runtime.engine", "sigec.gpu.triton_ops",
            "sigec.apps.zoo", "sigec.cli"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    mine = layer_of(module)
    wrong = [f"line {line}: {target} ({layer_of(target)})" for target, line in imports_of(module)
             if layer_of(target) not in ALLOWED[mine]]
    assert not wrong, f"{module} ({mine}) may import only {sorted(ALLOWED[mine])}; it imports " + "; ".join(wrong)


def test_no_import_cycles():
    graph = {m: {t for t, _ in imports_of(m) if t != m and not m.startswith(t + ".")} for m in MODULES}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t in graph and not state.get(t):
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)


def test_the_check_sees_a_crossing_import(tmp_path, monkeypatch):
    """The checker itself: a runtime module importing the compile side is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from sigec.passes.sparse_rewrite import rewrite\n")
    monkeypatch.setitem(MODULES, "sigec.runtime.bad", bad)
    with pytest.raises(AssertionError, match="sigec.passes.sparse_rewrite"):
        test_imports_point_down_the_layers("sigec.runtime.bad")
