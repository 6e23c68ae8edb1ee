"""Group commit: the limiter answers nothing before what it decided is on disk.

Every decision that changes state (an admission, a settlement, a void, an expiry) bumps a change
number under the limiter's write lock and marks what it touched (:class:`Dirty`). A caller then
waits for :meth:`Journal.durable` with the number of its last change: one writer at a time takes
every change made so far (a snapshot, under the lock), writes it in one transaction, fsynced, and
releases every caller whose changes it covered. Callers that arrive while a write is under way
share the next one, as a database's group commit does, so the cost of the disk is shared under
load and a lone caller pays one commit (~0.25 ms on this box's disk with SQLite's
``synchronous=FULL``).

A write that fails leaves memory ahead of the disk; the limiter must not answer from that state,
so ``lost`` is called (the actor exits, and Ray restarts it from the database).

The commits run on the journal's one thread (:class:`Writer`), or in its place (below). With
SQLite every other write of the limiter (stored responses, ``limits/responses.py``) runs there
too, on the same connection (two writing connections would meet the file's write lock, whose busy
handler sleeps), after the group commits waiting: an admission waits for at most the one such
write already under way.

With SQLite a group commit runs on the event loop itself whenever the writer thread is idle
(``inline``): an embedded commit is a local fsync, and the two hand-offs between threads cost
more than it under load (each waits for the other thread to get a core and the GIL on a busy
box). ``benchmarks/limits.py``, 4 coalescing callers, alternating runs: 12.8-14.5k admissions/s
inline against 9.2-11.4k through the thread; an exchange's wait for its commit 2.1 ms against
4.3. The loop is blocked for the commit meanwhile, but whatever it would decide then waits for
the next commit anyway. PostgreSQL's commit is a network round trip: it stays on the thread.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from voltage_ray.limits import usage as usage_db
from voltage_ray.limits.db import Database
from voltage_ray.limits.usage import Changes, HoldId, HoldRow

logger = logging.getLogger(__name__)


@dataclass
class Dirty:
    """What changed since the last snapshot."""

    usage: set[tuple[str, str]] = field(default_factory=set)  # (key id, period)
    windows: set[str] = field(default_factory=set)  # key ids
    new_holds: dict[HoldId, HoldRow] = field(default_factory=dict)
    gone_holds: set[HoldId] = field(default_factory=set)

    def add_hold(self, row: HoldRow) -> None:
        self.new_holds[row.id] = row

    def drop_hold(self, hold: HoldId) -> None:
        """A hold settled, voided or expired: delete it, unless it was never written."""
        if self.new_holds.pop(hold, None) is None:
            self.gone_holds.add(hold)


Job = tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]


class Writer:
    """One thread that runs every database write of the limiter, urgent work first: a group
    commit never waits behind a queue of other work, only behind the piece under way."""

    def __init__(self, name: str = "journal") -> None:
        self._urgent: collections.deque[Job | None] = collections.deque()
        self._other: collections.deque[Job | None] = collections.deque()
        self._ready = threading.Condition()
        self._closed = False
        self.busy = threading.Lock()  # held while a job runs; run_here takes it too
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, fn: Callable[..., Any], *args: Any, urgent: bool = False
    ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the writer is closed")
            (self._urgent if urgent else self._other).append((future, fn, args))
            self._ready.notify()
        return future

    async def run(self, fn: Callable[..., Any], *args: Any, urgent: bool = False) -> Any:
        """``fn(*args)`` on the thread; its result. A caller cancelled before it starts
        cancels it."""
        return await asyncio.wrap_future(self.submit(fn, *args, urgent=urgent))

    def close(self) -> None:
        """Stop once the work queued so far is done."""
        with self._ready:
            self._closed = True
            self._other.append(None)
            self._ready.notify()

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not (self._urgent or self._other):
                    self._ready.wait()
                job = (self._urgent or self._other).popleft()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            with self.busy:
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # the caller's to handle
                    future.set_exception(exc)

    def run_here(self, fn: Callable[..., Any], *args: Any, wait_s: float = 0.0) -> bool:
        """Run ``fn(*args)`` on the calling thread once the writer is idle (True), in its place:
        the thread cannot start a job meanwhile. False, without running it, if a job is still
        under way after ``wait_s`` (0: do not wait). Its exceptions propagate."""
        if not self.busy.acquire(timeout=wait_s):  # 0: one try
            return False
        try:
            fn(*args)
        finally:
            self.busy.release()
        return True


class Journal:
    """The limiter's group commit to ``db``. ``snapshot(dirty)`` (called under ``lock``'s write
    lock) turns what changed into the rows to write and clears ``dirty``."""

    def __init__(
        self,
        db: Database,
        lock: Any,
        snapshot: Callable[[Dirty], Changes],
        lost: Callable[[BaseException], None],
    ) -> None:
        self.db = db
        self.lock = lock
        self.snapshot = snapshot
        self.lost = lost
        self.dirty = Dirty()
        self.changes = 0  # change numbers given so far
        self.committed = 0  # every change up to this one is on disk
        self.commits = 0
        self._writing: asyncio.Task[None] | None = None
        self.writer = Writer()  # every write to ``db``, the group commits first
        self.inline = db.dialect == "sqlite"  # commit on the event loop when the writer is idle

    def changed(self) -> int:
        """A state change was made (under the write lock): its number."""
        self.changes += 1
        return self.changes

    async def durable(self, change: int) -> None:
        """Return once change number ``change`` (and every earlier one) is on disk."""
        while self.committed < change:
            if self._writing is None or self._writing.done():
                self._writing = asyncio.get_running_loop().create_task(self._commit())
            await asyncio.shield(self._writing)

    async def _commit(self) -> None:
        async with self.lock.writer_lock:
            covered = self.changes
            changes = self.snapshot(self.dirty)
        if changes:
            try:
                if not (self.inline and self.writer.run_here(usage_db.write, self.db, changes)):
                    await self.writer.run(usage_db.write, self.db, changes, urgent=True)
            except BaseException as exc:
                logger.critical("a group commit failed: the limiter stops (%r)", exc)
                self.lost(exc)
                raise
            self.commits += 1
        self.committed = max(self.committed, covered)

    def write_now(self) -> None:
        """Write what is left, from a thread with no event loop (exit paths), once the writer's
        job under way (if any) is done: the connection is the writer's."""
        changes = self.snapshot(self.dirty)
        if changes and not self.writer.run_here(usage_db.write, self.db, changes, wait_s=10.0):
            raise TimeoutError("the journal's writer is stuck; not writing beside it")
        self.committed = self.changes

    def close(self) -> None:
        """Close the database once the writes queued so far are done."""
        self.writer.submit(self.db.close)
        self.writer.close()
