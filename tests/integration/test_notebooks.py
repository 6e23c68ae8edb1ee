"""Every notebook runs top to bottom in a fresh kernel and shows what it promises.

Each notebook starts its own Ray instance (``ray.init(address="local")`` in
``voltage_ray.notebook.start_local``) and app on a free port inside the kernel process, so it
runs beside this session's Ray without sharing anything. The kernel is this interpreter
(a kernelspec written at test time), so it sees the checkout's .venv.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nbclient
import nbformat
import pytest

from tests.integration.conftest import CACHE_DIR, REPO

NOTEBOOKS = REPO / "notebooks"
KERNEL = "voltage-ray-test"
CELL_TIMEOUT_S = 300  # the first start converts the chat model once (about 20 s on 2 cores)
NOTEBOOK_BUDGET_S = 480

# Text each notebook's outputs must contain: the results it exists to show.
EXPECTED = {
    "quickstart.ipynb": ["sync .result():", "sync stream:", "in the notebook's event loop:"],
    "embeddings.ipynb": ["nearest to", "base64 decodes to the float vectors: True"],
    "serving.ipynb": ["streams", "-> 429", "-> 403", "noise"],
}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A kernelspec running this interpreter, with the environment this box's Ray needs."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    env = {
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "VOLTAGE_CACHE": str(CACHE_DIR),  # converted models shared with the other tests
        "MPLBACKEND": "Agg",
    }
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "voltage_ray tests",
                "language": "python",
                "env": env,
            }
        )
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root))
        yield KERNEL


def run_notebook(name: str, kernel: str) -> tuple[nbformat.NotebookNode, float]:
    """The executed notebook and its wall time; a cell that raises fails the test here."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=kernel,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    start = time.monotonic()
    client.execute()
    return nb, time.monotonic() - start


def text_of(cell: dict) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs(name: str, kernel: str) -> None:
    nb, seconds = run_notebook(name, kernel)
    print(f"{name}: {seconds:.0f} s")
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in cells), "a cell did not run"
    text = "\n".join(text_of(c) for c in cells)
    for expected in EXPECTED[name]:
        assert expected in text, f"{name}: no output contains {expected!r}"
    plots = [c for c in cells if "plot" in c["metadata"].get("tags", [])]
    assert plots, f"{name} has no cell tagged 'plot'"
    for cell in plots:
        pictures = [o for o in cell["outputs"] if "image/png" in o.get("data", {})]
        assert pictures, f"{name}: a 'plot' cell drew nothing:\n{''.join(cell['source'])}"
    assert seconds < NOTEBOOK_BUDGET_S, f"{name} took {seconds:.0f} s"


def test_kernel_is_this_interpreter(kernel: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(kernel)
    assert Path(spec.argv[0]) == Path(sys.executable)
    assert os.environ["JUPYTER_PATH"]
