"""Plans, quotas and rate limits end to end: the real app, the real limiter actor, real HTTP.

Usage is read from the limiter actor itself (what it decides with) and from the database (what
survives). Tests that restart things run last: editing plans, killing a chat replica, killing the
limiter, restarting the service.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import ray

from tests.integration.conftest import ServedApp, wait_key_live
from voltage_ray.limits.keys import parse_key
from voltage_ray.limits.limiter import ACTOR_NAME, NAMESPACE

CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"
IMAGES = "/v1/images/generations"
MESSAGES = [{"role": "user", "content": "Tell me a story about a fox"}]


def body(max_tokens: int = 2, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": max_tokens, **extra}


def limiter() -> Any:
    return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)


def report(key: str) -> dict[str, Any]:
    result = ray.get(limiter().usage.remote(parse_key(key)), timeout=30)
    assert result is not None
    return result


def wait_for(check: Callable[[], Any], timeout: float = 30.0, every: float = 0.2) -> Any:
    """Poll until ``check()`` is truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (ray.exceptions.RayError, httpx.HTTPError):
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(every)


def settled(key: str) -> dict[str, Any]:
    """The key's usage once no reservation is outstanding (settlements are asynchronous)."""

    def check() -> dict[str, Any] | None:
        r = report(key)
        lim = r["limits"]
        idle = lim["in_flight"]["used"] == 0 and lim["tokens"]["reserved"] == 0
        return r if idle and lim["images"]["reserved"] == 0 else None

    return wait_for(check)


@contextlib.contextmanager
def abandoned_post(
    served: ServedApp, path: str, key: str, payload: dict[str, Any]
) -> Iterator[None]:
    """POST ``payload`` on a raw connection, then hang up, unanswered, when the block ends."""
    url = httpx.URL(served.base_url)
    data = json.dumps(payload).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {url.host}:{url.port}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in served.headers(key).items()]
    head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + data)
        yield
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            assert sock.recv(1) == b"", "the request was answered before the client left"


def usage_row(db: Path, key_id: str) -> tuple[int, int, int] | None:
    """A key's (requests, tokens, reserved tokens) as the limiter last wrote them (one period)."""
    conn = sqlite3.connect(db)
    try:
        row = conn.execute(
            "SELECT requests, tokens, reserved_tokens FROM usage WHERE key_id = ?", (key_id,)
        ).fetchone()
    finally:
        conn.close()
    return None if row is None else (int(row[0]), int(row[1]), int(row[2]))


def stored_row(served: ServedApp, key: str) -> tuple[int, int] | None:
    key_id = parse_key(key)
    row = usage_row(served.db, key_id) if key_id else None
    return None if row is None else row[:2]


def assert_error(
    r: httpx.Response, status: int, message: str, endpoint: str = CHAT
) -> dict[str, Any]:
    assert r.status_code == status, r.text
    payload = r.json()
    assert payload["error"] == message
    details: dict[str, Any] = payload["details"]
    assert details["status"] == status and details["endpoint"] == endpoint
    return details


async def test_thirty_simultaneous_requests_on_five_per_minute(served: ServedApp) -> None:
    # 30: well inside tiny-chat's queue bound (16 running + 32 queued per ingress), so that
    # other tests' requests still in flight cannot turn a 429 into a 503 (test_overload's).
    key = served.new_key("limits_five")
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=served.base_url, timeout=120, limits=limits) as c:
        rs = await asyncio.gather(
            *(c.post(CHAT, headers=served.headers(key), json=body(1)) for _ in range(30))
        )
    ok = [r for r in rs if r.status_code == 200]
    limited = [r for r in rs if r.status_code == 429]
    assert len(ok) == 5 and len(limited) == 25, [r.status_code for r in rs]
    for r in limited:
        details = assert_error(r, 429, "Rate limit exceeded")
        retry = details["retry_after"]
        assert isinstance(retry, int) and 1 <= retry <= 60
        assert r.headers["retry-after"] == str(retry)
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == [0, 1, 2, 3, 4]
    for r in ok:
        assert r.headers["x-ratelimit-limit-requests"] == "5"
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-tokens" not in r.headers  # no token limit in this plan
    assert settled(key)["limits"]["requests"]["used"] == 5


