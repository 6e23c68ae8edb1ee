"""The OpenAI contract on the vllm engine (vLLM's CPU build) and on the llama.cpp engine, the
same model (SmolLM2) behind the same ingress: every test runs on both (``model``), over real
HTTP. Where vLLM differs, the test says how (and README's "Chat engines")."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import CACHE_DIR, ServedApp
from tests.integration.test_limits import settled
from tests.integration.test_structured import HERMES_CALL, TIME, WEATHER, WEATHER_Q
from tests.vllm_serve.conftest import CHAT_TIMEOUT_S, SMOL

QUESTION = [{"role": "user", "content": "Write two sentences about the sea."}]
# SmolLM2's end tokens (<|endoftext|>, <|im_end|>): banned, a stream runs to its max_tokens.
NO_END = {"0": -100, "2": -100}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
# Longer than vLLM's KV block on CPU (prefix caching reuses whole blocks).
LONG_SYSTEM = " ".join(
    f"Rule {i}: answer briefly, politely and truthfully, in plain English." for i in range(30)
)


def sdk(served: ServedApp, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key=key or served.key, max_retries=0)


def test_json_and_sse_agree_and_a_repeated_prompt_is_cached(served: ServedApp, model: str) -> None:
    client = sdk(served)
    messages = [{"role": "system", "content": LONG_SYSTEM}, *QUESTION]
    kw: dict[str, Any] = dict(model=model, messages=messages, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kw)
    (choice,) = whole.choices
    assert whole.model == model and choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 24
    with httpx.Client(base_url=served.base_url, timeout=60) as c:
        body = {**kw, "stream": True, "stream_options": {"include_usage": True}}
        r = c.post("/v1/chat/completions", json=body, headers=served.headers())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    frames = [line.removeprefix("data: ") for line in r.text.splitlines() if line]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == choice.message.content
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == whole.usage.completion_tokens
    assert usage["prompt_tokens"] == whole.usage.prompt_tokens > 256
    # The same prompt again: its prefix came from the engine's cache (llama.cpp: every token but
    # the last; vLLM: whole KV blocks, so up to a block fewer).
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert usage["prompt_tokens"] - 1 - 128 <= cached <= usage["prompt_tokens"] - 1


def test_n_seeds_and_greedy_choices(served: ServedApp, model: str) -> None:
    client = sdk(served)
    kw: dict[str, Any] = dict(model=model, messages=QUESTION, max_tokens=12, n=3)
    seeded = client.chat.completions.create(**kw, temperature=1.0, seed=7)
    again = client.chat.completions.create(**kw, temperature=1.0, seed=7)
    texts = [c.message.content for c in seeded.choices]
    assert [c.index for c in seeded.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # n samples, not one copied
    greedy = client.chat.completions.create(**kw, temperature=0, logprobs=True)
    assert len({c.message.content for c in greedy.choices}) == 1  # vLLM: one sequence, copied
    counted = sum(len(c.logprobs.content or []) for c in greedy.choices)  # type: ignore[union-attr]
    assert greedy.usage is not None and greedy.usage.completion_tokens == counted > 0


def test_stop_strings_and_penalties(served: ServedApp, model: str) -> None:
    client = sdk(served)
    count = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    kw: dict[str, Any] = dict(model=model, messages=count, max_tokens=40, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content or ""
    assert "5" in full, full
    stopped = client.chat.completions.create(**kw, stop=["5"]).choices[0]
    assert stopped.finish_reason == "stop" and "5" not in (stopped.message.content or "")
    assert full.startswith(stopped.message.content or "")
    penalized = client.chat.completions.create(**kw, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized.choices[0].message.content != full


def test_structured_outputs(served: ServedApp, model: str) -> None:
    client = sdk(served)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    ask = [{"role": "user", "content": "Describe a person."}]
    r = client.chat.completions.create(
        model=model,
        messages=ask,
        response_format=fmt,
        max_tokens=60,
        n=2,
        seed=3,  # type: ignore[arg-type]
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        text = choice.message.content or ""
        value = json.loads(text)
        assert (
            list(value) == ["name", "age", "role"]
            and value["role"] in PERSON["properties"]["role"]["enum"]
        )  # type: ignore[index]
        # json.dumps' separators and no other whitespace, on both engines.
        assert text == json.dumps(value, ensure_ascii=False)
    choice = client.chat.completions.create(
        model=model,
        messages=ask,  # type: ignore[arg-type]
        max_tokens=10,
        temperature=0,
        extra_body={"structured_outputs": {"choice": ["positive", "negative"]}},
    )
    assert choice.choices[0].message.content in ("positive", "negative")
    regex = client.chat.completions.create(
        model=model,
        messages=ask,  # type: ignore[arg-type]
        max_tokens=10,
        temperature=0,
        extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}},
    )
    text = regex.choices[0].message.content or ""
    assert len(text) == 6 and text[:3].isdigit() and text[3] == "-" and text[4:].isalpha()


def test_tools_required_named_and_auto(served: ServedApp, model: str) -> None:
    client = sdk(served)
    required = client.chat.completions.create(
        model=model,
        messages=WEATHER_Q,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice="required",
        temperature=0,
        max_tokens=80,
    ).choices[0]
    assert required.finish_reason == "tool_calls" and required.message.content is None
    for call in required.message.tool_calls or []:
        assert call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")  # type: ignore[union-attr]
        json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert required.message.tool_calls
    named = client.chat.completions.create(
        model=model,
        messages=WEATHER_Q,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
    ).choices[0]
    [call] = named.message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}  # type: ignore[union-attr]
    auto = client.chat.completions.create(
        model=model,
        messages=WEATHER_Q,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        max_tokens=60,
        temperature=0,
        extra_body={"structured_outputs": {"regex": HERMES_CALL}},
    ).choices[0]
    assert auto.finish_reason == "tool_calls" and auto.message.content == "I will check."
    [call] = auto.message.tool_calls or []
    assert call.function.name == "get_time"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")  # type: ignore[union-attr]


def test_logprobs_and_logit_bias(served: ServedApp, model: str) -> None:
    client = sdk(served)
    kw: dict[str, Any] = dict(model=model, messages=QUESTION, max_tokens=8, temperature=0)
    r = client.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    content = choice.logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == r.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the top-1
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-3)
        ranked = [x.logprob for x in t.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
    # logit_bias: the greedy first token banned, another comes first.
    first_id = token_id(content[0].token)
    banned = client.chat.completions.create(**kw, logprobs=True, logit_bias={str(first_id): -100})
    assert banned.choices[0].logprobs.content[0].token != content[0].token  # type: ignore[index,union-attr]
    # A large bias forces a token at every step.
    forced = client.chat.completions.create(
        **{**kw, "max_tokens": 4}, logit_bias={str(first_id): 100}
    )
    assert forced.choices[0].message.content == content[0].token * 4


@functools.cache
def tokenizer() -> Any:
    """SmolLM2's tokenizer, as both engines tokenize (the same files)."""
    from transformers import AutoTokenizer

    from voltage_ray.backends.sources import materialize_tokenizer
    from voltage_ray.config import GGUFSource

    return AutoTokenizer.from_pretrained(materialize_tokenizer(GGUFSource(gguf=SMOL), CACHE_DIR))


