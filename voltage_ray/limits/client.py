"""An ingress replica's side of the limiter: one round trip carries many admissions.

Admissions and settlements are queued and sent together in one ``exchange`` call; while one call
is in flight, the next batch collects. At low load every admission or settlement is one round
trip of its own; under load the round trip is shared, so the limiter's cost per request falls as
load rises (a Ray actor call costs about a millisecond of CPU, a small model request a few). Each
admission in a batch is still decided atomically, in arrival order, by the actor.

A settlement returns a future that resolves once the limiter has it, so an answer can wait for
its own billing before its last byte leaves; it is retried while the limiter is unavailable
(the reservation holds until the limiter receives it). Admissions fail fast with a 503 instead:
a request is never admitted unmetered. The client also keeps the replica's copy of the keys
fresh (:meth:`follow_keys`) and registers the replica with the limiter, which voids the holds
of replicas that died. It keeps the holds it was granted until the limiter has their
settlements: when it meets a new limiter incarnation (every exchange answers with the epoch) it
registers again naming them, and the new incarnation voids the restored holds of this replica
that it does not name (admissions whose answer was lost when the old incarnation died).

Stored responses (``/v1/responses``) are read and written through the limiter too, which owns
the database: ``client.responses`` (:class:`ResponsesClient`) has one method per store operation
(``put``, ``get``, ``delete``, ``finish``, ``set_status``, ``cancel``, ``claim``, ``renew``),
each one call answered once committed, and a 503 like any other call while the limiter is
unavailable (after up to ``timeout_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable
from typing import Any

import ray

from voltage_ray.errors import ServiceUnavailable, VoltageError
from voltage_ray.limits import limiter as limiter_mod
from voltage_ray.limits.idempotency import Answer, InProgress, Replay
from voltage_ray.limits.keyring import KeyRing
from voltage_ray.limits.limiter import Grant, Idem, Settlement
from voltage_ray.limits.responses import Status, StoredResponse
from voltage_ray.limits.usage import HoldId

logger = logging.getLogger(__name__)

KEY_SYNC_S = 0.5  # key changes reach every ingress replica within about this (contract: 3 s)
SETTLE_GIVE_UP_S = 300.0  # past this, an unsettled reservation waits for the limiter's TTL
MAX_BACKOFF_S = 2.0
RETRY = {"Retry-After": "1"}  # on a 503: the limiter restarts within seconds


class LimiterClient:
    """Calls the shared limiter actor for one process; coalesces admissions and settlements.

    ``owner`` is the ingress replica's (actor id, actor handle, ``namespace/name``): its
    admissions are recorded as its own, and voided by the limiter if Ray reports the replica
    dead.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        timeout_s: float = 5.0,
        owner: tuple[str, Any, str] | None = None,
    ) -> None:
        self._connect = connect  # returns the actor handle (get or create by name)
        self.actor = connect()
        self._found = time.monotonic()
        self.timeout_s = timeout_s
        self.owner = owner
        self._registered: str | None = None  # the limiter epoch this replica registered with
        self._registering: asyncio.Task[None] | None = None
        self._live: dict[HoldId, Grant] = {}  # granted, settlement not yet received
        self._admits: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._settles: list[tuple[Settlement, asyncio.Future[bool]]] = []
        self._failing_since: float | None = None
        self._busy = False
        self._work = self._admitted = asyncio.Event()  # replaced on the running loop
        self._task: asyncio.Task[None] | None = None
        self.responses = ResponsesClient(self)

    async def call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """One direct call; 503 while the limiter is unavailable.

        A limiter that died for good (killed without restart) is looked up again by name, which
        creates a new one on the database's node; it reloads usage from the database.
        """
        try:
            return await call(
                getattr(self.actor, method), *args, timeout_s=timeout_s or self.timeout_s
            )
        except ServiceUnavailable as exc:
            self._maybe_reconnect(exc)
            raise

    def _maybe_reconnect(self, exc: BaseException) -> None:
        died = isinstance(exc.__cause__, ray.exceptions.ActorDiedError)
        if died and time.monotonic() - self._found > 1.0:
            self._found = time.monotonic()
            self.actor = self._connect()

    # --- keys --------------------------------------------------------------------------------

    async def sync_keys(self, ring: KeyRing) -> None:
        """Bring ``ring`` up to date with the key store (one call); 503 if unavailable."""
        ring.apply(await self.call("key_changes", ring.source, ring.seq))

    async def follow_keys(self, ring: KeyRing, every_s: float = KEY_SYNC_S) -> None:
        """Keep ``ring`` fresh forever; while the limiter is unavailable it keeps what it has."""
        while True:
            try:
                await self.sync_keys(ring)
            except ServiceUnavailable:
                pass
            except Exception:  # never stop following
                logger.exception("syncing the keys failed; retrying")
            await asyncio.sleep(every_s)

    # --- admission and settlement ------------------------------------------------------------

    async def admit(
        self,
        key_id: str,
        models: tuple[str, ...],
        tokens: int,
        images: int,
        idem: Idem | None = None,
    ) -> Grant | Replay | InProgress:
        """Admit through the next exchange; raises the refusal (401/403/429) or a 503. With an
        Idempotency-Key (``idem``), a repeat gets its kept answer or is told to wait."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._admits.append(((key_id, models, tokens, images, idem), future))
        self._kick(admission=True)
        result = await future
        if isinstance(result, VoltageError):
            raise result
        return result

    def settle(
        self,
        grant: Grant,
        tokens: int,
        images: int,
        counted: bool = True,
        answer: Answer | None = None,
    ) -> asyncio.Future[bool]:
        """Queue a settlement for the next exchange. The future is True once the limiter has
        it (False if it was given up on); not counted: void, the request is given back too.
        ``answer``: the response, kept for repeats of the request's Idempotency-Key."""
        g = grant
        used = Settlement(
            g.ticket,
            g.epoch,
            g.key_id,
            g.period,
            g.tokens,
            g.images,
            tokens,
            images,
            counted,
            answer,
        )
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._settles.append((used, future))
        self._kick()
        return future

    def _kick(self, admission: bool = False) -> None:
        if self._task is None or self._task.done():
            self._work, self._admitted = asyncio.Event(), asyncio.Event()
            self._task = detached(self._run())
        self._work.set()
        if admission:
            self._admitted.set()

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            if not (self._admits or self._settles):
                await self._work.wait()
            self._work.clear()
            if not (self._admits or self._settles):  # already sent with an earlier exchange
                continue
            if backoff and not self._admits:  # the limiter failed: settlements retry later,
                self._admitted.clear()  # or with the next admission
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._admitted.wait(), backoff)
            ok = await self._exchange()
            backoff = 0.0 if ok else min(max(2 * backoff, 0.1), MAX_BACKOFF_S)

    async def _exchange(self) -> bool:
        """Send everything queued in one call; False when the limiter was unavailable."""
        admits, self._admits = self._admits, []
        settles, self._settles = self._settles, []
        self._busy = True
        owner, _, name = self.owner if self.owner else ("", None, "")
        try:
            epoch, results = await self.call(
                "exchange", [s for s, _ in settles], [args for args, _ in admits], owner, name
            )
        except Exception as exc:  # unavailable, or anything else: never leave a caller waiting
            err = exc if isinstance(exc, ServiceUnavailable) else None
            if err is None:
                logger.warning("a limiter exchange failed: %r", exc)
                err = ServiceUnavailable("Rate limiter unavailable, retry shortly", headers=RETRY)
            for _, future in admits:
                if not future.done():
                    future.set_result(ServiceUnavailable(err.message, headers=err.headers))
            self._requeue(settles)
            return False
        finally:
            self._busy = False
        self._failing_since = None
        for settled, delivered in settles:
            self._live.pop((settled.epoch, settled.ticket), None)
            if not delivered.done():
                delivered.set_result(True)
        for (_, future), result in zip(admits, results, strict=True):
            if isinstance(result, Grant):
                self._live[(result.epoch, result.ticket)] = result
            if not future.done():
                future.set_result(result)
            elif isinstance(result, Grant):  # its request went away while waiting: void it
                self.settle(result, 0, 0, counted=False)
        self._register(epoch)
        return True

    def _register(self, epoch: str) -> None:
        """Give the limiter incarnation ``epoch`` this replica's handle and its live holds,
        once."""
        if self.owner is None or epoch == self._registered:
            return
        if self._registering is None or self._registering.done():
            self._registering = detached(self._send_handle())

    async def _send_handle(self) -> None:
        assert self.owner is not None
        owner, handle, _ = self.owner
        try:
            self._registered = await self.call("register", owner, handle, list(self._live))
        except Exception as exc:  # registered with the next exchange's answer
            if not isinstance(exc, ServiceUnavailable):
                logger.warning("registering with the limiter failed: %r", exc)

    def _requeue(self, settles: list[tuple[Settlement, asyncio.Future[bool]]]) -> None:
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        if now - self._failing_since > SETTLE_GIVE_UP_S:
            logger.error("dropping %d settlements: limiter unavailable", len(settles))
            for _, delivered in settles:
                if not delivered.done():
                    delivered.set_result(False)
            return
        self._settles[:0] = settles

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until queued settlements are delivered (graceful shutdown)."""
        deadline = time.monotonic() + timeout_s
        while (self._settles or self._admits or self._busy) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


def detached(coro: Any) -> asyncio.Task[Any]:
    """A task of the client's own, outside the request that happened to start it.

    A task inherits its creator's context, and in an async actor Ray's current task (the
    parent of every call the task makes) is a context variable: the client's loop, started by
    a request, made its limiter calls as that request's children. When that request's client
    left, Serve cancelled the request and Ray its children, recursively: the loop's call in
    flight failed with ``TaskCancelledError``, its admissions were never answered, and the next
    request hung until its client gave up (a streamed request left open by the OpenAI SDK,
    then a second one). Every task that outlives its request or serves several makes its
    Ray calls from one of these."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


