"""Plans: what each key's plan allows, read from configs/plans.yaml.

Shape: ``plans: {free: {requests_per_minute: 20, tokens_per_month: 100000,
images_per_month: 25}, ...}``; ``null`` means unlimited.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field


class Plan(BaseModel):
    """Limits of one plan; None is unlimited."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(default=None, ge=0)
    tokens_per_month: int | None = Field(default=None, ge=0)
    images_per_month: int | None = Field(default=None, ge=0)
    # Optional refinements.
    tokens_per_minute: int | None = Field(default=None, ge=0)
    max_concurrent_requests: int | None = Field(
        default=None,
        ge=1,
        description="Requests a key may have in flight at once, cluster-wide (a stream until "
        "its last byte or its cancellation); past it a 429.",
    )
    priority: int = Field(
        default=0,
        ge=-100,
        le=100,
        description="Scheduling priority in the model replicas: a higher one is served first "
        "and may pause a lower one's rows; keys of one priority share fairly.",
    )
    models: list[str] | None = Field(default=None, description="Allow-list of model names.")


class PlansFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plans: dict[str, Plan] = Field(min_length=1)


def load_plans(path: str | Path) -> dict[str, Plan]:
    """Parse and validate a plans file; raise ValueError with the file's name on a bad one."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ValueError(f"plans file {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"plans file {path} is not valid YAML: {exc}") from exc
    try:
        return PlansFile.model_validate(raw).plans
    except Exception as exc:
        raise ValueError(f"plans file {path} is invalid: {exc}") from exc
