"""The failover loop's decisions: what is tried again, in what order, and what is recorded.

The integration test (tests/integration/test_failover.py) kills real replicas; here the model
calls are plain coroutines that raise Ray's own exception types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError

from voltage_ray.config import AppConfig, ModelConfig
from voltage_ray.errors import BadRequest, ServiceUnavailable
from voltage_ray.ingress import failover

URL = "/v1/embeddings"


def model(model_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "kind": "embeddings", "source": {"builtin": "tiny-sd"}, **extra}


@dataclass
class FakeIngress:
    config: AppConfig
    down: set[str] = field(default_factory=set)  # model ids with no running replica
    forgotten: int = 0
    failovers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def by_id(self) -> dict[str, ModelConfig]:
        return {m.id: m for m in self.config.models}

    @property
    def deployment_names(self) -> dict[str, str]:
        return {m.id: f"embeddings-{m.id}" for m in self.config.models}

    async def routable(self, target: ModelConfig) -> bool:
        return target.id not in self.down

    async def occupy(self, target: ModelConfig, key: str, meter: Any) -> bool:
        return True

    def forget_readiness(self) -> None:
        self.forgotten += 1

    def observe_failover(self, model_id: str, error: str) -> None:
        self.failovers.append((model_id, error))


def ingress(*models: dict[str, Any], down: set[str] | None = None) -> FakeIngress:
    return FakeIngress(AppConfig.model_validate({"models": list(models)}), down or set())


def failing(outcomes: list[Any]) -> tuple[Any, list[str]]:
    """A send that raises/returns ``outcomes`` in turn, and the model ids it was called with."""
    calls: list[str] = []

    async def send(target: ModelConfig) -> Any:
        calls.append(target.id)
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return send, calls


async def test_a_dead_replica_is_tried_again_and_the_success_carries_the_attempts() -> None:
    app = ingress(model("a"))
    send, calls = failing([ActorDiedError(), ActorUnavailableError("gone", None), "ok"])
    tries = failover.Tries.at(URL)
    assert await failover.call(app, app.by_id["a"], tries, send) == "ok"  # type: ignore[arg-type]
    assert calls == ["a", "a", "a"]
    assert [(a.step, a.url, a.status) for a in tries.attempts] == [
        ("embeddings-a", URL, 503),
        ("embeddings-a", URL, 503),
        ("embeddings-a", URL, 200),
    ]
    header = json.loads(tries.headers()[failover.HEADER])
    assert header == tries.as_list() and all(isinstance(a["latency_ms"], int) for a in header)
    assert app.forgotten == 2
    assert app.failovers == [("a", "ActorDiedError"), ("a", "ActorUnavailableError")]


async def test_a_first_try_success_has_no_header() -> None:
    app = ingress(model("a"))
    send, _ = failing(["ok"])
    tries = failover.Tries.at(URL)
    await failover.call(app, app.by_id["a"], tries, send)  # type: ignore[arg-type]
    assert tries.headers() == {} and tries.attempts[0].status == 200


async def test_fallbacks_follow_the_models_own_retries_then_a_503_lists_every_try() -> None:
    app = ingress(
        model("a", retries=1, fallbacks=["b", "c"]), model("b", retries=0), model("c"), down={"c"}
    )
    send, calls = failing([ActorDiedError()] * 3)
    tries = failover.Tries.at(URL)
    with pytest.raises(ServiceUnavailable) as raised:
        await failover.call(app, app.by_id["a"], tries, send, "prepare")  # type: ignore[arg-type]
    assert calls == ["a", "a", "b"]  # c has no running replica: not called, recorded
    err = raised.value
    assert err.headers == {"Retry-After": "1"}
    assert "'a'" in err.message and "b, c" in err.message
    steps = [(a["step"], a["status"]) for a in err.details["attempts"]]
    assert steps == [
        ("embeddings-a:prepare", 503),
        ("embeddings-a:prepare", 503),
        ("fallback embeddings-b:prepare", 503),
        ("fallback embeddings-c:prepare", 503),
    ]
    assert err.details["attempts"][-1]["latency_ms"] == 0


async def test_a_fallback_answers_when_the_model_has_no_replica() -> None:
    app = ingress(model("a", fallbacks=["b"]), model("b"), down={"a"})
    send, calls = failing(["from b"])
    tries = failover.Tries.at(URL)
    assert await failover.call(app, app.by_id["a"], tries, send) == "from b"  # type: ignore[arg-type]
    assert calls == ["b"]
    assert [a.step for a in tries.attempts] == ["embeddings-a", "fallback embeddings-b"]
    assert failover.HEADER in tries.headers()


@pytest.mark.parametrize("error", [BadRequest("too long"), RuntimeError("a bug")])
async def test_errors_of_the_request_itself_are_not_tried_again(error: Exception) -> None:
    app = ingress(model("a", fallbacks=["b"]), model("b"))
    send, calls = failing([error, "never"])
    with pytest.raises(type(error)):
        await failover.call(app, app.by_id["a"], failover.Tries.at(URL), send)  # type: ignore[arg-type]
    assert calls == ["a"]


@pytest.mark.parametrize(
    ("fallbacks", "problem"),
    [(["nope"], "fallback 'nope'"), (["a"], "fallback 'a'"), (["chat"], "fallback 'chat'")],
)
def test_fallbacks_must_name_another_model_of_the_same_kind(
    fallbacks: list[str], problem: str
) -> None:
    chat = {"id": "chat", "kind": "chat", "source": {"builtin": "tiny-llama"}}
    with pytest.raises(ValueError, match=problem):
        AppConfig.model_validate({"models": [model("a", fallbacks=fallbacks), chat]})
