"""The shared limiter actor: one named, async Ray actor that every ingress replica calls.

It owns the database (keys, usage and holds: SQLite or PostgreSQL, ``limits/db.py``) and the
plans, so that every decision about a key is made in one place for the whole cluster, not per
replica. Admission is one call that checks the key is live, checks every limit and takes
everything the request needs, under the write lock of an ``aiorwlock.RWLock`` with no ``await``
inside the critical section: concurrent admissions are serialized, so limits are exact.

**Acknowledged means durable.** Every admission, settlement and void is committed to the
database before the limiter answers it (``limits/journal.py``: a group commit shared by the
callers of a short window). A killed limiter, or its node lost with its disk, loses nothing it
acknowledged: a restarted incarnation reloads usage, windows and every outstanding hold (with
the ingress replica holding it), so a late settlement releases exactly its hold, a request's
concurrency place survives, and a hold whose request was settled is never charged. The actor is
detached and restarted by Ray when it dies (``max_restarts=-1``).

Keys are checked in the ingress replicas, against copies they keep fresh with
:meth:`key_changes`; an admission checks the key again (revoked keys are refused here within 2 s).
Each admission records the ingress replica that holds it: the holds of a replica Ray reports dead
are voided (``limits/owners.py``), and a replica that registers with a new incarnation names the
holds it still has, so the others (admissions whose answer was lost with the old incarnation)
are voided too. Requests sent with an ``Idempotency-Key`` are answered and billed once however
often they come (``limits/idempotency.py``; kept answers live in memory: a restart forgets them).

It also keeps the stored responses of ``/v1/responses`` (``limits/responses.py``) for every
ingress replica: :meth:`response` runs one store operation off the event loop (with SQLite on the
journal's writer thread, after any group commit waiting) and answers once it is committed.
Expired responses are deleted at start and every ``RESPONSES_EXPIRE_S``.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiorwlock

from voltage_ray.errors import (
    BadRequest,
    Forbidden,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
    VoltageError,
)
from voltage_ray.limits import quota
from voltage_ray.limits import usage as usage_db
from voltage_ray.limits.db import Database
from voltage_ray.limits.idempotency import Answer, Answers, InProgress, Replay
from voltage_ray.limits.journal import Dirty, Journal, Writer
from voltage_ray.limits.keys import KeyRecord, KeyStore, KeyUpdate
from voltage_ray.limits.owners import Owners
from voltage_ray.limits.plans import Plan, load_plans
from voltage_ray.limits.responses import EXPIRE_BATCH, ResponseStore
from voltage_ray.limits.usage import Changes, HoldId, HoldRow

logger = logging.getLogger(__name__)

ACTOR_NAME = "voltage_ray_limiter"
NAMESPACE = "voltage_ray"
AUTH_CACHE_TTL_S = 2.0  # revoked keys are refused within this, if no ingress syncs keys sooner
PLANS_RELOAD_S = 2.0
OWNER_CHECK_S = 2.0  # how often the ingress replicas holding admissions are asked if alive
OWNER_PING_TIMEOUT_S = 5.0
RESPONSES_EXPIRE_S = 600.0  # how often expired stored responses are deleted
# The ResponseStore methods that response() runs (see limits/responses.py for each).
RESPONSE_OPS = frozenset(
    {"put", "get", "delete", "finish", "set_status", "cancel", "claim", "renew", "expire"}
)
DEFAULT_OPTIONS: dict[str, Any] = {
    "flush_interval_s": 0.5,  # how often expiries are looked for (and written)
    "reservation_ttl_s": 1800.0,
    "idempotency_ttl_s": 86400.0,
    "idempotency_max_mb": 64,
}


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a live key's public id, name and plan."""

    key_id: str
    name: str
    plan: str


@dataclass(frozen=True)
class Grant:
    """An admission: the ticket that settles it, what it reserved, its response headers."""

    ticket: int
    epoch: str  # the limiter incarnation that issued the ticket
    key_id: str
    period: str
    tokens: int
    images: int
    headers: dict[str, str]
    priority: int = 0  # the plan's, for the model replicas' scheduling


@dataclass(frozen=True)
class Settlement:
    """What a finished request used, with what it reserved (so any incarnation can settle it)."""

    ticket: int
    epoch: str
    key_id: str
    period: str
    reserved_tokens: int
    reserved_images: int
    tokens: int
    images: int
    counted: bool = True  # False: void, the request is given back too (a 503, a lost ingress)
    answer: Answer | None = None  # the response, kept for repeats of its Idempotency-Key


