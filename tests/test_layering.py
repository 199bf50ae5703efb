"""The package's import graph: no cycles (imports made only for type checking count), and the
intake names no feature while features reach the pipeline only through ``pipeline.plan``."""

from __future__ import annotations

import ast
from pathlib import Path

import phonepush

ROOT = Path(phonepush.__file__).parent
FEATURES = ("phonepush.alerting", "phonepush.audio", "phonepush.grouping", "phonepush.silence")


def _graph() -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                # Importing a.b.c runs a and a.b too: their __init__ modules are edges as well.
                while target:
                    if target in modules and target != name and not name.startswith(target + "."):
                        graph[name].add(target)
                    target = target.rpartition(".")[0]
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_intake_names_no_feature_and_features_never_the_intake() -> None:
    graph = _graph()
    assert not {m for m in graph["phonepush.pipeline.intake"] if m.startswith(FEATURES)}
    for module, imports in graph.items():
        if module.startswith(FEATURES):
            assert "phonepush.pipeline.intake" not in imports, module
            assert "phonepush.app.builder" not in imports, module


def test_the_top_level_stays_a_map_of_packages() -> None:
    """Modules at the package's top level are the few that everything shares; anything with
    a concept of its own goes in a package named for it (docs/design.md, "The package map")."""
    top = sorted(path.name for path in ROOT.glob("*.py"))
    assert len(top) <= 12, top


def test_no_class_grows_past_thirty_methods() -> None:
    """A class with more is doing the work of several (the old spool had 58 methods over 11
    tables); split it by concern, as store/ and sources/mqtt/ are."""
    large: list[str] = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                methods = [
                    item
                    for item in node.body
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                ]
                if len(methods) > 30:
                    large.append(f"{path.relative_to(ROOT)}:{node.name} ({len(methods)})")
    assert not large, large
