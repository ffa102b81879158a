"""The package's shape, read from the sources with ``ast`` (nothing is imported):

* no import cycle among safejax modules (imports inside functions count too);
* no import of a safejax module inside a function, except in the CLI (fast ``--help``);
* no file under ``safejax/`` longer than 500 lines;
* ``safejax/rl/`` imports no other safejax package, ``parallel.py`` imports only ``safejax.config``,
  ``safejax/slices.py`` imports only the standard library, ``safejax/evaluate/`` nothing from ``safejax/train/``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "safejax"
MAX_LINES = 500
# files whose function-level safejax imports are allowed: the CLI entry points import their subcommands lazily
LAZY_IMPORTS_ALLOWED = {"safejax.cli"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


MODULES = _modules()


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _targets(node: ast.Import | ast.ImportFrom, name: str, path: Path) -> list[str]:
    """safejax modules that an import statement loads (``from pkg import mod`` names the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "safejax"]
    base = node.module or ""
    if node.level:
        pkg = _package_of(name, path).split(".")
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    if base.split(".")[0] != "safejax":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _imports(name: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported safejax module, inside a function?, line) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.extend((t, in_function, child.lineno) for t in _targets(child, name, path))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _loaded(target: str) -> list[str]:
    """Modules that importing ``target`` runs: the module and its parent packages' ``__init__``."""
    parts = target.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(2, len(parts) + 1)) if m in MODULES]


def _edges(name: str) -> set[str]:
    own_packages = set(_loaded(name))  # a module's own parent packages are already being imported
    return {m for t, _, _ in GRAPH[name] for m in _loaded(t) if m != name and m not in own_packages}


def _find_cycle() -> list[str] | None:
    colour: dict[str, int] = {}
    stack: list[str] = []

    def dfs(u):
        colour[u] = 1
        stack.append(u)
        for v in sorted(_edges(u)):
            if colour.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in colour:
                found = dfs(v)
                if found:
                    return found
        stack.pop()
        colour[u] = 2
        return None

    for m in sorted(MODULES):
        if m not in colour:
            found = dfs(m)
            if found:
                return found
    return None


def test_the_import_graph_is_read_from_the_sources():
    assert "safejax.parallel" in MODULES and "safejax.train.ppo_loop" in MODULES
    assert any(t == "safejax.parallel" for t, _, _ in GRAPH["safejax.train.fit"])


def test_no_import_cycle_among_safejax_modules():
    assert _find_cycle() is None, " -> ".join(_find_cycle() or [])


def test_cycle_finder_sees_a_cycle(monkeypatch):
    monkeypatch.setitem(GRAPH, "safejax.config", GRAPH["safejax.config"] + [("safejax.train.fit", True, 1)])
    assert _find_cycle() is not None


def test_no_safejax_import_inside_a_function_outside_the_cli():
    found = [f"{MODULES[n].relative_to(PKG.parent)}:{line} imports {t}"
             for n, imps in GRAPH.items() if n not in LAZY_IMPORTS_ALLOWED
             for t, inner, line in imps if inner]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_file_over_500_lines(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[name]} has {n} lines (split it along its jobs)"


def test_rl_imports_no_other_safejax_package():
    bad = [(n, t) for n, imps in GRAPH.items() if n.startswith("safejax.rl")
           for t, _, _ in imps if not t.startswith("safejax.rl")]
    assert not bad


def test_parallel_imports_only_config():
    assert {t for t, _, _ in GRAPH["safejax.parallel"]} <= {"safejax.config"}


def test_slices_imports_only_the_standard_library():
    tree = ast.parse(MODULES["safejax.slices"].read_text())
    tops = {(a.name if isinstance(n, ast.Import) else n.module).split(".")[0]
            for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in (n.names if isinstance(n, ast.Import) else [n])}
    assert tops <= set(sys.stdlib_module_names) | {"__future__"}, tops


def test_evaluate_imports_nothing_from_train():
    bad = [(n, t) for n, imps in GRAPH.items() if n.startswith("safejax.evaluate")
           for t, _, _ in imps if t.startswith("safejax.train")]
    assert not bad


def _physical_axis_literals(path: Path) -> list[str]:
    """``"fsdp"`` / ``"tensor"`` string constants anywhere, and any string constant inside a ``P(...)`` /
    ``PartitionSpec(...)`` call or a ``mesh.shape[...]`` subscript (``"data"`` is also an ordinary word)."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in ("fsdp", "tensor"):
            found.append(f"{path.name}:{node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                "P", "PartitionSpec"):
            found += [f"{path.name}:{a.lineno}: P({a.value!r})" for a in ast.walk(node)
                      if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        elif (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "shape"
              and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
            found.append(f"{path.name}:{node.lineno}: shape[{node.slice.value!r}]")
    return found


def test_physical_mesh_axes_are_named_only_by_the_rules_table_and_the_mesh():
    hits = [h for p in sorted(PKG.rglob("*.py")) if p.name != "parallel.py" for h in _physical_axis_literals(p)]
    assert hits == []
    assert _physical_axis_literals(PKG / "parallel.py"), "the check no longer sees the table itself"
