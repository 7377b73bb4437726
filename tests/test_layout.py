"""Where things live: the import graph has no circle, a module over 400 lines says why it is one
module, and the pipeline's tools call the stages by their public names only. (The layering
itself is import-linter's, in pyproject.toml.)"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
MAX_LINES = 400
REASON = "Why one module"


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of ``edges`` (module -> modules it imports), as the path that closes it."""
    found, state, path = [], dict.fromkeys(edges, 0), []  # 0 unseen, 1 on the path, 2 done

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for other in sorted(edges[module]):
            if state.get(other) == 1:
                found.append([*path[path.index(other) :], other])
            elif state.get(other) == 0:
                visit(other)
        path.pop()
        state[module] = 2

    for module in sorted(edges):
        if state[module] == 0:
            visit(module)
    return found


def test_the_cycle_finder_finds_a_circle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_circle() -> None:
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    edges = {
        m: set(graph.find_modules_directly_imported_by(m)) & graph.modules for m in graph.modules
    }
    assert _cycles(edges) == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_over_400_lines_says_why_it_is_one(path: Path) -> None:
    text = path.read_text()
    if text.count("\n") <= MAX_LINES:
        return
    docstring = ast.get_docstring(ast.parse(text)) or ""
    assert REASON in docstring, f"{path.name}: {text.count(chr(10))} lines, and no '{REASON}'"


def _private_uses(tree: ast.Module) -> list[str]:
    """``from stages... import _name`` and ``<a stages module>._name`` in one module."""
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "stages":
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"from {node.module} import {alias.name}")
                aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "stages" and alias.asname:
                    aliases.add(alias.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_the_private_name_check_sees_both_forms() -> None:
    code = "from stages.teach import table as t\nfrom stages.x import _y\nt._hidden()\nt.shown()\n"
    assert _private_uses(ast.parse(code)) == ["from stages.x import _y", "t._hidden"]


def test_the_pipeline_calls_stages_by_their_public_names_only() -> None:
    uses = {
        str(path.relative_to(ROOT)): found
        for path in sorted((ROOT / "pipeline").rglob("*.py"))
        if (found := _private_uses(ast.parse(path.read_text())))
    }
    assert uses == {}
