"""Which ingress replica holds which admissions, and which of those replicas Ray reports dead.

An ingress replica settles each request before the response's last byte leaves (see
``ingress/settlement.py``). So when a replica dies (its node killed outright), the admissions it
still holds are of requests it never answered: the proxy replays them elsewhere, or their
clients saw the connection drop. The limiter voids them (no tokens, and the request uncounted),
so nothing is billed for an answer that was never given and a replayed request counts once.

A replica registers its actor handle with the limiter; the limiter pings the replicas that hold
admissions every few seconds. Only Ray's verdict that the actor died voids anything: a replica
that is merely slow or unreachable for a while keeps its admissions. A restarted limiter knows
the owners of the holds it restored by the name stored with each hold (``namespace/name``): it
looks each one up until it registers again, and one that no longer exists is dead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from typing import Any

import ray

logger = logging.getLogger(__name__)


class Owners:
    """Admissions (hold ids) by the ingress replica that holds them."""

    def __init__(self) -> None:
        self.handles: dict[str, Any] = {}  # owner id -> its actor handle
        self.names: dict[str, str] = {}  # owner id -> "namespace/name", to look it up again
        self.tickets: dict[str, set[Hashable]] = {}
        self.restored: set[str] = set()  # owners of holds an earlier incarnation admitted

    def register(self, owner: str, handle: Any) -> None:
        self.handles[owner] = handle

    def hold(self, owner: str, hold: Hashable, name: str = "", restored: bool = False) -> None:
        if owner:
            self.tickets.setdefault(owner, set()).add(hold)
            if name:
                self.names[owner] = name
            if restored:
                self.restored.add(owner)

    def release(self, owner: str, hold: Hashable) -> None:
        held = self.tickets.get(owner)
        if held is not None:
            held.discard(hold)
            if not held:
                del self.tickets[owner]

    def forget(self, owner: str) -> set[Hashable]:
        """A dead owner's holds; the owner is forgotten."""
        self.handles.pop(owner, None)
        self.names.pop(owner, None)
        self.restored.discard(owner)
        return self.tickets.pop(owner, set())

    async def dead(self, timeout_s: float) -> list[str]:
        """The owners holding admissions whose actor Ray reports dead (one ping each, at once);
        an owner of restored holds that has not registered again is looked up by name first (it
        is dead if no actor has that name any more). An owner of this incarnation's holds is
        only ever judged by its handle: it registers with its first admission."""
        dead = []
        for owner in [o for o in self.restored if o in self.tickets and o not in self.handles]:
            found = await asyncio.to_thread(_find, self.names.get(owner, ""))
            if found is False:
                dead.append(owner)
            elif found is not None:
                self.handles[owner] = found
        return dead + await self._pinged(timeout_s)

    async def _pinged(self, timeout_s: float) -> list[str]:
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


def _find(name: str) -> Any:
    """The handle of the actor called ``namespace/name``; False when no such actor lives;
    None when it cannot be told (no name, or Ray unavailable)."""
    namespace, _, actor = name.partition("/")
    if not actor:
        return None
    try:
        return ray.get_actor(actor, namespace=namespace)
    except ValueError:  # no live actor of that name
        return False
    except Exception:  # Ray's control plane unavailable: no verdict
        return None
