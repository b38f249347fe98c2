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
