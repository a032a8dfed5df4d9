"""No import cycle among imgtrain's modules, counting every import: top-level and inside functions.

A function-level import hides a cycle from Python (it runs after both modules have loaded) but not from a
reader: the two modules still cannot be understood, tested or moved apart. Imports are read with ``ast``
from src/imgtrain, relative ones resolved; importing ``a.b.c`` also runs the ``__init__`` of ``a.b``, so
that package counts too (unless the importer lives inside it: its package is loaded before it).
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import imgtrain

SRC = Path(imgtrain.__file__).parent


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package) for every .py file under ``root`` (a package)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first import} over every import statement of every module."""
    mods = _modules(root)
    return {
        name: _imports_of(name, path, is_package, mods, root) for name, (path, is_package) in mods.items()
    }


def _imports_of(name: str, path: Path, is_package: bool, mods: dict, root: Path) -> dict[str, int]:
    top = root.name
    package = name if is_package else name.rpartition(".")[0]
    edges: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        # The packages above the target run their __init__ first, except those that hold the importer (they
        # are loaded before it). A compiled module (data/_jpegroi) has no source here and imports nothing.
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            dep = ".".join(parts[:i])
            if dep != name and dep in mods and not (name + ".").startswith(dep + "."):
                edges.setdefault(dep, line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == top or alias.name.startswith(top + "."):
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module != top and not module.startswith(top + "."):
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                # `from package import submodule`, else a name defined in that module
                add(sub if sub in mods else module, node.lineno)
    return edges


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle (its modules in import order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for dep in sorted(graph.get(m, {})):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    """``a:LINE -> b:LINE -> a``: each module with the line of its import of the next."""
    return " -> ".join(f"{a}:{graph[a][b]}" for a, b in itertools.pairwise(cycle)) + f" -> {cycle[-1]}"


def test_imgtrain_has_no_import_cycle():
    graph = import_graph(SRC)
    assert (
        len(graph) > 40 and "imgtrain.train.trainer" in graph["imgtrain.commands"]
    )  # the walk sees lazy imports
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {_describe(cycle, graph)}"


def test_a_cycle_through_a_function_level_import_is_found_and_named(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import math\n\n\ndef g():\n    from pkg.a import x\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub": 1, "pkg.sub.b": 1}
    cycle = find_cycle(graph)
    assert cycle is not None and _describe(cycle, graph) == ("pkg.a:1 -> pkg.sub.b:2 -> pkg.c:5 -> pkg.a")
    (pkg / "c.py").write_text("def g():\n    import pkg.sub\n")  # no longer back to a
    assert find_cycle(import_graph(pkg)) is None
