"""The import graph of the library and the parity harness has no circle: no module reaches itself through the
modules it imports, counting every import statement (at the top, under TYPE_CHECKING, inside functions)."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("digpt_xla", "parity")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of PACKAGES it imports (``from .x import y`` counts as importing ``.x.y`` when that
    is a module, else ``.x``)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            for target in targets:
                while target and target not in files:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(f"{target}."):  # a package's own __init__
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert len(graph) > 60 and "digpt_xla.engine.metrics" in graph["digpt_xla.cli"]
    assert circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# The floors of the library, lowest first: a module imports only from its own floor or below. Parts for everything
# (errors, files, precision tables), then checkpoints, then the model, then the backends that run it, then the
# config checked against them and the data it names, then the engine, then the tools over the engine.
FLOORS = (
    {
        "errors",
        "entry",
        "yaml_dataclass",
        "config_rules",
        "filesystems",
        "repo",
        "daemon_pool",
        "precision",
        "tpu_emulation",
    },
    {"rundir"},
    {"checkpoint"},
    {"models", "teacher"},
    {"backend"},
    {"config", "data"},
    {"engine"},
    {"tpu_plan", "convert", "cli", "config_keys", "flops"},
)


def _floor(module: str) -> int:
    part = module.split(".")[1] if module.count(".") else "__init__"
    return next((i for i, floor in enumerate(FLOORS) if part in floor), len(FLOORS))


def test_no_module_imports_from_a_floor_above_its_own():
    graph = import_graph()
    library = sorted(m for m in graph if m.startswith("digpt_xla."))
    unplaced = [m for m in library if _floor(m) == len(FLOORS)]
    assert unplaced == [], "every part of the library has a floor"
    upward = [
        f"{m} -> {t}" for m in library for t in sorted(graph[m]) if t.startswith("digpt_xla.") and _floor(t) > _floor(m)
    ]
    assert upward == []


def unresolved_imports() -> list[str]:
    """Imports of the project's own modules (relative, or absolute under PACKAGES) that name no module or package:
    an import inside a function fails only when that function runs, which may be a slow test's worker."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    missing = []
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                depth = len(package.split(".")) - node.level + 1
                if depth < 1:
                    missing.append(f"{name}: {'.' * node.level}{node.module or ''} reaches above the package")
                    continue
                base = ".".join(package.split(".")[:depth] + ([node.module] if node.module else []))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                base = node.module or ""
            elif isinstance(node, ast.Import):
                bases = [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]
                missing += [f"{name}: import {b}" for b in bases if b not in files]
                continue
            else:
                continue
            if base not in files:
                missing.append(f"{name} (line {node.lineno}): from {base} import ...")
    return missing


def test_every_import_of_our_own_modules_names_one_that_exists():
    assert unresolved_imports() == []
