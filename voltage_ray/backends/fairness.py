"""Fair shares between API keys inside one model replica: who is served next, who gives way.

Many keys share a replica, and every request carries its :class:`Tenant` (the API key's public
id and its plan's priority). The chat scheduler, the embeddings encode loop and the images loop
make the same three decisions with it:

- **Order** (:class:`Served`, :func:`rank`). Waiting work is taken highest priority first, then
  from the key that holds the least of the model right now (chat: rows; embeddings and images:
  inputs or images of the call being formed), then from the key served least lately, then oldest
  first. A key that sends one request at a time is never behind another key's backlog.
- **Bound** (:func:`give_way`). A replica keeps at most ``max_queued_requests`` requests waiting.
  When that is full, a newcomer whose key holds fewer places (requests in the replica) than its
  fair share (the replica's places over the keys present) displaces the newest waiting request
  of the key most over its share, which is answered 503 ("shed"); a newcomer whose key holds its
  share already is the one refused. A waiting request of a lower priority always gives way to a
  higher-priority newcomer. So a key under its share is never refused because another key filled
  the queue (if no request can give way, it is let in past the bound).
- **Preemption** (chat only, ``backends/scheduler.py``): a request under its share does not wait
  for another key's long generations to end.

No Ray and no HTTP here: the ingress builds the tenant from the limiter's admission.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from voltage_ray.errors import Overloaded


@dataclass(frozen=True)
class Tenant:
    """Who a request is for, as the model replicas schedule it."""

    key: str = ""  # the API key's public id; "" for callers without one (handle callers)
    priority: int = 0  # higher is served first (a plan's priority, lowered by service_tier flex)
    plan: str = ""  # for metrics

    @classmethod
    def of(cls, value: Tenant | Mapping[str, Any] | None) -> Tenant:
        """A tenant from what a handle caller passed (a Tenant, its fields as a dict, or None)."""
        if value is None:
            return ANONYMOUS
        if isinstance(value, Tenant):
            return value
        return cls(**dict(value))


ANONYMOUS = Tenant()


class Served:
    """Work each key was served lately (tokens, inputs, images), for ordering equal claims.

    A key seen for the first time, or again after :meth:`forget` (it had nothing in the replica),
    starts just below the least served key present, as a new flow of start-time fair queueing
    starts at the virtual time in service: it goes before the keys already served, and idling
    banks no credit (it starts no lower than that).
    """

    def __init__(self) -> None:
        self.work: dict[str, float] = {}

    def of(self, key: str) -> float:
        found = self.work.get(key)
        if found is None:
            least = min(self.work.values(), default=1.0)
            found = self.work[key] = least - 1.0
        return found

    def charge(self, key: str, amount: float) -> None:
        self.work[key] = self.of(key) + amount

    def forget(self, present: Iterable[str]) -> None:
        """Drop the keys that have nothing in the replica any more."""
        keep = set(present)
        for key in [k for k in self.work if k not in keep]:
            del self.work[key]


def rank(tenant: Tenant, held: int, served: float, seq: int) -> tuple[int, int, float, int]:
    """Sort key of a waiting item: highest priority, least held, least served, oldest."""
    return (-tenant.priority, held, served, seq)


def let_in(held: Mapping[str, int], key: str, bound: int) -> bool:
    """May one more request of ``key`` come in, with ``held`` requests per key already in and at
    most ``bound`` in all? Past the bound, only a key holding less than its fair share (the
    bound over the keys holding some, ``key`` included) is let in."""
    total = sum(held.values())
    if total < bound:
        return True
    keys = {k for k, n in held.items() if n > 0} | {key}
    return held.get(key, 0) < bound / len(keys)


def give_way(
    waiting: Sequence[tuple[Tenant, int]],
    places: Mapping[str, int],
    newcomer: Tenant,
    capacity: int,
) -> int | None:
    """With the queue full: the index in ``waiting`` ((tenant, seq) of the requests that may be
    shed) of the one that gives way to ``newcomer``, or None when the newcomer is refused.

    ``places``: requests each key holds in the replica (running, paused or waiting; the newcomer
    not counted), ``capacity``: what the replica holds when full (rows plus its queue). Returns
    -1 when the newcomer is under its share and nothing can give way: let it in past the bound.
    """
    keys = {k for k, n in places.items() if n > 0} | {newcomer.key}
    share = capacity / len(keys)
    mine = places.get(newcomer.key, 0)
    under = mine < share
    best: tuple[tuple[int, int, int, int], int] | None = None
    for i, (tenant, seq) in enumerate(waiting):
        theirs = places.get(tenant.key, 0)
        if tenant.priority < newcomer.priority:
            claim = (0, tenant.priority, -theirs, -seq)  # the lowest priority, the most held
        elif (
            under
            and tenant.priority == newcomer.priority
            and tenant.key != newcomer.key
            and theirs > share
            and theirs >= mine + 2  # moving one place narrows the gap, never inverts it
        ):
            claim = (1, 0, -theirs, -seq)  # the key most over its share, its newest request
        else:
            continue
        if best is None or claim < best[0]:
            best = (claim, i)
    if best is not None:
        return best[1]
    return -1 if under else None


class Claim(Protocol):
    """Something waiting for rows: a request (``Ticket``) or a paused row (``Row``)."""

    @property
    def tenant(self) -> Tenant: ...

    @property
    def seq(self) -> int: ...


C = TypeVar("C", bound=Claim)


def first(claims: Iterable[C], held: Mapping[str, int], served: Served) -> C | None:
    """The claim served next (:func:`rank`); ``held``: what each key holds now."""
    return min(
        claims,
        key=lambda c: rank(c.tenant, held.get(c.tenant.key, 0), served.of(c.tenant.key), c.seq),
        default=None,
    )


def under_share(tenant: Tenant, need: int, held: Mapping[str, int], keys: int, total: int) -> bool:
    """Would ``tenant`` hold at most its fair share of ``total`` rows with ``need`` more?
    ``keys``: the keys holding or waiting for rows (``tenant``'s included)."""
    return held.get(tenant.key, 0) + need <= total / max(1, keys)


def victim(running: Iterable[C], claimant: Tenant, need: int, held: Mapping[str, int]) -> C | None:
    """The running row to pause for ``claimant``'s ``need`` rows, or None: a row of a lower
    priority (the lowest, of the key holding most), else of the same priority from the key
    holding the most rows, when moving them leaves that key at least as many as the claimant
    (so the two never take turns pausing each other). Of that key's rows, the one of its newest
    request (``seq``), as vLLM's scheduler preempts the last admitted."""
    mine = held.get(claimant.key, 0)
    best: tuple[tuple[int, int, int, int], C] | None = None
    for row in running:
        t = row.tenant
        theirs = held.get(t.key, 0)
        if t.priority < claimant.priority:
            claim = (0, t.priority, -theirs, -row.seq)
        elif t.priority == claimant.priority and t.key != claimant.key and theirs > mine + need:
            claim = (1, 0, -theirs, -row.seq)
        else:
            continue
        if best is None or claim < best[0]:
            best = (claim, row)
    return best[1] if best else None


@dataclass(eq=False)
class Place:
    """A request's place in a replica, from its arrival to its answer."""

    tenant: Tenant
    seq: int
    started: bool = False  # the model took some of it: it can no longer give way
    shed: bool = False  # it gave way to a newcomer


class Places:
    """The requests a batching replica holds (embeddings, images), in arrival order, and the
    bound on those waiting unstarted: ``max_queued`` (None: unbounded); ``running``: what one
    model call takes, for the fair share."""

    def __init__(self, max_queued: int | None, running: int) -> None:
        self.max_queued = max_queued
        self.running = running
        self.held: dict[Place, None] = {}
        self._seq = itertools.count()
        self.shed = self.refused = 0

    def admit(self, tenant: Tenant) -> tuple[Place, Place | None]:
        """A place for a new request, and the waiting request that gave way to it (None: none
        had to); :class:`Overloaded` when the queue is full and ``tenant`` holds its share."""
        waiting = [p for p in self.held if not p.started]
        shed = None
        if self.max_queued is not None and len(waiting) >= self.max_queued:
            places = collections.Counter(p.tenant.key for p in self.held)
            capacity = self.max_queued + self.running
            i = give_way([(p.tenant, p.seq) for p in waiting], places, tenant, capacity)
            if i is None:
                self.refused += 1
                raise Overloaded(details={"reason": "refused"})
            if i >= 0:
                shed = waiting[i]
                shed.shed = True
                self.held.pop(shed)
                self.shed += 1
        place = Place(tenant, next(self._seq))
        self.held[place] = None
        return place, shed

    def leave(self, place: Place) -> None:
        """The request was answered (or failed): its place is free."""
        self.held.pop(place, None)

    def keys(self) -> set[str]:
        return {p.tenant.key for p in self.held}