class ResponsesClient:
    """Stored responses through the limiter (``limits/responses.py`` says what each does).

    Each method is one direct call, answered once the change is committed; a 503
    (:class:`ServiceUnavailable`) while the limiter is unavailable. A missing, expired or other
    key's response is None (or False) alike: answer 404, revealing nothing."""

    def __init__(self, client: LimiterClient) -> None:
        self._client = client

    async def _op(self, op: str, *args: Any) -> Any:
        return await self._client.call("response", op, *args)

    async def put(self, record: StoredResponse) -> None:
        await self._op("put", record)

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        return await self._op("get", response_id, owner)

    async def delete(self, response_id: str, owner: str) -> bool:
        return bool(await self._op("delete", response_id, owner))

    async def finish(
        self,
        response_id: str,
        response: dict[str, Any],
        status: Status,
        conversation: list[dict[str, Any]],
    ) -> bool:
        return bool(await self._op("finish", response_id, response, status, conversation))

    async def set_status(self, response_id: str, status: Status, response: dict[str, Any]) -> bool:
        return bool(await self._op("set_status", response_id, status, response))

    async def cancel(self, response_id: str, owner: str) -> StoredResponse | None:
        return await self._op("cancel", response_id, owner)

    async def claim(self, lease_owner: str, lease_s: float, limit: int) -> list[StoredResponse]:
        return list(await self._op("claim", lease_owner, lease_s, limit))

    async def renew(self, response_id: str, lease_owner: str, lease_s: float) -> str | None:
        return await self._op("renew", response_id, lease_owner, lease_s)


