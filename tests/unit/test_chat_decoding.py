from __future__ import annotations

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