def token_id(text: str) -> int:
    [token] = tokenizer().encode(text, add_special_tokens=False)
    return int(token)


def test_completions_echo_and_prompt_logprobs(served: ServedApp, model: str) -> None:
    client = sdk(served)
    prompt = "The three primary colours are"
    scored = client.completions.create(
        model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=2
    )
    (choice,) = scored.choices
    lp = choice.logprobs
    assert choice.text == prompt and lp is not None and lp.tokens is not None
    assert "".join(lp.tokens) == prompt
    assert lp.token_logprobs is not None and lp.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.top_logprobs is not None and lp.top_logprobs[0] is None
    for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:], strict=True):
        assert top is not None and token in top and len(top) <= 3
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    more = client.completions.create(
        model=model, prompt=prompt, max_tokens=5, echo=True, logprobs=1, temperature=0
    )
    mlp = more.choices[0].logprobs
    assert mlp is not None and mlp.tokens is not None and mlp.token_logprobs is not None
    assert more.choices[0].text.startswith(prompt) and mlp.tokens[: len(lp.tokens)] == lp.tokens
    assert len(mlp.tokens) == len(lp.tokens) + more.usage.completion_tokens  # type: ignore[union-attr]
    for a, b in zip(mlp.token_logprobs[1 : len(lp.tokens)], lp.token_logprobs[1:], strict=True):
        assert abs(a - b) < 1e-3  # type: ignore[operator]
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0)
    assert more.choices[0].text == prompt + plain.choices[0].text