# --- finding the actor ------------------------------------------------------------------------


# Every head node carries this resource, whatever its node id (Ray Train pins its state actor so).
HEAD_NODE_RESOURCE = "node:__internal_head__"


def placement(node_resource: str | None) -> dict[str, Any]:
    """Where the limiter runs: on the node holding the database.

    A configured custom resource names that node; otherwise the head node, where ``serve run``/
    ``serve deploy`` and the default database path live. Both are hard requirements: a soft
    node affinity let Ray place it on a worker node (seen with two nodes), whose loss then cut
    every ingress off its limits, and a worker node may not see the database at all.
    """
    return {"resources": {node_resource or HEAD_NODE_RESOURCE: 0.001}}


def get_or_create_limiter(
    db_path: str,
    plans_path: str,
    options: dict[str, Any] | None = None,
    node_resource: str | None = None,
    name: str = limiter_mod.ACTOR_NAME,
) -> Any:
    """The cluster's limiter actor ``name``, created on first use (detached, restarted on
    death)."""
    actor_cls = ray.remote(limiter_mod.Limiter)
    return actor_cls.options(
        name=name,
        namespace=limiter_mod.NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_concurrency=1000,
        num_cpus=0,
        **placement(node_resource),
    ).remote(db_path, plans_path, options)


async def call(method: Any, *args: Any, timeout_s: float = 5.0) -> Any:
    """Call a limiter method; an unreachable limiter is a 503, never an unmetered admit."""
    try:
        return await asyncio.wait_for(method.remote(*args), timeout_s)
    except ray.exceptions.RayActorError as exc:  # died, restarting, or unreachable
        raise ServiceUnavailable("Rate limiter unavailable, retry shortly", headers=RETRY) from exc
    except asyncio.TimeoutError as exc:
        raise ServiceUnavailable(
            "Rate limiter did not answer in time, retry shortly", headers=RETRY
        ) from exc
