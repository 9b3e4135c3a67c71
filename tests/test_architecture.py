"""The package's import graph, read with ``ast`` from every module of ``src/cxrstudy`` (function-level imports
included): no cycle, the lung stage and the data step never reach ``cxrstudy.evaluation``, ``cxrstudy.stats``
is a leaf.

An edge goes to the module an import names: ``from cxrstudy.a import b`` reaches ``cxrstudy.a.b`` when that is
a module, else ``cxrstudy.a`` (its ``__init__``). A package ``__init__`` importing its own submodules is an
ordinary edge (it is what importing the package runs); a submodule's implicit import of its parent package is
not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import cxrstudy

PACKAGE_DIR = Path(cxrstudy.__file__).parent
#: Packages whose modules must never import, even indirectly, anything of ``cxrstudy.evaluation``.
LOWER_STAGES = ("cxrstudy.lungs", "cxrstudy.data")


def package_modules(root: Path = PACKAGE_DIR) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every ``.py`` file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def module_imports(name: str, path: Path, is_pkg: bool, modules: dict) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its file (top level, functions, classes)."""
    top = name.split(".")[0]
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == top}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            if source.split(".")[0] != top:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in modules else source)
    return {m for m in found if m != name}


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = package_modules(root)
    return {name: module_imports(name, path, is_pkg, modules) for name, (path, is_pkg) in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first search (``[a, b, ..., a]``); empty when the graph is acyclic."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def reach(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module reachable from ``start`` with one import path to it."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                todo.append(nxt)
    return paths


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


GRAPH = import_graph()


def test_the_graph_sees_top_level_function_level_and_relative_imports(tmp_path):
    assert "cxrstudy.evaluation.metrics" in GRAPH["cxrstudy.reporting.results"]  # top level
    assert "cxrstudy.features" in GRAPH["cxrstudy.evaluation.shortcuts"]  # inside run_shortcut_checks
    assert "cxrstudy.training.runs" in GRAPH["cxrstudy.training"]  # an __init__ and its submodule
    pkg = tmp_path / "cxrstudy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\nimport cxrstudy.c as c\n")
    (pkg / "c.py").write_text("import json\nfrom cxrstudy import thing\n")
    graph = import_graph(pkg)
    assert graph == {
        "cxrstudy": set(),
        "cxrstudy.a": {"cxrstudy.sub.b"},
        "cxrstudy.c": {"cxrstudy"},
        "cxrstudy.sub": {"cxrstudy.sub.b"},
        "cxrstudy.sub.b": {"cxrstudy.a", "cxrstudy.c"},
    }
    assert find_cycles(graph) == [["cxrstudy.a", "cxrstudy.sub.b", "cxrstudy.a"]]


def test_no_import_cycle():
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_lung_stage_and_data_step_never_reach_evaluation():
    bad = []
    for name in GRAPH:
        if any(_in(name, p) for p in LOWER_STAGES):
            bad += [" -> ".join(path) for m, path in reach(GRAPH, name).items() if _in(m, "cxrstudy.evaluation")]
    assert not bad, "lower stages import evaluation: " + "; ".join(sorted(bad))


def test_stats_is_a_leaf():
    assert "cxrstudy.stats" in GRAPH
    assert GRAPH["cxrstudy.stats"] == set()
