"""The shared limiter actor: one named, async Ray actor that every ingress replica calls.

It owns the SQLite database (keys and usage) and the plans, so that every decision about a key is
made in one place for the whole cluster, not per replica. Admission is one call that checks the
key is live, checks every limit and takes everything the request needs, under the write lock of
an ``aiorwlock.RWLock`` with no ``await`` inside the critical section: concurrent admissions are
serialized, so limits are exact. Settlements arrive in batches and may arrive late (even at a
restarted actor); each carries what it reserved, so nothing depends on the actor's memory alone.

Usage is written to the database by group commit every ``flush_interval_s`` (at most 1 s) and on
shutdown. The actor is detached and restarted by Ray when it dies (``max_restarts=-1``); a new
incarnation reloads usage, windows and outstanding reservations from the database on first use.

Keys are checked in the ingress replicas, against copies they keep fresh with
:meth:`key_changes`; an
admission checks the key again (revoked keys are refused here within 2 s). Each admission records
the ingress replica that holds it: the holds of a replica Ray reports dead are voided
(``limits/owners.py``). Requests sent with an ``Idempotency-Key`` are answered and billed once
however often they come (``limits/idempotency.py``).
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
from voltage_ray.limits.idempotency import Answer, Answers, InProgress, Replay
from voltage_ray.limits.keys import KeyRecord, KeyStore, KeyUpdate, connect
from voltage_ray.limits.owners import Owners
from voltage_ray.limits.plans import Plan, load_plans

logger = logging.getLogger(__name__)

ACTOR_NAME = "voltage_ray_limiter"
NAMESPACE = "voltage_ray"
AUTH_CACHE_TTL_S = 2.0  # revoked keys are refused within this, if no ingress syncs keys sooner
PLANS_RELOAD_S = 2.0
OWNER_CHECK_S = 2.0  # how often the ingress replicas holding admissions are asked if alive
OWNER_PING_TIMEOUT_S = 5.0
DEFAULT_OPTIONS: dict[str, Any] = {
    "flush_interval_s": 0.5,
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
        self._flush_mutex: asyncio.Lock | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.calls: collections.Counter[str] = collections.Counter()  # by method, for info()
        self.decided: collections.Counter[int] = collections.Counter()  # admissions by status
        self.draining = False  # set by drain(): admissions are refused with a 503
        self._open(db_path)
        atexit.register(self._flush_sync)

    def _open(self, db_path: str) -> None:
        """(Re)start from a database: fresh in-memory state, loaded lazily from its rows."""
        self.db_path = db_path
        self.store = KeyStore(db_path)
        usage_db.ensure_schema(self.store.conn)
        self._writer = connect(db_path)  # used only by flushes, off the event loop
        self.epoch = uuid.uuid4().hex
        self._tickets = itertools.count(1)
        self._records: dict[str, tuple[float, KeyRecord | None]] = {}
        self.keys: dict[str, quota.KeyState] = {}
        self.usages: dict[tuple[str, str], quota.Usage] = {}
        self.holds: dict[int, tuple[str, quota.Hold, float, str]] = {}  # key, hold, TTL, owner
        self.owners = Owners()
        self.voided = 0  # holds of dead ingress replicas
        self.answers = Answers(
            self.options["idempotency_ttl_s"], self.options["idempotency_max_mb"]
        )
        self._orphan_deadlines: dict[tuple[str, str], float] = {}
        self._dirty_usage: set[tuple[str, str]] = set()
        self._dirty_windows: set[str] = set()
        self._windowed: set[str] = set()
        self._period, self._period_from, self._period_end = "", 0.0, 0.0
        self._bootstrap_key()

    # --- configuration -----------------------------------------------------------------------

    async def configure(
        self, db_path: str, plans_path: str, options: dict[str, Any] | None = None
    ) -> None:
        """Point a surviving actor at the app's current database, plans and options."""
        self._start_flusher()
        async with self.lock.writer_lock:
            self.draining = False  # a new deploy on a cluster whose last service drained
            self.options = {**DEFAULT_OPTIONS, **(options or {})}
            self.answers.configure(
                self.options["idempotency_ttl_s"], self.options["idempotency_max_mb"]
            )
            if db_path != self.db_path:
                self._flush_sync()
                self.store.close()
                self._writer.close()
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
        update = self.store.changes(since if source == str(self.store.path) else 0)
        if not update.full:  # admissions see a revocation at once
            for key_id in [*(r.id for r in update.records), *update.removed]:
                self._records.pop(key_id, None)
        return update

    async def register(self, owner: str, handle: Any) -> str:
        """An ingress replica (``owner``, its actor id) gives its handle, so that its holds can
        be voided once Ray reports it dead. Returns this incarnation's epoch: a replica whose
        grants come from another epoch registers again."""
        self.calls["register"] += 1
        self._start_flusher()
        self.owners.register(owner, handle)
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
    ) -> Admitted:
        """Take a request slot and reserve ``tokens``/``images`` for a live key, or say why not.

        Refusals are returned, not raised: a flood of 429s stays cheap (no remote traceback).
        A request with an Idempotency-Key (``idem``) seen before gets its kept answer
        (:class:`Replay`) or is told to wait for its first attempt (:class:`InProgress`).
        """
        self.calls["admit"] += 1
        self._start_flusher()
        async with self.lock.writer_lock:
            self._maybe_reload_plans()
            return self._admit_one(key_id, models, tokens, images, idem, owner)

    async def settle(self, settlements: list[Settlement]) -> None:
        """Account actual usage and release reservations (a batch; each settles once)."""
        self.calls["settle"] += 1
        async with self.lock.writer_lock:
            for s in settlements:
                self._settle_one(s)

    async def exchange(
        self,
        settlements: list[Settlement],
        admissions: list[tuple[str, tuple[str, ...], int, int, Idem | None]],
        owner: str = "",
    ) -> list[Admitted]:
        """One round trip for an ingress replica (``owner``): settle a batch, then admit a batch
        in order."""
        self.calls["exchange"] += 1
        self._start_flusher()
        async with self.lock.writer_lock:
            self._maybe_reload_plans()
            for s in settlements:
                self._settle_one(s)
            return [self._admit_one(*a, owner) for a in admissions]

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
    ) -> Admitted:
        # NOTE: called under the write lock and never awaits: each admission is atomic.
        result = self._decide(key_id, models, tokens, images, idem, owner)
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
        self.holds[ticket] = (key_id, result, now + self.options["reservation_ttl_s"], owner)
        self.owners.hold(owner, ticket)
        if idem is not None:
            self.answers.begin((key_id, idem[0]), idem[1], ticket)
        self._dirty_usage.add((key_id, period))
        if plan.requests_per_minute is not None or plan.tokens_per_minute is not None:
            self._windowed.add(key_id)  # its windows matter after a restart: persist them
            self._dirty_windows.add(key_id)
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
            self._dirty_windows.add(key_id)
        self.answers.replayed += 1
        return Replay(entry.answer)

    def _settle_one(self, s: Settlement) -> None:
        if s.epoch == self.epoch:
            entry = self.holds.pop(s.ticket, None)
            if entry is None:  # already settled, voided, or expired and charged in full
                return
            self._release(s.ticket, entry, s.tokens, s.images, s.counted)
            self.answers.finish(s.ticket, s.answer, time.time())
        else:  # admitted by an earlier incarnation: release its restored hold
            hold = quota.Hold(s.period, s.reserved_tokens, s.reserved_images)
            usage = self._usage(s.key_id, s.period)
            quota.release_orphan(usage, hold, s.tokens, s.images, s.counted)
            self._dirty_usage.add((s.key_id, s.period))

    def _release(
        self,
        ticket: int,
        entry: tuple[str, quota.Hold, float, str],
        tokens: int,
        images: int,
        counted: bool = True,
    ) -> None:
        """Settle a hold already taken out of ``holds``."""
        key_id, hold, _, owner = entry
        self.owners.release(owner, ticket)
        state = self.keys.get(key_id)
        quota.release(state, self._usage(key_id, hold.period), hold, tokens, images, counted)
        if key_id in self._windowed and (hold.token_entry is not None or not counted):
            self._dirty_windows.add(key_id)
        self._dirty_usage.add((key_id, hold.period))

    def _calendar(self, now: float) -> tuple[str, float]:
        """The current period and its end, recomputed only when ``now`` leaves it."""
        if not self._period_from <= now < self._period_end:
            self._period, self._period_end = quota.period_of(now), quota.period_end(now)
            self._period_from = now
        return self._period, self._period_end

    def _state(self, key_id: str, now: float) -> quota.KeyState:
        state = self.keys.get(key_id)
        if state is None:
            state = self.keys[key_id] = usage_db.load_state(self.store.conn, key_id, now)
        return state

    def _usage(self, key_id: str, period: str) -> quota.Usage:
        usage = self.usages.get((key_id, period))
        if usage is None:
            usage = usage_db.load_usage(self.store.conn, key_id, period)
            self.usages[(key_id, period)] = usage
            if usage.orphan_tokens or usage.orphan_images:
                deadline = time.time() + self.options["reservation_ttl_s"]
                self._orphan_deadlines[(key_id, period)] = deadline
        return usage

    def _expire(self, now: float) -> None:
        """Charge in full the reservations whose requests never settled (their ingress died)."""
        for ticket, entry in list(self.holds.items()):
            key_id, hold, deadline, _ = entry
            if deadline <= now:
                del self.holds[ticket]
                self._release(ticket, entry, hold.tokens, hold.images)
                self.answers.finish(ticket, None, now)
                logger.warning("reservation %s of key %s expired unsettled", ticket, key_id)
        self.answers.expire(now)
        for ident, deadline in list(self._orphan_deadlines.items()):
            if deadline <= now:
                del self._orphan_deadlines[ident]
                usage = self.usages.get(ident)  # None: forgotten, its holds all released
                if usage is not None and (usage.orphan_tokens or usage.orphan_images):
                    quota.expire_orphans(usage)
                    self._dirty_usage.add(ident)

    # --- durability --------------------------------------------------------------------------

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flush_mutex = asyncio.Lock()
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_loop())

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
                entries = [(t, self.holds.pop(t, None)) for t in self.owners.forget(owner)]
                for ticket, entry in entries:
                    if entry is not None:
                        self._release(ticket, entry, 0, 0, counted=False)
                        self.answers.finish(ticket, None, 0.0)  # a repeat runs afresh
            held = sum(entry is not None for _, entry in entries)
            logger.warning("ingress replica %s died: voided its %d unanswered holds", owner, held)
            voided += held
        self.voided += voided
        return voided

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options["flush_interval_s"])
            try:
                await self.flush()
            except Exception:
                logger.exception("usage flush failed; retrying")

    def _snapshot(self, now: float) -> tuple[list[tuple[str, quota.Usage]], list[Any]]:
        """Copies of the changed rows; marks them clean."""
        current = quota.period_of(now)
        usages = [(k, dataclasses.replace(self.usages[(k, p)])) for k, p in self._dirty_usage]
        windows = [
            usage_db.WindowRow(k, self.keys[k].requests.dump(), self.keys[k].tokens.dump())
            for k in self._dirty_windows
            if k in self.keys
        ]
        self._dirty_usage.clear()
        self._dirty_windows.clear()
        # Forget settled-up past periods (late settlements reload them from the database).
        for ident, u in list(self.usages.items()):
            if ident[1] != current and not (u.reserved_tokens or u.reserved_images):
                del self.usages[ident]
        return usages, windows

    async def flush(self) -> int:
        """Group commit: write every changed row in one transaction. Returns the rows written."""
        self._start_flusher()
        assert self._flush_mutex is not None
        async with self._flush_mutex:
            now = time.time()
            async with self.lock.writer_lock:
                self._expire(now)
                usages, windows = self._snapshot(now)
            if not usages and not windows:
                return 0
            try:
                await asyncio.to_thread(usage_db.write, self._writer, usages, windows, now)
            except BaseException:
                async with self.lock.writer_lock:  # write them again next time
                    self._dirty_usage.update((k, u.period) for k, u in usages)
                    self._dirty_windows.update(w.key_id for w in windows)
                raise
            return len(usages) + len(windows)

    def _flush_sync(self) -> None:
        """Last write on the way out (graceful exit, interpreter exit)."""
        if not self._dirty_usage and not self._dirty_windows:
            return
        try:
            usages, windows = self._snapshot(time.time())
            conn = connect(self.db_path)
            try:
                usage_db.write(conn, usages, windows)
            finally:
                conn.close()
        except Exception:
            logger.exception("final usage flush failed")

    def __ray_shutdown__(self) -> None:
        """Called by Ray when the actor exits gracefully (``__ray_terminate__``, exit_actor)."""
        self._flush_sync()

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
        """Counters: calls by method, admissions decided by status (200: admitted), holds
        outstanding, ingress replicas holding them, holds voided."""
        return {
            "epoch": self.epoch,
            "calls": dict(self.calls),
            "decided": dict(self.decided),
            "holds": len(self.holds),
            "owners": len(self.owners.tickets),
            "voided": self.voided,
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
