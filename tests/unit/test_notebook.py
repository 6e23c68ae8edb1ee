"""The stored notebooks: valid, without outputs, compiling, each starting and stopping its app.

tests/integration/test_notebooks.py executes them; these checks need no kernel and no Ray.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_the_notebooks_exist() -> None:
    names = {p.name for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "embeddings.ipynb", "serving.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs(path: Path) -> None:
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    for cell in code_cells(path):
        assert cell["outputs"] == [], f"{path.name}: a cell is stored with outputs"
        assert cell["execution_count"] is None, f"{path.name}: a cell has an execution count"
        assert "execution" not in cell["metadata"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_cells_compile(path: Path) -> None:
    for cell in code_cells(path):
        source = "".join(cell["source"])
        # IPython magics (%matplotlib inline) are not Python.
        python = "\n".join(line for line in source.splitlines() if not line.startswith("%"))
        compile(python, f"<{path.name}>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_starts_and_stops_its_own_app(path: Path) -> None:
    sources = ["".join(c["source"]) for c in code_cells(path)]
    assert "start_local(" in sources[0], "the first code cell starts the app"
    assert sources[-1].strip() == "app.stop()", "the last code cell stops it"


def test_quickstart_shows_build_app_and_handles() -> None:
    cells = json.loads((REPO / "notebooks" / "quickstart.ipynb").read_text())["cells"]
    assert any("serve.run(build_app(args)" in "".join(c["source"]) for c in cells)
    joined = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "get_deployment_handle(" in joined
    assert ".result(" in joined and "await chat.chat.remote(" in joined
    assert "options(stream=True).chat_stream.remote(" in joined


def test_readme_links_every_notebook() -> None:
    readme = (REPO / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"(notebooks/{path.name})" in readme, f"README does not link {path.name}"


def test_free_ports_lie_below_the_ephemeral_range() -> None:
    """Ray's processes take ephemeral ports while the app starts; the app's port is not one."""
    import socket

    from voltage_ray.notebook import _ephemeral_low, free_port

    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    assert all(20000 <= p < _ephemeral_low() for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))  # free indeed
