"""Which ingress replica holds which admissions, and which of those replicas Ray reports dead.

An ingress replica settles each request before the response's last byte leaves (see
``ingress/settlement.py``). So when a replica dies (its node killed outright), the admissions it
still holds are of requests it never answered: the proxy replays them elsewhere, or their
clients saw the connection drop. The limiter voids them (no tokens, and the request uncounted),
so nothing is billed for an answer that was never given and a replayed request counts once.

A replica registers its actor handle with the limiter; the limiter pings the replicas that hold
admissions every few seconds. Only Ray's verdict that the actor died (``ActorDiedError``) voids
anything: a replica that is merely slow or unreachable for a while keeps its admissions.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

logger = logging.getLogger(__name__)


class Owners:
    """Admissions (tickets) by the ingress replica that holds them."""

    def __init__(self) -> None:
        self.handles: dict[str, Any] = {}  # owner id -> its actor handle
        self.tickets: dict[str, set[int]] = {}

    def register(self, owner: str, handle: Any) -> None:
        self.handles[owner] = handle

    def hold(self, owner: str, ticket: int) -> None:
        if owner:
            self.tickets.setdefault(owner, set()).add(ticket)

    def release(self, owner: str, ticket: int) -> None:
        held = self.tickets.get(owner)
        if held is not None:
            held.discard(ticket)
            if not held:
                del self.tickets[owner]

    def forget(self, owner: str) -> set[int]:
        """A dead owner's tickets; the owner is forgotten."""
        self.handles.pop(owner, None)
        return self.tickets.pop(owner, set())

    async def dead(self, timeout_s: float) -> list[str]:
        """The owners holding tickets whose actor Ray reports dead (one ping each, at once)."""
        watched = [o for o in self.tickets if o in self.handles]
        verdicts = await asyncio.gather(*(self._died(self.handles[o], timeout_s) for o in watched))
        return [owner for owner, died in zip(watched, verdicts, strict=True) if died]

    @staticmethod
    async def _died(handle: Any, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(handle.__ray_ready__.remote(), timeout_s)
        except ray.exceptions.ActorDiedError:
            return True
        except Exception:  # unreachable, restarting or slow: no verdict yet
            return False
        return False