def test_metering_is_exact(served: ServedApp, model: str) -> None:
    metered = served.new_key("metered")
    client = sdk(served, metered)
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=10, n=2)
    assert r.usage is not None
    stream = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = list(stream)[-1].usage
    assert usage is not None
    done = client.completions.create(model=model, prompt="One, two,", max_tokens=5)
    assert done.usage is not None
    total = r.usage.total_tokens + usage.total_tokens + done.usage.total_tokens
    assert settled(metered)["limits"]["tokens"]["used"] == total


async def test_a_client_that_hangs_up_cancels_its_generation(served: ServedApp, model: str) -> None:
    from ray import serve

    handle = serve.get_deployment_handle(f"chat-{model}", app_name="voltage-vllm")
    before = (await handle.info.remote())["cancelled"]
    body = {
        "model": model,
        "messages": QUESTION,
        "max_tokens": 400,
        "stream": True,
        "temperature": 0,
        "logit_bias": NO_END,
    }
    async with (
        httpx.AsyncClient(base_url=served.base_url, timeout=60) as c,
        c.stream("POST", "/v1/chat/completions", json=body, headers=served.headers()) as r,
    ):
        n = 0
        async for _ in r.aiter_lines():
            n += 1
            if n > 3:
                break
    info = await wait_info(handle, lambda i: i["cancelled"] > before and not i["active"])
    assert info["cancelled"] > before and info["active"] == 0
    if model == "smol-vllm":  # vLLM aborted it: no request left in the engine
        assert info["running"] == 0 and info["requests"] == 0


async def wait_info(handle: Any, done: Any, timeout_s: float = 15) -> dict[str, Any]:
    """The replica's info() once ``done(info)`` holds, or at the timeout."""
    deadline = time.monotonic() + timeout_s
    info = await handle.info.remote()
    while not done(info) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        info = await handle.info.remote()
    return dict(info)


async def test_a_request_past_its_deadline_is_a_504_and_frees_the_engine(
    served: ServedApp, model: str
) -> None:
    from ray import serve

    key = served.new_key("metered")
    body = {
        "model": model,
        "messages": QUESTION,
        "max_tokens": 4000,  # far past the deadline on a CPU (EOS banned)
        "temperature": 0,
        "logit_bias": NO_END,
    }
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=served.base_url, timeout=120) as c:
        r = await c.post("/v1/chat/completions", json=body, headers=served.headers(key))
    took = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert CHAT_TIMEOUT_S - 1 < took < CHAT_TIMEOUT_S + 10
    usage = settled(key)["limits"]  # the reservation released
    assert usage["in_flight"]["used"] == 0 and usage["tokens"]["reserved"] == 0
    handle = serve.get_deployment_handle(f"chat-{model}", app_name="voltage-vllm")
    info = await wait_info(handle, lambda i: not i["active"] and not i.get("requests"))
    assert info["active"] == 0
    if model == "smol-vllm":
        assert info["running"] == 0 and info["requests"] == 0


async def test_a_higher_priority_plan_goes_first(served: ServedApp, model: str) -> None:
    """Four rows (max_num_seqs) held by a low-priority key; then another low request and, after
    it, a high-priority one: the high one's first token comes first. vLLM: the plan's priority
    is the request's (negated) in its priority scheduler, which gives the high request the
    first free row; llama.cpp: a row past max_num_seqs (headroom) or a paused low row."""
    low, high = served.new_key("low"), served.new_key("high")
    url = served.base_url + "/v1/chat/completions"

    async def first_token_at(
        c: httpx.AsyncClient, key: str, max_tokens: int, started: asyncio.Event | None = None
    ) -> float:
        body = {
            "model": model,
            "messages": QUESTION,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "logit_bias": NO_END,
        }
        at = 0.0
        async with c.stream("POST", url, json=body, headers=served.headers(key)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not at and '"content":"' in line.replace(": ", ":"):
                    at = time.monotonic()
                    if started is not None:
                        started.set()
        return at

    async with httpx.AsyncClient(timeout=60) as c:
        # The shortest holder frees the first row a few seconds after the two requests below.
        running = [asyncio.Event() for _ in range(4)]
        holding = [
            asyncio.create_task(first_token_at(c, low, n, e))
            for n, e in zip((60, 150, 150, 150), running, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in running)), 60)
        waiting = asyncio.create_task(first_token_at(c, low, 4))
        await asyncio.sleep(0.3)
        urgent = asyncio.create_task(first_token_at(c, high, 4))
        times = await asyncio.gather(waiting, urgent, *holding)
    assert 0 < times[1] < times[0], times
