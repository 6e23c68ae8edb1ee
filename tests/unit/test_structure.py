"""The ingress package imports one way: api -> routes -> services -> handles, no circle.

Every import counts, those under ``TYPE_CHECKING`` too: a circle there is still a circle a
reader has to untangle."""

from __future__ import annotations

import ast
from pathlib import Path

import voltage_ray.ingress

PACKAGE = "voltage_ray.ingress"
ROOT = Path(voltage_ray.ingress.__file__).parent


def imports() -> dict[str, set[str]]:
    """Module -> the modules of the package it imports."""
    graph: dict[str, set[str]] = {}
    names = {p.stem for p in ROOT.glob("*.py")} - {"__init__"}
    for name in names:
        found: set[str] = set()
        for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == PACKAGE:  # from voltage_ray.ingress import chat, ...
                    found |= {a.name for a in node.names if a.name in names}
                elif node.module.startswith(PACKAGE + "."):
                    found.add(node.module.removeprefix(PACKAGE + "."))
            elif isinstance(node, ast.Import):
                found |= {
                    a.name.removeprefix(PACKAGE + ".")
                    for a in node.names
                    if a.name.startswith(PACKAGE + ".")
                }
        graph[name] = found - {name}
    return graph


def test_the_ingress_imports_have_no_circle() -> None:
    graph = imports()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, "import circle: " + " -> ".join([*path, name])
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_only_the_deployment_knows_the_deployment() -> None:
    """Routes and failover see the replica as ``services.Services``; nothing imports
    ``deployment`` (the builder does, from outside the package)."""
    graph = imports()
    assert [name for name, deps in graph.items() if "deployment" in deps] == []
    assert {"api", "services"} <= graph["deployment"]
    routes = ("chat", "completions", "embeddings", "images", "models")
    assert set(routes) <= graph["api"]
    assert [r for r in routes if "api" in graph[r]] == []  # routes never reach back up
