"""The package's imports follow its layers (docs/explanation/architecture.md): no module imports one of a higher layer,
and no modules import each other in a cycle. Every import counts, at module level or inside a function, since a
lazy import is a dependency all the same."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import brats_fl
import pytest

PACKAGE = Path(brats_fl.__file__).resolve().parent
#: each top-level package or module of brats_fl -> its layer, in the order data flows; a module may import its own
#: layer and those below. Ground floor: the names and settings everyone shares
LAYERS: dict[str, int] = {
    "__init__": 0,
    "version": 0,
    "protocol": 0,
    "settings": 0,
    "data": 1,
    "seg": 2,
    "site": 3,
    "transfer": 3,
    "drills": 3,
    "server": 4,
    "ops": 4,
    "jobs": 5,
    "results": 6,
    "cli": 7,
}


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name)."""
    names = {}
    for path in root.rglob("*.py"):
        parts = ["brats_fl", *path.relative_to(root).with_suffix("").parts]
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module ``name`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [[a.name] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*parent, base] if base else parent)
            # ``from brats_fl.x import y`` imports module brats_fl.x.y where there is one, else a name of brats_fl.x
            candidates = [[f"{base}.{a.name}", base] for a in node.names]
        else:
            continue
        for options in candidates:
            for target in options:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
                    break
    return found


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    names = module_names(root)
    return {name: imports(name, path, set(names)) for name, path in names.items()}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    if top not in LAYERS:
        where = "LAYERS; docs/explanation/architecture.md"
        raise AssertionError(f"{module}: place its package {top!r} in a layer ({where})")
    return LAYERS[top]


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Every import of a module of a higher layer, in words."""
    return sorted(
        f"{source} (layer {layer(source)}) imports {target} (layer {layer(target)})"
        for source, targets in edges.items()
        for target in targets
        if layer(target) > layer(source)
    )


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (Tarjan's strongly connected
    components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_a_higher_layer():
    found = upward(graph())
    assert not found, "\n".join(found)


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "\n".join(" <-> ".join(group) for group in found)


def test_every_package_has_a_layer():
    tops = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    tops |= {p.stem for p in PACKAGE.glob("*.py")}
    assert tops == set(LAYERS)


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # a lazy import inside a function counts as well
        ("site/extra.py", "def f():\n    from brats_fl.server.fedavg import rounds_left\n", upward),
        ("seg/extra.py", "from ..jobs import catalogue\n", upward),
        ("results/extra.py", "import brats_fl.results.extra_two\n", cycles),
    ],
)
def test_the_checks_catch_what_they_guard(tmp_path: Path, module: str, line: str, broken):
    """A copy of the package with one bad import added fails the check that guards against it."""
    root = tmp_path / "brats_fl"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / module).write_text(line)
    if broken is cycles:
        (root / "results" / "extra_two.py").write_text("from brats_fl.results import extra\n")
    edges = graph(root)
    assert broken(edges), f"{module}: {line!r} went unnoticed"