Admitted = Grant | VoltageError | Replay | InProgress
Idem = tuple[str, str]  # a request's Idempotency-Key and its fingerprint


@dataclass
class Held:
    """An outstanding admission: whose, what it holds, until when, and which ingress replica
    holds it."""

    key_id: str
    hold: quota.Hold
    deadline: float
    owner: str
    owner_name: str = ""

    def row(self, hold: HoldId) -> HoldRow:
        h = self.hold
        return HoldRow(
            *hold, self.key_id, h.period, h.tokens, h.images, self.owner, self.owner_name,
            self.deadline,
        )  # fmt: skip


def exit_now(exc: BaseException) -> None:
    """A group commit failed: memory is ahead of the database, so stop; Ray restarts the actor
    from what is on disk (every answer given was). Outside an actor the error propagates."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id():
        os._exit(1)


class Limiter:
    """Authenticates keys, admits requests against their plans, and records usage."""

    def __init__(
        self, db_path: str, plans_path: str, options: dict[str, Any] | None = None
    ) -> None:
        self.options = {**DEFAULT_OPTIONS, **(options or {})}
        self.plans_path = plans_path
        self.plans: dict[str, Plan] = load_plans(plans_path)
        self._plans_mtime = self._mtime()
        self._plans_checked = time.monotonic()
        self.lock = aiorwlock.RWLock(fast=True)  # no yield after acquiring: sections never await
        self.lost = exit_now  # what a failed group commit does (tests replace it)
        self._expirer: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._response_expirer: asyncio.Task[None] | None = None
        self.calls: collections.Counter[str] = collections.Counter()  # by method, for info()
        self.decided: collections.Counter[int] = collections.Counter()  # admissions by status
        self.draining = False  # set by drain(): admissions are refused with a 503
        self._open(db_path)
        atexit.register(self._write_now)

    def _open(self, db_path: str) -> None:
        """(Re)start from a database: every outstanding hold reloaded, usage loaded lazily."""
        self.db_path = db_path
        self.store = KeyStore(db_path)
        usage_db.ensure_schema(self.store.db)
        writer = Database(db_path)  # used only on the journal's writer thread
        self.journal = Journal(writer, self.lock, self._snapshot, lambda e: self.lost(e))
        self._open_responses(writer)
        self.epoch = uuid.uuid4().hex
        self._tickets = itertools.count(1)
        self._records: dict[str, tuple[float, KeyRecord | None]] = {}
        self.keys: dict[str, quota.KeyState] = {}
        self.usages: dict[tuple[str, str], quota.Usage] = {}
        self.holds: dict[HoldId, Held] = {}
        self.owners = Owners()
        self.voided = 0  # holds of dead ingress replicas, or that their replica did not know
        self.answers = Answers(
            self.options["idempotency_ttl_s"], self.options["idempotency_max_mb"]
        )
        self._windowed: set[str] = set()
        self._period, self._period_from, self._period_end = "", 0.0, 0.0
        restored = usage_db.load_holds(self.store.db)
        for row in restored:
            self.holds[row.id] = Held(
                row.key_id, quota.Hold(row.period, row.tokens, row.images), row.deadline,
                row.owner, row.owner_name,
            )  # fmt: skip
            self.owners.hold(row.owner, row.id, row.owner_name, restored=True)
        self._in_flight = usage_db.outstanding(restored)  # until each key's state loads
        if restored:
            logger.info("limiter restarted with %d outstanding holds", len(restored))
        self._bootstrap_key()

    def _open_responses(self, writer: Database) -> None:
        """Stored responses. SQLite has one writer at a time: they share the journal's thread
        and connection, after the group commits waiting (two connections would meet the write
        lock, whose busy handler sleeps). PostgreSQL commits both side by side: they get a
        connection and thread of their own, so an admission never waits for one."""
        if writer.dialect == "sqlite":
            self.responses, self._responses_writer = ResponseStore(writer), self.journal.writer
        else:
            self.responses = ResponseStore(Database(self.db_path))
            self._responses_writer = Writer("responses")

    # --- configuration -----------------------------------------------------------------------

    async def configure(
        self, db_path: str, plans_path: str, options: dict[str, Any] | None = None
    ) -> None:
        """Point a surviving actor at the app's current database, plans and options."""
        self._start_tasks()
        if db_path != self.db_path:
            await self.flush()
        async with self.lock.writer_lock:
            self.draining = False  # a new deploy on a cluster whose last service drained
            self.options = {**DEFAULT_OPTIONS, **(options or {})}
            self.answers.configure(
                self.options["idempotency_ttl_s"], self.options["idempotency_max_mb"]
            )
            if db_path != self.db_path:
                self.store.close()
                self.journal.close()
                if self._responses_writer is not self.journal.writer:
                    self._responses_writer.submit(self.responses.db.close)
                    self._responses_writer.close()
                self._open(db_path)
            if plans_path != self.plans_path:
                self.plans_path = plans_path
                self._plans_mtime = -1.0
            self._maybe_reload_plans(force=True)

    def _mtime(self) -> float:
        try:
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

    def _record(self, key_id: str) -> KeyRecord | None:
        """A key's record, cached for AUTH_CACHE_TTL_S (revocations apply within that)."""
        now = time.monotonic()
        cached = self._records.get(key_id)
        if cached is not None and now - cached[0] < AUTH_CACHE_TTL_S:
            return cached[1]
        record = self.store.get(key_id)
        if len(self._records) > 100_000:
            self._records.clear()
        self._records[key_id] = (now, record)
        return record

    async def key_changes(self, source: str, since: int) -> KeyUpdate:
        """The keys changed since change ``since`` of database ``source`` (every key when the
        database is another one): what an ingress replica needs to check keys by itself."""
        self.calls["key_changes"] += 1
        update = self.store.changes(since if source == self.store.path else 0)
        if not update.full:  # admissions see a revocation at once
            for key_id in [*(r.id for r in update.records), *update.removed]:
                self._records.pop(key_id, None)
        return update

    async def register(self, owner: str, handle: Any, live: list[HoldId] | None = None) -> str:
        """An ingress replica (``owner``, its actor id) gives its handle, so that its holds can
        be voided once Ray reports it dead, and ``live``: the holds it still has. A hold of an
        earlier incarnation that it does not name was admitted but never answered (the answer
        was lost with that incarnation): it is voided. Returns this incarnation's epoch: a
        replica whose grants come from another epoch registers again."""
        self.calls["register"] += 1
        self._start_tasks()
        self.owners.register(owner, handle)
        if live is not None:
            known = set(map(tuple, live))
            async with self.lock.writer_lock:
                unknown = [
                    hold
                    for hold in self.owners.tickets.get(owner, set())
                    if hold[0] != self.epoch and hold not in known  # type: ignore[index]
                ]
                for hold in unknown:
                    self._void(hold)  # type: ignore[arg-type]
                change = self.journal.changes
            if unknown:
                logger.warning(
                    "voided %d holds that replica %s never answered", len(unknown), owner
                )
            await self.journal.durable(change)
        return self.epoch

    # --- admission and settlement ------------------------------------------------------------

    async def admit(
        self,
        key_id: str,
        models: tuple[str, ...],
        tokens: int,
        images: int,
        idem: Idem | None = None,
        owner: str = "",
        owner_name: str = "",
    ) -> Admitted:
        """Take a request slot and reserve ``tokens``/``images`` for a live key, or say why not.

        Refusals are returned, not raised: a flood of 429s stays cheap (no remote traceback).
        A request with an Idempotency-Key (``idem``) seen before gets its kept answer
        (:class:`Replay`) or is told to wait for its first attempt (:class:`InProgress`).
        Answered once the admission is on disk.
        """
        self.calls["admit"] += 1
        self._start_tasks()
        async with self.lock.writer_lock:
            self._maybe_reload_plans()
            result = self._admit_one(key_id, models, tokens, images, idem, owner, owner_name)
            change = self.journal.changes
        await self.journal.durable(change)
        return result

    async def settle(self, settlements: list[Settlement]) -> None:
        """Account actual usage and release reservations (a batch; each settles once).
        Returns once the settlements are on disk."""
        self.calls["settle"] += 1
        async with self.lock.writer_lock:
            for s in settlements:
                self._settle_one(s)
            change = self.journal.changes
        await self.journal.durable(change)

    async def exchange(
        self,
        settlements: list[Settlement],
        admissions: list[tuple[str, tuple[str, ...], int, int, Idem | None]],
        owner: str = "",
        owner_name: str = "",
    ) -> tuple[str, list[Admitted]]:
        """One round trip for an ingress replica (``owner``; ``owner_name``: ``namespace/name``
        to find it again after a restart): settle a batch, then admit a batch in order. Answers
        (this incarnation's epoch and the admissions) once all of it is on disk."""
        self.calls["exchange"] += 1
        self._start_tasks()
        async with self.lock.writer_lock:
            self._maybe_reload_plans()
            for s in settlements:
                self._settle_one(s)
            results = [self._admit_one(*a, owner, owner_name) for a in admissions]
            change = self.journal.changes
        await self.journal.durable(change)
        return self.epoch, results

    async def wait_answer(self, key_id: str, key: str, timeout_s: float) -> None:
        """Return once the running attempt of ``key`` ends (or after ``timeout_s``)."""
        self.calls["wait_answer"] += 1
        entry = self.answers.entries.get((key_id, key))
        if entry is not None and entry.ticket is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(entry.done.wait(), timeout_s)

    def _admit_one(
        self,
        key_id: str,
        models: tuple[str, ...],
        tokens: int,
        images: int,
        idem: Idem | None = None,
        owner: str = "",
        owner_name: str = "",
    ) -> Admitted:
        # NOTE: called under the write lock and never awaits: each admission is atomic.
        result = self._decide(key_id, models, tokens, images, idem, owner, owner_name)
        if isinstance(result, Grant | VoltageError):
            self.decided[200 if isinstance(result, Grant) else result.status] += 1
        return result

    def _decide(
        self,
        key_id: str,
        models: tuple[str, ...],
        tokens: int,
        images: int,
        idem: Idem | None,
        owner: str,
        owner_name: str,
    ) -> Admitted:
        if self.draining:
            return ServiceUnavailable(
                "The service is shutting down; retry shortly", headers={"Retry-After": "5"}
            )
        record = self._record(key_id)
        if record is None or record.revoked:
            return Unauthorized()
        plan = self.plans.get(record.plan)
        if plan is None:
            return Forbidden(
                f"The key's plan '{record.plan}' is not defined", details={"plan": record.plan}
            )
        now = time.time()
        period, month_end = self._calendar(now)
        state = self._state(key_id, now)
        usage = self._usage(key_id, period)
        if idem is not None:
            repeat = self._repeat(key_id, idem, record.plan, plan, state, usage, models, now)
            if repeat is not None:
                return repeat
        ask = quota.Ask(tokens, images, models)
        result = quota.admit(record.plan, plan, state, usage, ask, now)
        if isinstance(result, quota.Denial):
            return _error(result, quota.headers(plan, state, usage, ask, now, month_end))
        ticket = next(self._tickets)
        hold = (self.epoch, ticket)
        held = Held(key_id, result, now + self.options["reservation_ttl_s"], owner, owner_name)
        self.holds[hold] = held
        self.owners.hold(owner, hold, owner_name)
        if idem is not None:
            self.answers.begin((key_id, idem[0]), idem[1], hold)
        self.journal.changed()
        self.journal.dirty.add_hold(held.row(hold))
        self.journal.dirty.usage.add((key_id, period))
        if plan.requests_per_minute is not None or plan.tokens_per_minute is not None:
            self._windowed.add(key_id)  # its windows matter after a restart: persist them
            self.journal.dirty.windows.add(key_id)
        else:
            self._windowed.discard(key_id)
        headers = quota.headers(plan, state, usage, ask, now, month_end)
        return Grant(ticket, self.epoch, key_id, period, tokens, images, headers, plan.priority)

    def _repeat(
        self,
        key_id: str,
        idem: Idem,
        plan_name: str,
        plan: Plan,
        state: quota.KeyState,
        usage: quota.Usage,
        models: tuple[str, ...],
        now: float,
    ) -> Admitted | None:
        """A request whose Idempotency-Key was seen: its answer, a wait, or a 400 (None: new).

        A replay is billed nothing and not counted as a request, but it passes the request
        rate (and takes a place in it), so a flood of replays meets a 429 like any other."""
        key, fingerprint = idem
        entry = self.answers.find((key_id, key), now)
        if entry is None:
            return None
        if entry.fingerprint != fingerprint:
            return BadRequest(
                "This Idempotency-Key was used with a different request; use a new key",
                details={"param": "Idempotency-Key"},
            )
        if entry.answer is None:
            return InProgress()
        denial = quota.check(plan_name, plan, state, usage, quota.Ask(0, 0, models), now)
        if denial is not None:
            return _error(denial, {})
        if plan.requests_per_minute is not None:
            state.requests.add(now, 1)
            self.journal.changed()
            self.journal.dirty.windows.add(key_id)
        self.answers.replayed += 1
        return Replay(entry.answer)

    def _settle_one(self, s: Settlement) -> None:
        hold = (s.epoch, s.ticket)
        held = self.holds.pop(hold, None)
        if held is None:  # already settled, voided, or expired and charged in full
            return
        self._release(hold, held, s.tokens, s.images, s.counted)
        self.answers.finish(hold, s.answer, time.time())

    def _void(self, hold: HoldId) -> None:
        """An admission never answered: nothing billed, the request given back."""
        held = self.holds.pop(hold, None)
        if held is not None:
            self._release(hold, held, 0, 0, counted=False)
            self.answers.finish(hold, None, 0.0)  # a repeat runs afresh
            self.voided += 1

    def _release(
        self, hold: HoldId, held: Held, tokens: int, images: int, counted: bool = True
    ) -> None:
        """Settle a hold already taken out of ``holds``."""
        self.owners.release(held.owner, hold)
        state = self._state(held.key_id, time.time())
        usage = self._usage(held.key_id, held.hold.period)
        quota.release(state, usage, held.hold, tokens, images, counted)
        self.journal.changed()
        self.journal.dirty.drop_hold(hold)
        if held.key_id in self._windowed and (held.hold.token_entry is not None or not counted):
            self.journal.dirty.windows.add(held.key_id)
        self.journal.dirty.usage.add((held.key_id, held.hold.period))

    def _calendar(self, now: float) -> tuple[str, float]:
        """The current period and its end, recomputed only when ``now`` leaves it."""
        if not self._period_from <= now < self._period_end:
            self._period, self._period_end = quota.period_of(now), quota.period_end(now)
            self._period_from = now
        return self._period, self._period_end

    def _state(self, key_id: str, now: float) -> quota.KeyState:
        state = self.keys.get(key_id)
        if state is None:
            state = self.keys[key_id] = usage_db.load_state(self.store.db, key_id, now)
            state.in_flight = self._in_flight.pop(key_id, 0)  # its holds restored at start
        return state

    def _usage(self, key_id: str, period: str) -> quota.Usage:
        usage = self.usages.get((key_id, period))
        if usage is None:
            usage = usage_db.load_usage(self.store.db, key_id, period)
            self.usages[(key_id, period)] = usage
        return usage

    def _expire(self, now: float) -> None:
        """Charge in full the reservations whose requests never settled (their ingress died
        unseen): an upper bound of what they used, so the quota is never exceeded."""
        for hold, held in list(self.holds.items()):
            if held.deadline <= now:
                del self.holds[hold]
                self._release(hold, held, held.hold.tokens, held.hold.images)
                self.answers.finish(hold, None, now)
                logger.warning("reservation %s of key %s expired unsettled", hold, held.key_id)
        self.answers.expire(now)

    # --- durability --------------------------------------------------------------------------

    def _start_tasks(self) -> None:
        loop = asyncio.get_running_loop()
        if self._expirer is None or self._expirer.done():
            self._expirer = loop.create_task(self._expire_loop())
        if self._watcher is None or self._watcher.done():
            self._watcher = loop.create_task(self._watch_loop())
        if self._response_expirer is None or self._response_expirer.done():
            self._response_expirer = loop.create_task(self._expire_responses_loop())

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(OWNER_CHECK_S)
            try:
                await self.void_dead_owners()
            except Exception:
                logger.exception("checking ingress replicas failed; retrying")

    async def void_dead_owners(self) -> int:
        """Void the holds of ingress replicas Ray reports dead: requests they never answered
        (they settle before an answer's last byte). Returns the holds voided."""
        voided = 0
        for owner in await self.owners.dead(OWNER_PING_TIMEOUT_S):
            async with self.lock.writer_lock:
                holds = [h for h in self.owners.forget(owner) if h in self.holds]
                for hold in holds:
                    self._void(hold)
                change = self.journal.changes
            await self.journal.durable(change)
            logger.warning(
                "ingress replica %s died: voided its %d unanswered holds", owner, len(holds)
            )
            voided += len(holds)
        return voided

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options["flush_interval_s"])
            try:
                await self.flush()
            except Exception:
                logger.exception("expiring reservations failed; retrying")

    async def _expire_responses_loop(self) -> None:
        while True:
            try:
                deleted = 0
                while True:  # a batch at a time: group commits go between them
                    batch = await self.response("expire", None, EXPIRE_BATCH)
                    deleted += batch
                    if batch < EXPIRE_BATCH:
                        break
                if deleted:
                    logger.info("deleted %d expired stored responses", deleted)
            except Exception:
                logger.exception("expiring stored responses failed; retrying")
            await asyncio.sleep(RESPONSES_EXPIRE_S)

    # --- stored responses --------------------------------------------------------------------

    async def response(self, op: str, *args: Any) -> Any:
        """Run ``ResponseStore.<op>(*args)`` (``op`` in RESPONSE_OPS) on the writer thread, after
        the group commits waiting for it; its result, once committed. The ingress calls it
        through ``LimiterClient.responses``."""
        if op not in RESPONSE_OPS:
            raise ValueError(f"unknown stored-response operation {op!r}")
        self.calls[f"response.{op}"] += 1
        self._start_tasks()
        return await self._responses_writer.run(getattr(self.responses, op), *args)

    def _snapshot(self, dirty: Dirty) -> Changes:
        """The rows that changed (copies), for the journal; marks them clean."""
        now = time.time()
        usages = [(k, dataclasses.replace(self.usages[(k, p)])) for k, p in dirty.usage]
        windows = [
            usage_db.WindowRow(k, self.keys[k].requests.dump(), self.keys[k].tokens.dump())
            for k in dirty.windows
            if k in self.keys
        ]
        changes = Changes(usages, windows, list(dirty.new_holds.values()), list(dirty.gone_holds))
        dirty.usage.clear()
        dirty.windows.clear()
        dirty.new_holds.clear()
        dirty.gone_holds.clear()
        # Forget settled-up past periods (late settlements reload them from the database).
        current = quota.period_of(now)
        for ident, u in list(self.usages.items()):
            if ident[1] != current and not (u.reserved_tokens or u.reserved_images):
                del self.usages[ident]
        return changes

    async def flush(self) -> int:
        """Expire overdue reservations, and return once everything decided is on disk (the
        number of group commits so far)."""
        self._start_tasks()
        async with self.lock.writer_lock:
            self._expire(time.time())
            change = self.journal.changes
        await self.journal.durable(change)
        return self.journal.commits

    def _write_now(self) -> None:
        """Last write on the way out (interpreter exit): normally nothing is left."""
        try:
            self.journal.write_now()
        except Exception:
            logger.exception("final usage write failed")

    def __ray_shutdown__(self) -> None:
        """Called by Ray when the actor exits gracefully (``__ray_terminate__``, exit_actor)."""
        self._write_now()

    # --- views -------------------------------------------------------------------------------

    async def usage(self, key_id: str) -> dict[str, Any] | None:
        """A key's current-period usage against its plan's limits (None for an unknown key)."""
        async with self.lock.writer_lock:  # loading a key's rows mutates the maps
            record = self._record(key_id)
            if record is None:
                return None
            plan = self.plans.get(record.plan, Plan())
            now = time.time()
            report = quota.report(
                plan, self._usage(key_id, quota.period_of(now)), self._state(key_id, now), now
            )
        return {"key_id": key_id, "plan": record.plan, **report}

    async def drain(self) -> int:
        """Shutting down: refuse new admissions (503); the number of admissions in flight."""
        self.draining = True
        return len(self.holds)

    async def in_flight(self) -> int:
        """Admissions not settled yet (requests and streams in flight, cluster-wide)."""
        return len(self.holds)

    async def info(self) -> dict[str, Any]:
        """Its incarnation and process, and counters: calls by method, admissions decided by
        status (200: admitted), holds outstanding, ingress replicas holding them, holds voided,
        group commits."""
        return {
            "epoch": self.epoch,
            "pid": os.getpid(),
            "calls": dict(self.calls),
            "decided": dict(self.decided),
            "holds": len(self.holds),
            "owners": len(self.owners.tickets),
            "voided": self.voided,
            "commits": self.journal.commits,
            "idempotent": {
                "entries": len(self.answers),
                "bytes": self.answers.bytes,
                "replayed": self.answers.replayed,
            },
        }

    async def ping(self) -> bool:
        return True


def _error(denial: quota.Denial, headers: dict[str, str]) -> VoltageError:
    if denial.kind == "rate":
        retry = {"Retry-After": str(denial.retry_after)}
        return RateLimited(denial.message, details=denial.details, headers={**headers, **retry})
    if denial.kind == "quota":
        return QuotaExceeded(denial.message, details=denial.details, headers=headers)
    return Forbidden(denial.message, details=denial.details)
