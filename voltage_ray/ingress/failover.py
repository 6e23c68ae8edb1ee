"""Failover: a model call whose replica died is tried again, then on the model's fallbacks.

Serve routes each try to a live replica: when a call fails because its replica died or became
unreachable (Ray's actor errors, a node gone), the router drops that replica and the next try
lands elsewhere. A model is tried ``1 + retries`` times, then each of its ``fallbacks`` the same
way, all within the request's deadline (the caller's ``guards.within`` wraps the whole loop).
Errors the model itself raises (a 4xx, a bug's 500) are never retried: another replica would
answer the same. A model with no running replica while it should have some (``min_replicas``
above zero) is skipped at once instead of queueing in Serve's router until the deadline.

A model at capacity is not a failure: when the requests this ingress replica has let in for it
fill what its replicas run plus its queue and the request's key holds its fair share of them
(``Models.occupy``), when the replica's fair queue refuses or sheds it (``Overloaded``), or when
Serve's own bound on the router queue refuses the call (``max_queued_requests``), the request is
answered at once with a 503 and ``Retry-After``, neither tried again nor billed.

Every try is recorded in the spec's ``attempts`` shape: ``{step, url, status, latency_ms}``,
``step`` the Serve deployment tried (``fallback <deployment>`` for a fallback; chat's tokenizing
call before admission is ``<deployment>:prepare``), ``url`` the route
the request came in on. When every try failed the answer is a 503 carrying them; a success after
a failed try carries them in the ``x-voltage-attempts`` header (compact JSON).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from voltage_ray.errors import Overloaded, ServiceUnavailable, unwrap

if TYPE_CHECKING:
    from voltage_ray.config import ModelConfig
    from voltage_ray.ingress.meter import Meter
    from voltage_ray.ingress.served_models import Models

logger = logging.getLogger(__name__)

T = TypeVar("T")
HEADER = "x-voltage-attempts"
RETRY_AFTER_S = 1
OVERLOADED_RETRY_AFTER_S = 1  # a chat row frees within a second or two at full load
# ActorDiedError and ActorUnavailableError are RayActorErrors.
REPLICA_GONE = (RayActorError, WorkerCrashedError, NodeDiedError, DeploymentUnavailableError)


def replica_gone(exc: BaseException) -> bool:
    """Did the call fail because its replica (or node) went away, not because of the request?"""
    return isinstance(exc, REPLICA_GONE) or isinstance(unwrap(exc), REPLICA_GONE)


@dataclass
class Attempt:
    step: str
    url: str
    status: int
    latency_ms: int


@dataclass
class Tries:
    """The attempts of one request, across its model calls (chat: prepare, then generate)."""

    url: str
    attempts: list[Attempt]

    @classmethod
    def at(cls, url: str) -> Tries:
        return cls(url, [])

    @property
    def failed(self) -> int:
        return sum(1 for a in self.attempts if a.status >= 500)

    def as_list(self) -> list[dict[str, Any]]:
        return [asdict(a) for a in self.attempts]

    def headers(self) -> dict[str, str]:
        """``x-voltage-attempts`` when some try failed before the success, else nothing."""
        if not self.failed:
            return {}
        return {HEADER: json.dumps(self.as_list(), separators=(",", ":"))}

    def record(self, step: str, status: int, started: float) -> None:
        ms = int((time.monotonic() - started) * 1000) if started else 0
        self.attempts.append(Attempt(step, self.url, status, ms))


async def call(
    models: Models,
    model: ModelConfig,
    tries: Tries,
    send: Callable[[ModelConfig], Awaitable[T]],
    method: str = "",
    key: str = "",
    meter: Meter | None = None,
) -> T:
    """``await send(target)`` for ``model``, then its fallbacks, until one answers.

    Raises what ``send`` raised when that is not a replica failure, else (every try failed) a
    503 whose details carry the attempts; a 503 at once when ``model`` is at capacity for the
    API key ``key`` (the place taken is ``meter``'s, held until its request ends).
    """
    if not await models.occupy(model, key, meter):
        models.observe_overload(model.id, "refused")
        raise overloaded(model, tries, "refused")
    for i, target in enumerate([model, *(models.by_id[m] for m in model.fallbacks)]):
        step = models.deployment_names[target.id] + (f":{method}" if method else "")
        step = f"fallback {step}" if i else step
        for _ in range(1 + target.retries):
            if not await models.routable(target):
                tries.record(step, ServiceUnavailable.status, 0)
                break
            started = time.monotonic()
            try:
                result = await send(target)
            except Exception as exc:
                cause = unwrap(exc)
                if isinstance(cause, Overloaded):  # the replica's fair queue: refused or shed
                    tries.record(step, ServiceUnavailable.status, started)
                    models.observe_overload(target.id, str(cause.details.get("reason")))
                    cause.details["attempts"] = tries.as_list()
                    raise cause from None
                if isinstance(cause, BackPressureError):
                    tries.record(step, ServiceUnavailable.status, started)
                    models.observe_overload(target.id, "capacity")
                    raise overloaded(target, tries, "capacity") from None
                if not replica_gone(exc):
                    raise
                tries.record(step, ServiceUnavailable.status, started)
                models.forget_readiness()
                models.observe_failover(target.id, type(unwrap(exc)).__name__)
                logger.warning(
                    "%s: a replica of %s failed (%s); %s",
                    tries.url,
                    step,
                    type(unwrap(exc)).__name__,
                    "trying again",
                )
                continue
            tries.record(step, 200, started)
            return result
    raise ServiceUnavailable(
        f"No replica of model '{model.id}'"
        + (f" or its fallbacks ({', '.join(model.fallbacks)})" if model.fallbacks else "")
        + " could answer; the request may be retried shortly",
        details={"attempts": tries.as_list(), "retryable": True},
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def lost_mid_stream(exc: BaseException, tries: Tries, started: float) -> ServiceUnavailable | None:
    """The error frame of a stream whose replica (or node) died after its first token: a 503
    that says the request may be retried (it is not tried again here: the client has part of
    the answer), with every attempt, this one last. None for any other failure."""
    if not replica_gone(exc):
        return None
    step = tries.attempts[-1].step if tries.attempts else ""
    tries.record(step, ServiceUnavailable.status, started)
    return ServiceUnavailable(
        "The model replica serving this stream was lost; the request may be retried",
        details={"attempts": tries.as_list(), "retryable": True},
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def overloaded(model: ModelConfig, tries: Tries, reason: str) -> Overloaded:
    """The 503 for a model whose queue is full."""
    error = Overloaded.at(model.id, model.deployment.max_queued_requests, reason)
    error.details["attempts"] = tries.as_list()
    error.headers["Retry-After"] = str(OVERLOADED_RETRY_AFTER_S)
    return error


async def result(response: Any) -> Any:
    """Await a handle response; cancelling the caller cancels it on the replica too."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise
