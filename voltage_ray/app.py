"""`build_app(args)`: the Serve application builder named by serve_config.yaml.

    applications:
      - import_path: voltage_ray.app:build_app
        args: {models: [...], database: ..., plans: ...}

Python callers use the same function: ``serve.run(build_app(args))``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from ray.serve import Application

from voltage_ray.config import AppConfig
from voltage_ray.deployments.builder import bind_ingress


class ConfigError(ValueError):
    """The args do not describe a valid voltage_ray app."""


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
    """The whole application: one deployment per model, composed by the Ingress."""
    return bind_ingress(parse_config(args))


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