async def test_token_quota_is_exact_under_concurrency(served: ServedApp) -> None:
    key = served.new_key("limits_tokens")  # 200 tokens a month
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=served.base_url, timeout=120, limits=limits) as c:
        rs = await asyncio.gather(
            *(c.post(CHAT, headers=served.headers(key), json=body(4)) for _ in range(20))
        )
        ok = [r for r in rs if r.status_code == 200]
        assert ok and all(r.status_code in (200, 403) for r in rs), [r.status_code for r in rs]
        prompt = ok[0].json()["usage"]["prompt_tokens"]
        reserve = prompt + 4
        assert len(ok) * prompt <= 200  # every admitted request held its whole reservation
        spent = sum(r.json()["usage"]["total_tokens"] for r in ok)
        assert ok[0].headers["x-ratelimit-limit-tokens"] == "200"
        used = settled(key)["limits"]["tokens"]["used"]
        assert used == spent <= 200
        # Spend what is left one request at a time; the quota is never exceeded.
        while used + reserve <= 200:
            r = await c.post(CHAT, headers=served.headers(key), json=body(4))
            assert r.status_code == 200, r.text
            used = settled(key)["limits"]["tokens"]["used"]
        r = await c.post(CHAT, headers=served.headers(key), json=body(4))
    details = assert_error(r, 403, "Quota exceeded")
    assert details["plan"] == "limits_tokens"
    assert details["usage"] == {"tokens_used": used, "tokens_limit": 200}
    assert used <= 200


def test_headers_on_json_and_sse_responses(served: ServedApp) -> None:
    key = served.new_key("limits_metered")
    with served.client() as c:
        r = c.post(CHAT, headers=served.headers(key), json=body(3))
        assert r.status_code == 200
        reserve = r.json()["usage"]["prompt_tokens"] + 3
        assert r.headers["x-ratelimit-limit-requests"] == "1000"
        assert r.headers["x-ratelimit-remaining-requests"] == "999"
        assert r.headers["x-ratelimit-limit-tokens"] == "1000000"
        assert r.headers["x-ratelimit-remaining-tokens"] == str(1000000 - reserve)
        assert "h" in r.headers["x-ratelimit-reset-tokens"]  # the monthly period's end
        first = settled(key)["limits"]["tokens"]["used"]
        assert first == r.json()["usage"]["total_tokens"]
        stream = body(3, stream=True, stream_options={"include_usage": True})
        with c.stream("POST", CHAT, headers=served.headers(key), json=stream) as s:
            assert s.status_code == 200
            assert s.headers["content-type"].startswith("text/event-stream")
            assert s.headers["x-ratelimit-limit-requests"] == "1000"
            assert s.headers["x-ratelimit-remaining-requests"] == "998"
            assert s.headers["x-ratelimit-limit-tokens"] == "1000000"
            assert int(s.headers["x-ratelimit-remaining-tokens"]) == 1000000 - first - reserve
            lines = [line for line in s.iter_lines() if line.startswith("data: {")]
    final = json.loads(lines[-1][len("data: ") :])
    assert final["choices"] == []
    assert settled(key)["limits"]["tokens"]["used"] == first + final["usage"]["total_tokens"]


