"""The shared limiter actor: one named, async Ray actor that every ingress replica calls.

It owns the SQLite database (keys and usage) and the plans, so that every decision about a key is
made in one place for the whole cluster, not per replica. It is detached and restarted by Ray
when it dies (``max_restarts=-1``); ingress replicas find it by name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import ray

from voltage_ray.errors import ServiceUnavailable, Unauthorized
from voltage_ray.limits.keys import KeyStore
from voltage_ray.limits.plans import Plan, load_plans

logger = logging.getLogger(__name__)

ACTOR_NAME = "voltage_ray_limiter"
NAMESPACE = "voltage_ray"
AUTH_CACHE_TTL_S = 2.0  # created or revoked keys take effect within this (the contract is 5 s)
PLANS_RELOAD_S = 2.0


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a live key's public id, name and plan."""

    key_id: str
    name: str
    plan: str


class Limiter:
    """Authenticates keys against the store and (with the limits module) admits requests."""

    def __init__(self, db_path: str, plans_path: str) -> None:
        self.db_path = db_path
        self.plans_path = plans_path
        self.store = KeyStore(db_path)
        self.plans: dict[str, Plan] = load_plans(plans_path)
        self._plans_mtime = self._mtime()
        self._plans_checked = time.monotonic()
        self._auth_cache: dict[tuple[str, str], tuple[float, Principal | None]] = {}
        self._bootstrap_key()

    # --- configuration -----------------------------------------------------------------------

    async def configure(self, db_path: str, plans_path: str) -> None:
        """Point a surviving actor at the app's current database and plans (re-deploys)."""
        if db_path != self.db_path:
            self.store.close()
            self.db_path = db_path
            self.store = KeyStore(db_path)
            self._auth_cache.clear()
            self._bootstrap_key()
        if plans_path != self.plans_path:
            self.plans_path = plans_path
            self._plans_mtime = -1.0
        self._maybe_reload_plans(force=True)

    def _mtime(self) -> float:
        try:
            import os

            return os.stat(self.plans_path).st_mtime
        except OSError:
            return -1.0

    def _maybe_reload_plans(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._plans_checked < PLANS_RELOAD_S:
            return
        self._plans_checked = now
        mtime = self._mtime()
        if mtime == self._plans_mtime:
            return
        try:
            self.plans = load_plans(self.plans_path)
            self._plans_mtime = mtime
            logger.info("plans reloaded from %s: %s", self.plans_path, sorted(self.plans))
        except ValueError as exc:  # keep serving with the last good plans
            logger.error("keeping previous plans: %s", exc)

    def _bootstrap_key(self) -> None:
        """First start with an empty store: make one key and show it once on the console.

        It is printed, not logged: the logging pipeline never carries a key.
        """
        if self.store.count() > 0:
            return
        plan = "enterprise" if "enterprise" in self.plans else next(iter(self.plans))
        record, key = self.store.create(plan, name="bootstrap")
        print(
            "\n".join(
                [
                    "=" * 72,
                    f"voltage_ray: no API key existed, so one was created (id {record.id}, "
                    f"plan {plan}).",
                    "It is shown only this once; only its hash is stored:",
                    "",
                    f"    {key}",
                    "",
                    "Use it as:  curl -H 'X-VoltageGPU-Key: <key>' http://localhost:8000/v1/models",
                    "Make more:  voltage-ray keys create --plan free --name alice",
                    "=" * 72,
                ]
            ),
            flush=True,
        )

    # --- authentication ----------------------------------------------------------------------

    async def authenticate(self, key_id: str, key_hash: str) -> Principal:
        """The principal of a live key, or Unauthorized. Cached for AUTH_CACHE_TTL_S."""
        now = time.monotonic()
        cached = self._auth_cache.get((key_id, key_hash))
        if cached is not None and now - cached[0] < AUTH_CACHE_TTL_S:
            principal = cached[1]
        else:
            record = self.store.verify(key_id, key_hash)
            principal = Principal(record.id, record.name, record.plan) if record else None
            if len(self._auth_cache) > 100_000:
                self._auth_cache.clear()
            self._auth_cache[(key_id, key_hash)] = (now, principal)
        if principal is None:
            raise Unauthorized()
        return principal

    async def ping(self) -> bool:
        return True


def get_or_create_limiter(db_path: str, plans_path: str) -> Any:
    """The cluster's limiter actor, created on first use (detached, restarted on death)."""
    actor_cls = ray.remote(Limiter)
    return actor_cls.options(  # type: ignore[attr-defined]
        name=ACTOR_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_concurrency=1000,
        num_cpus=0,
    ).remote(db_path, plans_path)


async def call(method: Any, *args: Any, timeout_s: float = 5.0) -> Any:
    """Call a limiter method; an unreachable limiter is a 503, never an unmetered admit."""
    try:
        return await asyncio.wait_for(method.remote(*args), timeout_s)
    except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as exc:
        raise ServiceUnavailable("Rate limiter unavailable, retry shortly") from exc
    except asyncio.TimeoutError as exc:
        raise ServiceUnavailable("Rate limiter did not answer in time, retry shortly") from exc
