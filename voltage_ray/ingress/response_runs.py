"""One response's generation: its events, its stored record, and background runs.

A :class:`Run` turns the chat chunks of its stream into the response's events
(``ChunkReader`` -> ``ResponseBuilder``) and keeps its stored record: in progress when it
starts, final when it ends (the record also keeps the conversation, so a
``previous_response_id`` continuation reads one row).

**Background runs** (``background: true``) are admitted before the answer (a 429 or 403 is the
request's own), stored ``queued`` with a lease held by this ingress replica, and generated in a
task of their own. The task renews the lease every second and stops when the record says
``cancelled`` (``POST /responses/{id}/cancel``, from any replica). Every replica sweeps for
runs whose lease ran out, which happens only when the replica running them died, and runs them
again from the start: so a background run survives its ingress replica. A re-run is a new
request to the limiter (the dead replica's admission was voided with it), billed once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from voltage_ray.config import ModelConfig
from voltage_ray.errors import VoltageError, unwrap
from voltage_ray.ingress import failover, guards, sse
from voltage_ray.ingress.errors import to_voltage_error
from voltage_ray.ingress.generation import CHAT, Stream, open_stream, reservation
from voltage_ray.ingress.meter import Admissions, Meter
from voltage_ray.ingress.served_models import Models
from voltage_ray.limits.client import ResponsesClient, detached
from voltage_ray.limits.limiter import Principal
from voltage_ray.limits.responses import StoredResponse
from voltage_ray.protocol.response_chat import (
    ChunkReader,
    chat_request,
    forced_custom,
    parse_items,
)
from voltage_ray.protocol.response_events import Event, Response
from voltage_ray.protocol.response_stream import Failed, ResponseBuilder
from voltage_ray.protocol.responses import CreateResponseRequest

logger = logging.getLogger(__name__)

LEASE_S = 10.0  # a background run's lease: another replica re-runs it this long after a death
RENEW_S = 1.0  # how often a running background run renews its lease and reads its status
SWEEP_S = 5.0  # how often each replica looks for runs whose lease ran out
FINAL = ("completed", "incomplete", "failed", "cancelled")


class Run:
    """The generation of one response (see the module's docstring)."""

    def __init__(
        self,
        runs: BackgroundRuns,
        body: CreateResponseRequest,
        principal: Principal,
        builder: ResponseBuilder,
        inputs: list[dict[str, Any]],
        conversation: list[dict[str, Any]],
        chat: Any,
        model: ModelConfig,
    ) -> None:
        self.runs = runs
        self.body = body
        self.principal = principal
        self.builder = builder
        self.inputs = inputs  # this request's own input items, as stored
        self.conversation = conversation  # what the model reads (after truncation)
        self.chat = chat
        self.model = model
        self.reader = ChunkReader(body, forced_custom(body))
        self.stream: Stream | None = None
        self._saving: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False

    @property
    def id(self) -> str:
        return self.builder.response.id

    # --- events ---

    def begin(self, stream: Stream) -> None:
        """The stream is open: store the response as in progress (not waited for here)."""
        self.stream = stream
        if self.body.store and not self.body.background:
            self.builder.response.status = "in_progress"
            self._saving = asyncio.create_task(self.runs.store.put(self.record()))

    def start_events(self) -> list[Event]:
        """``response.created`` (unless queued) and ``response.in_progress``, once."""
        if self._started:
            return []
        self._started = True
        return list(self.builder.start())

    def feed(self, chunk: Any) -> list[Event]:
        assert self.stream is not None
        self.stream.note(chunk)
        events: list[Event] = []
        for delta in self.reader.feed(chunk):
            if not self.builder.finished:
                events += self.builder.feed(delta)
        return events

    def fail(self, error: VoltageError) -> list[Event]:
        """The response fails with ``error``'s message (a 5xx: ``server_error``)."""
        code = "server_error" if error.status >= 500 else "invalid_prompt"
        return list(self.builder.feed(Failed(error.message, code)))

    async def close(self, failure: BaseException | None = None) -> None:
        """Settle what was used and store the final record (once)."""
        if self._closed:
            return
        self._closed = True
        if self.stream is not None:
            await self.stream.close(failure)
        if not self.builder.finished:
            error = failure if isinstance(failure, VoltageError) else None
            message = error.message if error else "The response ended before it was complete"
            self.builder.feed(Failed(message))
        if self.body.store:
            if self._saving is not None:
                await asyncio.shield(self._saving)
            await asyncio.shield(self.save())

    async def whole(self, stream: Stream) -> Response:
        """Generate to the end within the chat deadline: the finished Response."""
        self.start_events()

        async def drain() -> None:
            async for chunk in chunks(stream):
                self.feed(chunk)

        try:
            await guards.within(
                drain(), self.runs.models.config.request_limits.chat_timeout_s, "Response"
            )
        except BaseException as exc:
            stream.gen.cancel()
            explained = stream.explain(exc) if isinstance(exc, Exception) else None
            await self.close(explained or exc)
            if explained is not None:
                raise explained from None
            raise
        await self.close()
        return self.builder.response

    # --- storage ---

    def record(self) -> StoredResponse:
        response = self.builder.response
        outputs = [item.model_dump(mode="json", exclude_none=True) for item in response.output]
        finished = response.status in FINAL
        now = time.time()
        return StoredResponse(
            id=response.id,
            owner=self.principal.key_id,
            model=self.model.id,
            status=response.status,
            response=response.model_dump(mode="json"),
            input_items=self.inputs,
            conversation=self.conversation + (outputs if finished else []),
            request=self.rerun() if self.body.background else None,
            background=self.body.background,
            created_at=float(response.created_at),
            expires_at=now + self.runs.models.config.responses.ttl_s,
        )

    async def save(self) -> None:
        """Store the final state (a background run's only if it was not cancelled)."""
        record = self.record()
        if self.body.background:
            await self.runs.store.finish(
                record.id, record.response, record.status, record.conversation
            )
        else:
            await self.runs.store.put(record)

    def rerun(self) -> dict[str, Any]:
        """What another replica needs to run this background response again."""
        p = self.principal
        return {
            "body": self.body.model_dump(mode="json", by_alias=True, exclude_unset=True),
            "principal": {"key_id": p.key_id, "name": p.name, "plan": p.plan},
        }

    # --- background ---

    async def queue(self, reserve: int, prepared: Any) -> tuple[dict[str, Any], dict[str, str]]:
        """Store the response queued, admit it and start its run: the queued response, and
        the admission's headers."""
        self.builder.queue()
        queued = self.builder.response.model_dump(mode="json")
        record = dataclasses.replace(
            self.record(), lease_owner=self.runs.owner, lease_until=time.time() + LEASE_S
        )
        await self.runs.store.put(record)
        admitted: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self.runs.launch(self.run(reserve, admitted, prepared))
        return queued, await admitted

    async def run(
        self,
        reserve: int | None,
        admitted: asyncio.Future[dict[str, str]] | None,
        prepared: Any = None,
    ) -> None:
        """A background run, from admission to its stored end (``reserve`` None: counted
        again, for a run resumed on another replica). Metered apart from the request that
        queued it: what it uses is delivered when it ends."""
        tries = failover.Tries.at("/v1/responses")
        models, meter = self.runs.models, Meter(self.runs.admissions, in_request=False)
        try:
            if reserve is None:
                key = self.principal.key_id
                reserve, prepared = await reservation(
                    models, meter, self.chat, self.model, CHAT, tries, key
                )
            stream = await open_stream(
                models, meter, self.chat, self.principal, self.model, CHAT, tries, reserve, prepared
            )
        except BaseException as exc:
            if admitted is not None and not admitted.done():
                admitted.set_exception(exc)
            self.builder.feed(Failed(_message(exc)))
            await asyncio.shield(self.save())
            if not isinstance(exc, Exception):
                raise
            return
        if admitted is not None and not admitted.done():
            admitted.set_result(dict(stream.ticket.headers))
        self.stream = stream
        self.start_events()
        response = self.builder.response.model_dump(mode="json")
        await self.runs.store.set_status(self.id, "in_progress", response)
        watcher = asyncio.create_task(self._watch(stream))
        try:
            await self.whole(stream)
        except Exception as exc:
            logger.info("background response %s ended: %s", self.id, type(unwrap(exc)).__name__)
        finally:
            watcher.cancel()

    async def _watch(self, stream: Stream) -> None:
        """Renew the lease; stop the generation when the record was cancelled."""
        owner = self.runs.owner
        while True:
            await asyncio.sleep(RENEW_S)
            try:
                status = await self.runs.store.renew(self.id, owner, LEASE_S)
            except Exception as exc:  # the limiter restarting: try again
                logger.warning("lease renewal of %s failed: %r", self.id, exc)
                continue
            if status is None or status == "cancelled":
                stream.gen.cancel()
                return


async def chunks(stream: Stream) -> AsyncIterator[Any]:
    """The stream's chunks one by one (its items may be lists of chunks)."""
    for chunk in sse.parts(stream.first):
        yield chunk
    async for item in stream.gen:
        for chunk in sse.parts(item):
            yield chunk


def _message(exc: BaseException) -> str:
    cause = unwrap(exc)
    if isinstance(cause, VoltageError):
        return cause.message
    return to_voltage_error(cause, "/v1/responses", "").message


class BackgroundRuns:
    """This replica's background runs, and its sweep for runs whose replica died; what a
    :class:`Run` needs: the models, the limiter's admissions and the stored responses."""

    def __init__(
        self, models: Models, admissions: Admissions, store: ResponsesClient, owner: str
    ) -> None:
        self.models = models
        self.admissions = admissions
        self.store = store
        self.owner = owner  # the lease holder's name: this replica
        self.tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def launch(self, coro: Any) -> None:
        """Run ``coro`` detached from the request (its admission is settled by the run itself,
        not by the HTTP response that queued it)."""
        task = detached(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def sweep(self) -> None:
        """Start the sweep (idempotent; again if it ended or belongs to another loop)."""
        task, loop = self._sweeper, asyncio.get_running_loop()
        if task is None or task.done() or task.get_loop() is not loop:
            self._sweeper = detached(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        while True:
            try:
                for record in await self.store.claim(self.owner, LEASE_S, 4):
                    self.resume(record)
            except Exception as exc:
                logger.warning("sweep for background responses failed: %r", exc)
            await asyncio.sleep(SWEEP_S)

    def resume(self, record: StoredResponse) -> None:
        """Run again a background response whose replica died (from its start)."""
        try:
            assert record.request is not None, "a background record keeps its request"
            body = CreateResponseRequest.model_validate(record.request["body"])
            principal = Principal(**record.request["principal"])
            model = self.models.by_name[body.model]
            history = list(record.conversation)
            chat = chat_request(body, parse_items(history), model.id)
        except Exception as exc:  # a config change since: the model is gone
            logger.warning("background response %s cannot run again: %r", record.id, exc)
            return
        builder = ResponseBuilder(body, response_id=record.id, created_at=int(record.created_at))
        run = Run(self, body, principal, builder, record.input_items, history, chat, model)
        builder.queue()
        self.launch(run.run(None, None))


def get_runs(request: Request) -> BackgroundRuns:
    """This replica's background runs (``app.state.runs``), for ``POST /responses``."""
    runs: BackgroundRuns = request.app.state.runs
    return runs