def test_every_endpoint_goes_through_one_limiter(served: ServedApp) -> None:
    """Chat, embeddings and images share a key's per-minute window; each is metered."""
    five = served.new_key("limits_five")
    embed = {"model": "all-MiniLM-L6-v2", "input": ["hello world", "foxes"]}
    image: dict[str, Any] = {"prompt": "a fox", "size": "256x256", "num_inference_steps": 10}
    image["response_format"] = "b64_json"
    with served.client() as c:
        codes = [c.post(CHAT, headers=served.headers(five), json=body(1)).status_code]
        codes += [c.post(EMBED, headers=served.headers(five), json=embed).status_code]
        codes += [c.post(IMAGES, headers=served.headers(five), json=image).status_code]
        codes += [c.post(EMBED, headers=served.headers(five), json=embed).status_code]
        codes += [c.post(CHAT, headers=served.headers(five), json=body(1)).status_code]
        refused = c.post(EMBED, headers=served.headers(five), json=embed)
        assert codes == [200] * 5
        assert_error(refused, 429, "Rate limit exceeded", EMBED)
        assert refused.headers["retry-after"] == str(refused.json()["details"]["retry_after"])

        metered = served.new_key("limits_metered")
        r = c.post(EMBED, headers=served.headers(metered), json=embed)
        assert r.status_code == 200
        reserve = len("hello world") + len("foxes")  # the route's byte upper bound
        assert r.headers["x-ratelimit-limit-tokens"] == "1000000"
        assert r.headers["x-ratelimit-remaining-tokens"] == str(1000000 - reserve)
        assert r.headers["x-ratelimit-remaining-requests"] == "999"
        used = settled(metered)["limits"]
        assert used["tokens"]["used"] == r.json()["usage"]["total_tokens"] <= reserve

        pictures = served.new_key("limits_images")  # 3 images a month
        r = c.post(IMAGES, headers=served.headers(pictures), json={**image, "n": 2})
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-limit-images"] == "3"
        assert r.headers["x-ratelimit-remaining-images"] == "1"
        assert "x-ratelimit-limit-tokens" not in r.headers
        over = c.post(IMAGES, headers=served.headers(pictures), json={**image, "n": 2})
        details = assert_error(over, 403, "Quota exceeded", IMAGES)
        assert details["plan"] == "limits_images"
        assert details["usage"] == {"images_used": 2, "images_limit": 3}
        assert c.post(IMAGES, headers=served.headers(pictures), json=image).status_code == 200
    assert settled(pictures)["limits"]["images"] == {"used": 3, "reserved": 0, "limit": 3}


def test_settlement_on_client_disconnect(served: ServedApp) -> None:
    """Streamed and plain requests abandoned by the client release their reservations."""
    key = served.new_key("limits_single")  # one request at a time
    with served.client() as c:
        stream = body(480, stream=True, temperature=0)
        with c.stream("POST", CHAT, headers=served.headers(key), json=stream) as s:
            assert s.status_code == 200
            lines = s.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            # While it streams, the plan's single concurrency slot is taken.
            busy = c.post(CHAT, headers=served.headers(key), json=body(1))
            details = assert_error(busy, 429, "Rate limit exceeded")
            assert details["limit"] == "max_concurrent_requests" and details["retry_after"] == 1
        # The client hung up; the stream settles what it used so far.
        tokens = settled(key)["limits"]["tokens"]["used"]
        assert 0 < tokens < 480 + 64
        # A plain request abandoned mid-generation: the client hangs up once the limiter holds
        # its slot and the model generates for it (its 480 tokens take the tiny model >= 0.3 s),
        # not after a guessed delay. (The limiter holding the slot alone is not enough: a client
        # that leaves before the ingress has the limiter's answer was never admitted, and its
        # hold is voided, not counted.) Greedy: the same long answer every time (sampled, the
        # random model may stop at once).
        from ray import serve

        model = serve.get_deployment_handle("chat-tiny-chat", app_name="voltage")
        plain = body(480, temperature=0)
        with abandoned_post(served, CHAT, key, plain):
            wait_for(
                lambda: (
                    report(key)["limits"]["in_flight"]["used"] == 1
                    and model.info.remote().result()["running"] >= 1
                ),
                every=0.01,
            )
        after = settled(key)
        assert after["limits"]["requests"]["used"] == 2  # the refused one took nothing
        assert after["limits"]["tokens"]["used"] == tokens  # cancelled before it finished
        assert c.post(CHAT, headers=served.headers(key), json=body(1)).status_code == 200
        # What the abandoned request would have cost: far more than it was billed (nothing).
        whole = c.post(CHAT, headers=served.headers(key), json=plain)
        assert whole.json()["usage"]["completion_tokens"] >= 100, whole.json()["usage"]


def test_a_repeat_of_an_idempotency_key_is_answered_and_billed_once(served: ServedApp) -> None:
    """The OpenAI SDK sends a lost request again with the same headers: with an Idempotency-Key
    the repeat gets the first answer again (not a new sample) and nothing more is billed."""
    key = served.new_key("limits_metered")
    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key=key, max_retries=0)
    chat = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 8, "temperature": 1.0}
    once = {"Idempotency-Key": "chat-1"}
    first = client.chat.completions.with_raw_response.create(**chat, extra_headers=once)
    again = client.chat.completions.with_raw_response.create(**chat, extra_headers=once)
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.parse().model_dump() == first.parse().model_dump()  # same id, text and usage
    usage = first.parse().usage
    assert usage is not None
    billed = settled(key)["limits"]
    assert billed["requests"]["used"] == 1 and billed["tokens"]["used"] == usage.total_tokens

    # A stream is kept whole and sent again chunk for chunk.
    streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    keyed = {"Idempotency-Key": "stream-1"}
    runs = [list(client.chat.completions.create(**streamed, extra_headers=keyed)) for _ in "ab"]
    assert [c.model_dump() for c in runs[0]] == [c.model_dump() for c in runs[1]]
    stream_usage = runs[0][-1].usage
    assert stream_usage is not None
    embed = {"model": "all-MiniLM-L6-v2", "input": ["hello world", "foxes"]}
    keyed = {"Idempotency-Key": "embed-1"}
    vectors = [client.embeddings.create(**embed, extra_headers=keyed) for _ in "ab"]
    assert vectors[0].model_dump() == vectors[1].model_dump()
    assert vectors[0].usage is not None
    billed = settled(key)["limits"]
    assert billed["requests"]["used"] == 3
    assert billed["tokens"]["used"] == (
        usage.total_tokens + stream_usage.total_tokens + vectors[0].usage.total_tokens
    )

    with served.client() as c:
        # The key is the API key's own: another request under it is a 400.
        other = c.post(CHAT, headers={**served.headers(key), **once}, json=body(3))
        assert assert_error(other, 400, other.json()["error"])["param"] == "Idempotency-Key"
        assert "different request" in other.json()["error"]
        too_long = {**served.headers(key), "Idempotency-Key": "k" * 256}
        bad = c.post(CHAT, headers=too_long, json=body())
        assert assert_error(bad, 400, bad.json()["error"])["param"] == "Idempotency-Key"
        # A repeat sent while the first attempt runs waits for it and takes its answer.
        long = {"Idempotency-Key": "long-1", **served.headers(key)}
        plain = body(480, temperature=0)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            started = pool.submit(c.post, CHAT, headers=long, json=plain)
            wait_for(lambda: report(key)["limits"]["in_flight"]["used"] == 1, every=0.01)
            with served.client() as other_connection:
                repeat = other_connection.post(CHAT, headers=long, json=plain)
            original = started.result()
    assert original.status_code == repeat.status_code == 200, repeat.text
    assert repeat.headers["idempotent-replayed"] == "true"
    assert repeat.json() == original.json()
    billed = settled(key)["limits"]
    assert billed["requests"]["used"] == 4  # the two 400s took nothing
    info = ray.get(limiter().info.remote(), timeout=30)
    assert info["idempotent"]["replayed"] >= 4


def test_usage_command(served: ServedApp) -> None:
    key = served.new_key("limits_metered", "usage-cli")
    with served.client() as c:
        assert c.post(CHAT, headers=served.headers(key), json=body(2)).status_code == 200
    tokens = settled(key)["limits"]["tokens"]["used"]
    wait_for(lambda: stored_row(served, key) == (1, tokens), timeout=5)  # group commit <= 1 s
    argv = [sys.executable, "-m", "voltage_ray.cli", "--db", str(served.db)]
    argv += ["--plans", str(served.plans), "usage", key]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith(parse_key(key) or "?"))
    assert "usage-cli" in row and "limits_metered" in row
    assert f"{tokens:,} / 1,000,000" in row and "0 / 100" in row
    assert "requests_per_minute 1000" in out
    everyone = subprocess.run(argv[:-1], capture_output=True, text=True, timeout=60, check=True)
    assert str(parse_key(key)) in everyone.stdout


def test_limits_disabled_still_authenticates(served: ServedApp) -> None:
    """`limits: {enabled: false}` (for benchmarks): no metering, but keys are still checked."""
    from ray import serve

    from voltage_ray.app import build_app

    args = {**served.args, "models": served.args["models"][:1], "limits": {"enabled": False}}
    serve.run(build_app(args), name="nolimits", route_prefix="/nolimits", blocking=False)
    key = served.new_key("limits_five")
    url = f"{served.base_url}/nolimits{CHAT}"
    try:
        wait_for(lambda: httpx.get(f"{served.base_url}/nolimits/health").status_code == 200, 300)
        wait_key_live([f"{served.base_url}/nolimits"], key)
        with served.client() as c:
            rs = [c.post(url, headers=served.headers(key), json=body(1)) for _ in range(7)]
            assert [r.status_code for r in rs] == [200] * 7
            assert not any(h.startswith("x-ratelimit") for r in rs for h in r.headers)
            assert c.post(url, headers=served.headers(key + "x"), json=body(1)).status_code == 401
        assert report(key)["limits"]["requests"]["used"] == 0
    finally:
        serve.delete("nolimits")


def test_plan_edited_while_running(served: ServedApp) -> None:
    key = served.new_key("limits_edit")  # 2 requests per minute
    original = served.plans.read_text()
    post = lambda c: c.post(CHAT, headers=served.headers(key), json=body(1))  # noqa: E731
    try:
        with served.client() as c:
            assert [post(c).status_code for _ in range(3)] == [200, 200, 429]
            served.plans.write_text(
                original.replace(
                    "limits_edit: {requests_per_minute: 2}", "limits_edit: {requests_per_minute: 4}"
                )
            )
            wait_for(lambda: post(c).status_code == 200, timeout=15)
            assert [post(c).status_code for _ in range(2)] == [200, 429]  # 4 in the minute
            served.plans.write_text(
                original.replace(
                    "limits_edit: {requests_per_minute: 2}",
                    "limits_edit: {requests_per_minute: 100, tokens_per_month: 0}",
                )
            )
            r = wait_for(lambda: (x := post(c)).status_code == 403 and x, timeout=15)
            details = assert_error(r, 403, "Quota exceeded")
            used = settled(key)["limits"]["tokens"]["used"]
            assert details["usage"] == {"tokens_used": used, "tokens_limit": 0}
    finally:
        served.plans.write_text(original)


def replica_actor(prefix: str) -> Any:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == "serve" and f"#{prefix}" in actor["name"]:
            return ray.get_actor(actor["name"], namespace="serve")
    raise AssertionError(f"no replica of {prefix}")


def wait_chat_ok(served: ServedApp, key: str) -> None:
    def ok() -> bool:
        with served.client() as c:
            return c.post(CHAT, headers=served.headers(key), json=body(1)).status_code == 200

    wait_for(ok, timeout=180, every=1.0)


