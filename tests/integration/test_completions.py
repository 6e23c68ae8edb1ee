"""Legacy text completions (`POST /completions`) end to end: the OpenAI SDK and plain HTTP
against the session's app, on SmolLM2 (llama.cpp engine) and the tiny model (transformers)."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import ServedApp
from tests.integration.test_limits import assert_error, settled

PROMPT = "The three primary colours are"
ENDPOINT = "/v1/completions"


def assert_refused(r: httpx.Response, status: int, words: str, endpoint: str = ENDPOINT) -> None:
    """An error in the spec's shape whose message holds ``words``."""
    assert r.status_code == status, r.text
    body = r.json()
    assert words in body["error"], body
    assert body["details"]["status"] == status and body["details"]["endpoint"] == endpoint


def sdk(served: ServedApp, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key=key or served.key, max_retries=0)


@pytest.mark.parametrize("model", ["smol", "tiny-chat"])
def test_json_and_stream_agree_on_both_engines(served: ServedApp, model: str) -> None:
    client = sdk(served)
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    (choice,) = whole.choices
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert choice.text and choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 12
    stream = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.model_dump(exclude={"prompt_tokens_details"}) == whole.usage.model_dump(
        exclude={"prompt_tokens_details"}
    )
    # The same prompt again: llama.cpp's slot kept its cells, all but the last token reused
    # (the transformers engine keeps none).
    cached = usage.prompt_tokens - 1 if model == "smol" else 0
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == cached
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_default_max_tokens_is_openais_16(served: ServedApp) -> None:
    r = sdk(served).completions.create(
        model="smol", prompt="Count: one, two, three,", temperature=0
    )
    assert r.usage is not None and r.usage.completion_tokens <= 16
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 16


def test_prompts_and_n_give_choices_prompt_by_prompt(served: ServedApp) -> None:
    client = sdk(served)
    kw: dict[str, Any] = dict(model="smol", max_tokens=6, temperature=0.8, seed=7)
    both = client.completions.create(prompt=["Once upon a time", "The weather today"], n=2, **kw)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    # Each prompt's choices are as that prompt asked alone (a seed gives every choice its own
    # generator), and the usage counts each prompt once and every choice's tokens.
    first = client.completions.create(prompt="Once upon a time", n=2, **kw)
    assert [c.text for c in both.choices[:2]] == [c.text for c in first.choices]
    assert both.usage is not None and first.usage is not None
    assert both.usage.prompt_tokens > first.usage.prompt_tokens


def test_token_id_prompts_equal_their_text(served: ServedApp, smol_tokenizer: Any) -> None:
    client = sdk(served)
    ids = smol_tokenizer.encode(PROMPT)
    kw: dict[str, Any] = dict(model="smol", max_tokens=8, temperature=0)
    as_text = client.completions.create(prompt=PROMPT, **kw)
    as_ids = client.completions.create(prompt=ids, **kw)
    as_lists = client.completions.create(prompt=[ids, ids], **kw)
    assert as_ids.choices[0].text == as_text.choices[0].text
    assert [c.text for c in as_lists.choices] == [as_text.choices[0].text] * 2
    assert as_ids.usage is not None and as_ids.usage.prompt_tokens == len(ids)


def test_echo_and_logprobs_score_the_prompt(served: ServedApp, smol_tokenizer: Any) -> None:
    client = sdk(served)
    scored = client.completions.create(
        model="smol", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2
    )
    (choice,) = scored.choices
    lp = choice.logprobs
    assert choice.text == PROMPT and lp is not None and lp.tokens is not None
    assert "".join(lp.tokens) == PROMPT and len(lp.tokens) == len(smol_tokenizer.encode(PROMPT))
    assert lp.token_logprobs is not None and lp.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.top_logprobs is not None and lp.top_logprobs[0] is None
    for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:], strict=True):
        assert top is not None and token in top and len(top) <= 3  # 2 alternatives + the token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert scored.usage is not None and scored.usage.completion_tokens == 0

    # Generating after the echo: the prompt's scores, then the new tokens', offsets running on.
    more = client.completions.create(
        model="smol", prompt=PROMPT, max_tokens=5, echo=True, logprobs=1, temperature=0
    )
    mlp = more.choices[0].logprobs
    assert mlp is not None and mlp.tokens is not None and mlp.token_logprobs is not None
    assert more.choices[0].text.startswith(PROMPT)
    assert mlp.tokens[: len(lp.tokens)] == lp.tokens
    assert len(mlp.tokens) == len(lp.tokens) + more.usage.completion_tokens  # type: ignore[union-attr]
    for a, b in zip(mlp.token_logprobs[1 : len(lp.tokens)], lp.token_logprobs[1:], strict=True):
        assert abs(a - b) < 1e-3  # type: ignore[operator]


def test_stop_sequences(served: ServedApp) -> None:
    r = sdk(served).completions.create(
        model="smol", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"]
    )
    assert r.choices[0].finish_reason == "stop" and "7" not in r.choices[0].text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"prompt": [49152 * 2]}, "prompt"),  # past SmolLM2's vocabulary
        ({"max_tokens": 0}, "max_tokens"),  # without echo: nothing to answer
        ({"logprobs": 6}, "logprobs"),
        ({"prompt": ["a", 1]}, "prompt"),
        ({"max_tokens": 9000}, "context length"),  # SmolLM2: 8192
    ],
)
def test_bad_requests_name_the_field(served: ServedApp, extra: dict[str, Any], param: str) -> None:
    body = {"model": "smol", "prompt": "hi", **extra}
    with served.client(headers=served.headers()) as c:
        r = c.post("/api/voltage/v1/completions", json=body)
    assert_refused(r, 400, param, "/api/voltage/v1/completions")


def test_limits_and_metering_as_for_chat(served: ServedApp) -> None:
    metered = served.new_key("limits_metered")
    client = sdk(served, metered)
    r = client.completions.with_raw_response.create(model="smol", prompt=PROMPT, max_tokens=4)
    body = r.parse()
    assert r.headers["x-ratelimit-limit-tokens"] == "1000000"
    assert body.usage is not None
    assert settled(metered)["limits"]["tokens"]["used"] == body.usage.total_tokens

    five = served.new_key("limits_five")
    with served.client(headers=served.headers(five)) as c:
        codes = [
            c.post("/v1/completions", json={"model": "smol", "prompt": "a", "max_tokens": 1})
            for _ in range(6)
        ]
    assert [x.status_code for x in codes[:5]] == [200] * 5
    assert_error(codes[5], 429, "Rate limit exceeded", "/v1/completions")

    quota = served.new_key("limits_tokens")  # 200 tokens a month
    with served.client(headers=served.headers(quota)) as c:
        over = c.post("/v1/completions", json={"model": "smol", "prompt": "a", "max_tokens": 500})
    assert_error(over, 403, "Quota exceeded", "/v1/completions")


def test_unknown_model_and_embeddings_model_are_404(served: ServedApp) -> None:
    with served.client(headers=served.headers()) as c:
        for model in ("nope", "all-MiniLM-L6-v2"):
            r = c.post("/v1/completions", json={"model": model, "prompt": "a"})
            assert_refused(r, 404, model)


def test_both_prefixes_serve_it(served: ServedApp) -> None:
    with httpx.Client(base_url=served.base_url, headers=served.headers(), timeout=60) as c:
        body = {"model": "smol", "prompt": "a", "max_tokens": 1}
        assert c.post("/v1/completions", json=body).status_code == 200
        assert c.post("/api/voltage/v1/completions", json=body).status_code == 200
