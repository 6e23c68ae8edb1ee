"""Run a voltage_ray app inside a notebook or script: its own Ray, a free port, a fresh key.

    app = start_local(load_args("../serve_config.yaml"), plans={"small": {...}})
    client = OpenAI(base_url=app.api_base, api_key=app.key)
    ...
    app.stop()                      # or: with start_local(...) as app: ...

The app keeps its keys, usage and plans in a temporary directory, so a notebook never touches
the key store of a service running on the same machine. Handles work as usual:
``serve.get_deployment_handle("chat-<id>", app_name=app.name)``.

Sync handle calls: notebook cells run inside an asyncio event loop, where Serve refuses blocking
calls (``response.result()``, ``for chunk in stream``): ``await`` them there, or run sync code in
a thread (``await asyncio.to_thread(f)``). That thread needs Serve's default mode, which this
module uses: with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` in the caller's environment a handle's
router runs on the caller's event loop, and sync calls from outside it fail.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from voltage_ray.app import build_app, parse_config
from voltage_ray.config import AppConfig
from voltage_ray.limits.keys import KeyStore

# What a notebook's Ray needs on a machine without network (explicit values in the
# environment win), as `voltage-ray serve` sets for the service.
ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
UNLIMITED = "unlimited"


@dataclass
class LocalApp:
    """A voltage_ray app served from this process's own Ray instance on 127.0.0.1."""

    name: str
    base_url: str  # http://127.0.0.1:<port>
    key: str  # a key on the `unlimited` plan (or the one start_local was asked for)
    config: AppConfig  # validated, with the database, plans and cache paths in force
    tmp: Path

    @property
    def api_base(self) -> str:
        """The OpenAI SDK's ``base_url``."""
        return f"{self.base_url}/v1"

    def new_key(self, plan: str = UNLIMITED, name: str = "") -> str:
        """Create a key on ``plan`` (one of this app's plans); it works within 3 seconds."""
        store = KeyStore(self.config.database or "")
        try:
            return store.create(plan, name)[1]
        finally:
            store.close()

    def stop(self) -> None:
        """Shut down Serve and this app's Ray instance, and delete its key store."""
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> LocalApp:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_local(
    args: Mapping[str, Any],
    *,
    plans: Mapping[str, Mapping[str, Any]] | None = None,
    key_plan: str = UNLIMITED,
    name: str = "voltage",
    ray_init: Mapping[str, Any] | None = None,
    timeout_s: float = 600.0,
) -> LocalApp:
    """Start a new local Ray instance and the app ``build_app(args)`` on a free port.

    ``args`` are a serve_config.yaml application's args (``load_args``); their database and
    plans are replaced by a temporary key store and a plans file holding ``unlimited`` (no
    limits) and ``plans``. ``VOLTAGE_DB``/``VOLTAGE_PLANS``/``VOLTAGE_CACHE`` still override,
    as everywhere. ``ray_init`` adds to or overrides the ``ray.init`` arguments: a new local
    instance without dashboard whose replica logs stay in Ray's log files. Returns once
    ``/health`` answers 200 (every model has a running replica).
    """
    import ray
    from ray import serve

    if ray.is_initialized():
        raise RuntimeError("Ray already runs in this process: stop() the previous app first")
    for env, value in ENV_DEFAULTS.items():
        os.environ.setdefault(env, value)
    tmp = Path(tempfile.mkdtemp(prefix="voltage_notebook_"))
    plans_file = tmp / "plans.yaml"
    plans_file.write_text(yaml.safe_dump({"plans": {UNLIMITED: {}, **(plans or {})}}))
    config = parse_config({**args, "database": str(tmp / "voltage.db"), "plans": str(plans_file)})
    port = free_port()
    app = LocalApp(name, f"http://127.0.0.1:{port}", "", config, tmp)
    # NOTE: before the app starts: a limiter that finds no key creates one and prints it.
    app.key = app.new_key(key_plan, "notebook")
    # address="local": always a new instance, never a cluster that `ray start` left running.
    # Replica logs stay in Ray's log files instead of filling the notebook's outputs.
    init: dict[str, Any] = {"address": "local", "include_dashboard": False, "log_to_driver": False}
    ray.init(**(init | dict(ray_init or {})))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name=name, route_prefix="/", blocking=False)
        _wait_healthy(app.base_url, timeout_s)
    except BaseException:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return app


_GIVEN: set[int] = set()  # ports this process handed out already


def free_port() -> int:
    """A free local port, below the kernel's range of ephemeral ports when it can.

    A port the kernel picks (``bind(0)``) comes from the ephemeral range, from which Ray's
    processes take ports for their own connections while the app starts; one took the port
    before Serve's proxy bound it ("Failed to bind to address", seen once in CI). Ray's worker
    ports end at 19999, so the ports 20000 up to the ephemeral range are free of both.
    """
    low = _ephemeral_low()
    for port in random.sample(range(20000, low), min(100, max(0, low - 20000))):
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:  # a custom ephemeral range that leaves no room below it
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS starts at 49152


def _wait_healthy(base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the app at {base_url} was not healthy after {timeout_s:.0f} s")
