"""The package's shape: every module imports, no import cycles, no overlong module, errors at the bottom.

Also the repository's: tests/ and benchmarks/ never import each other (what both
need, the tiny models and corpus, lives in ``alignkd.testing``), and
``alignkd.testing`` leans only on the package's lower layers.

The import graph is read from the source with ``ast`` rather than from
``sys.modules``, so an import inside a function counts as an edge too: a lazy
import placed to dodge a cycle still shows up here as that cycle.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "alignkd"
REPO = ROOT.parent
MAX_LINES = 400

LAYERS = [
    ("errors",),
    ("checks", "precision", "display", "disk"),
    ("losses",),
    ("assets", "models", "data"),
    ("terms",),
    ("align",),
    ("config",),
    ("backend",),
    ("teacher",),
    ("engine",),
    ("evaluate", "report", "study", "demo", "export", "cli", "testing", "integrations", "__main__", ""),
]
"""alignkd's packages (and top-level modules) from the bottom up. A package may import
those of its own layer and of the layers below it, never one above; within a layer
the package graph must still have no cycle. ``""`` is the top-level ``alignkd``
package itself (its ``distill`` shortcut)."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``, which never run."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str) -> set[str]:
    """The alignkd modules ``name`` imports, at module level or inside functions.

    ``from pkg import sub`` points at ``pkg.sub`` when ``sub`` is a module, else at
    ``pkg`` (its ``__init__``). Importing ``pkg.sub`` also runs ``pkg/__init__``,
    so that is an edge too, except for the packages ``name`` itself sits in: those
    are already running when ``name`` runs (a package re-exporting its own
    submodules is not a cycle).
    """
    path = MODULES[name]
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb level - 1 packages from this one
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES}
            found |= subs
            if len(subs) < len(node.names):  # some name is read from the package itself
                found.add(target)
    parents = {p for m in found for p in _ancestors(m)}
    return {m for m in found | parents if m in MODULES and m != name and m not in _ancestors(name)}


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_import_cycles():
    graph = {name: imports_of(name) for name in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_reports_the_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_no_module_is_too_long():
    lengths = {
        p.relative_to(ROOT.parent).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in MODULES.values()
    }
    long = {p: n for p, n in sorted(lengths.items()) if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines, split them by concern: " + ", ".join(
        f"{p} ({n})" for p, n in long.items()
    )


def test_errors_import_nothing_from_alignkd():
    assert imports_of("alignkd.errors") == set(), "alignkd/errors.py is the bottom of the package"


def package_of(module: str) -> str:
    """``alignkd.engine.run`` -> ``engine``; ``alignkd.errors`` -> ``errors``; ``alignkd`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {package_of(m): set() for m in MODULES}
    for name in MODULES:
        for target in imports_of(name):
            if package_of(target) != package_of(name):
                graph[package_of(name)].add(package_of(target))
    return graph


def test_every_package_has_a_layer():
    layered = {p for layer in LAYERS for p in layer}
    missing = sorted(set(package_graph()) - layered)
    assert not missing, f"add these packages to LAYERS in tests/test_layout.py (and docs/architecture.md): {missing}"


def test_packages_import_only_their_layer_and_below():
    level = {p: i for i, layer in enumerate(LAYERS) for p in layer}
    upward = [
        f"alignkd.{m} imports alignkd.{t}"
        for m in sorted(MODULES)
        for t in sorted(imports_of(m))
        if level.get(package_of(t), -1) > level.get(package_of(m), len(LAYERS))
    ]
    assert not upward, "a lower package imports a higher one (see LAYERS): " + "; ".join(upward)


def test_no_package_cycles():
    cycle = find_cycle(package_graph())
    assert cycle is None, "package import cycle: " + " -> ".join(cycle)


def test_layer_check_sees_an_upward_import(monkeypatch):
    """The check is not vacuous: an edge from a low package to a high one is reported."""
    level = {p: i for i, layer in enumerate(LAYERS) for p in layer}
    assert level["losses"] < level["engine"] and level["models"] < level["align"] < level["config"]
    assert "alignkd.terms" in {m.rsplit(".", 1)[0] if m.count(".") > 1 else m for m in imports_of("alignkd.align.plan")}


def test_the_architecture_page_names_every_package():
    page = (ROOT.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [p for layer in LAYERS for p in layer if p not in ("", "__main__") and f"`{p}`" not in page]
    assert not missing, f"docs/architecture.md's layer table lacks {missing}"


def top_level_imports(path: Path) -> set[str]:
    """The first component of every module ``path`` imports (absolute imports), at any depth."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.partition(".")[0])
    return found


@pytest.mark.parametrize(("folder", "forbidden"), [("benchmarks", "tests"), ("tests", "benchmarks")])
def test_tests_and_benchmarks_do_not_import_each_other(folder, forbidden):
    """Tests reach a benchmark only through a child process (``python -m benchmarks.x``)."""
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}/"
    offenders = [p.relative_to(REPO).as_posix() for p in files if forbidden in top_level_imports(p)]
    assert not offenders, f"these import {forbidden}, move what they share to alignkd/testing.py: {offenders}"


def test_top_level_imports_sees_imports_in_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os.path\nfrom . import sibling\ndef f():\n    from tests.tiny import build\n")
    assert top_level_imports(src) == {"os", "tests"}


def test_testing_helpers_import_only_the_lower_layers():
    lower = {"alignkd", "alignkd.errors", "alignkd.precision", "alignkd.models"}
    outside = {m for m in imports_of("alignkd.testing") if m not in lower and not m.startswith("alignkd.models.")}
    assert not outside, f"alignkd/testing.py imports {sorted(outside)}: only models, errors and precision"
