"""``voltage_ray`` imports one way: between its rooms, and inside each room, no import points up
and none closes a circle.

The rooms, top to bottom (a room imports only rooms below it; rooms on one line know nothing of
each other)::

    cli, notebook          the command and the notebook helpers (entry points)
    app                    build_app(args): the Serve application (the api)
    ingress                routes -> the services they call -> handles (its own order below)
    deployments            ChatServer, EmbeddingServer, ImageServer and their builder
    backends, protocol, limits
                           model code behind small protocols (no Ray, no HTTP, no wire
                           models: it takes deployments/asks.py's Turns and Asks); the
                           wire's models; keys, plans, quotas and the limiter
    config, errors, metrics
    voltage_ray            the package itself (``__version__``)

Inside ``ingress`` (a module imports its own layer or those below; never in a circle)::

    builder                the Ingress deployment bound over the models' deployments
    deployment             the replica: builds the collaborators and the app
    api                    the FastAPI app: middleware, error handlers, routers
    chat, completions, embeddings, images, models, responses      the routes
    generation, response_runs, failover, sse, deps                 what the routes call
    auth, served_models, meter, settlement, coalesce               the collaborators
    errors, guards, observe                                        plumbing

Every import counts, those under ``TYPE_CHECKING`` and inside functions too: a circle there is
still a circle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import voltage_ray

PACKAGE = "voltage_ray"
ROOT = Path(voltage_ray.__file__).parent
LAYERS: list[set[str]] = [
    {"cli", "notebook"},
    {"app"},
    {"ingress"},
    {"deployments"},
    {"backends", "protocol", "limits"},
    {"config", "errors", "metrics"},
    {""},  # voltage_ray/__init__.py
]
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}


def module_names() -> dict[str, Path]:
    """Dotted name (``ingress.chat``, ``app``, ``""`` for the package) -> its file."""
    found: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported(node: ast.AST, names: set[str]) -> set[str]:
    """The modules of the package an import statement names (``from voltage_ray.ingress import
    chat`` names ``ingress.chat``; ``from voltage_ray import __version__``, the package)."""
    targets: list[str] = []
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        if node.module == PACKAGE or node.module.startswith(PACKAGE + "."):
            base = node.module.removeprefix(PACKAGE).removeprefix(".")
            for alias in node.names:
                child = f"{base}.{alias.name}" if base else alias.name
                targets.append(child if child in names else base)
    elif isinstance(node, ast.Import):
        targets = [
            a.name.removeprefix(PACKAGE).removeprefix(".")
            for a in node.names
            if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")
        ]
    return {t for t in targets if t in names}


def imports() -> dict[str, set[str]]:
    """Module -> the modules of ``voltage_ray`` it imports."""
    files = module_names()
    names = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            found |= imported(node, names)
        graph[name] = found - {name}
    return graph


def room(module: str) -> str:
    return module.split(".")[0]


def circles(graph: dict[str, set[str]]) -> list[str]:
    """Every import circle found (as ``a -> b -> a``), depth first."""
    found: list[str] = []
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            found.append(" -> ".join([*path[path.index(name) :], name]))
            return
        if name in done:
            return
        for other in sorted(graph.get(name, ())):
            visit(other, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return found


def test_every_room_has_a_layer() -> None:
    assert {room(m) for m in module_names()} <= set(RANK)


def test_rooms_import_only_rooms_below_them() -> None:
    upward = [
        f"{module} -> {other}"
        for module, others in imports().items()
        for other in others
        if room(other) != room(module) and RANK[room(other)] <= RANK[room(module)]
    ]
    assert upward == []


def test_no_package_has_an_import_circle() -> None:
    graph = imports()
    for package in {room(m) for m in graph if "." in m}:
        inside = {
            m: {o for o in deps if room(o) == package and o != package}
            for m, deps in graph.items()
            if room(m) == package and m != package
        }
        assert circles(inside) == [], package


INGRESS_LAYERS: list[set[str]] = [
    {"builder"},
    {"deployment"},
    {"api"},
    {"chat", "completions", "embeddings", "images", "models", "responses"},
    {"generation", "response_runs", "failover", "sse", "deps"},
    {"auth", "served_models", "meter", "settlement", "coalesce"},
    {"errors", "guards", "observe"},
]
INGRESS_RANK = {name: rank for rank, names in enumerate(INGRESS_LAYERS) for name in names}


def test_the_ingress_imports_one_way() -> None:
    """Routes are handed their collaborators (``deps``) and never reach the replica
    (``deployment``) or the app (``api``); only the builder knows the deployment."""
    local = {
        m.removeprefix("ingress."): {
            o.removeprefix("ingress.") for o in deps if room(o) == "ingress"
        }
        for m, deps in imports().items()
        if room(m) == "ingress" and m != "ingress"
    }
    assert set(local) == set(INGRESS_RANK)  # a new module takes its place in a layer
    upward = [
        f"{m} -> {o}"
        for m, deps in local.items()
        for o in deps
        if INGRESS_RANK[o] < INGRESS_RANK[m]
    ]
    assert upward == []
    assert [m for m, deps in local.items() if "deployment" in deps] == ["builder"]