def test_settlement_when_the_model_fails_mid_stream(served: ServedApp) -> None:
    key = served.new_key("limits_single")
    with served.client() as c:
        stream = body(480, stream=True, temperature=0)
        with c.stream("POST", CHAT, headers=served.headers(key), json=stream) as s:
            assert s.status_code == 200
            frames = (line for line in s.iter_lines() if line.startswith("data: "))
            next(frames)
            ray.kill(replica_actor("chat-tiny-chat"), no_restart=True)
            rest = list(frames)
    assert rest and '"error"' in rest[-1] and "[DONE]" not in rest[-1]
    # A lost replica is a 503 frame that says the request may be retried, with its attempts.
    frame = json.loads(rest[-1][len("data: ") :])
    assert frame["details"]["status"] == 503 and frame["details"]["retryable"] is True
    assert frame["details"]["attempts"][-1]["status"] == 503
    assert "may be retried" in frame["error"]
    used = settled(key)["limits"]["tokens"]["used"]
    assert 0 < used < 480 + 64
    wait_chat_ok(served, key)  # the slot was released: the key's next request is admitted


def test_limiter_killed_and_restarted(served: ServedApp) -> None:
    key = served.new_key("limits_metered")
    with served.client() as c:
        for _ in range(3):
            assert c.post(CHAT, headers=served.headers(key), json=body(1)).status_code == 200
        before = settled(key)["limits"]
        wait_for(lambda: stored_row(served, key) == (3, before["tokens"]["used"]), timeout=5)
        actor_id = limiter()._actor_id
        ray.kill(limiter(), no_restart=False)  # Ray restarts it (max_restarts)
        statuses: list[int] = []

        def admitted() -> bool:
            r = c.post(CHAT, headers=served.headers(key), json=body(1))
            statuses.append(r.status_code)
            if r.status_code == 503:
                assert_error(r, 503, r.json()["error"])
            return r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "1000"

        wait_for(admitted, timeout=60, every=0.1)
        assert set(statuses) <= {200, 503}
        assert limiter()._actor_id == actor_id  # the same actor, restarted
        after = settled(key)["limits"]
        assert after["requests"]["used"] == 3 + statuses.count(200)
        assert after["tokens"]["used"] > before["tokens"]["used"]

        # Killed for good: requests get a 503 until the ingress creates a new limiter.
        time.sleep(1.2)  # let the group commit write the last requests
        ray.kill(limiter(), no_restart=True)
        r = c.post(CHAT, headers=served.headers(key), json=body(1))
        assert_error(r, 503, r.json().get("error", ""))
        assert "imiter" in r.json()["error"] and r.headers["retry-after"] == "1"
        wait_for(lambda: c.post(CHAT, headers=served.headers(key), json=body(1)).status_code == 200)
        recreated = report(key)["limits"]
        assert recreated["requests"]["used"] >= after["requests"]["used"] + 1


def test_usage_survives_a_service_restart(served: ServedApp) -> None:
    from ray import serve

    from voltage_ray.app import build_app

    five = served.new_key("limits_five")
    metered = served.new_key("limits_metered")
    with served.client() as c:
        assert [
            c.post(CHAT, headers=served.headers(five), json=body(1)).status_code for _ in range(3)
        ] == [200, 200, 200]
        assert c.post(CHAT, headers=served.headers(metered), json=body(2)).status_code == 200
    before = settled(metered)["limits"]
    # Graceful shutdown: the ingress delivers its settlements and has the limiter write usage;
    # then the limiter goes away at once, as it does when the cluster stops.
    serve.delete("voltage")
    ray.kill(limiter(), no_restart=True)
    assert stored_row(served, metered) == (1, before["tokens"]["used"])
    serve.run(build_app(served.args), name="voltage", route_prefix="/", blocking=False)
    wait_for(lambda: httpx.get(f"{served.base_url}/health", timeout=5).status_code == 200, 600)
    assert settled(metered)["limits"]["tokens"] == before["tokens"]
    with served.client() as c:
        statuses = [
            c.post(CHAT, headers=served.headers(five), json=body(1)).status_code for _ in range(3)
        ]
    assert statuses == [200, 200, 429]  # the minute window survived too
