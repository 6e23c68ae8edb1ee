"""Structured outputs: a request's JSON schema, compiled into one token mask per step.

A :class:`Constraint` is engine-neutral: the JSON schema a choice's text must match (``json_object``
is ``{"type": "object"}``; forced tool calls are the schema of the calls). The CPU engines enforce
it with :class:`Grammars` (llguidance): each constrained row holds its own matcher, which fills
that row's token bitmask before sampling and consumes the sampled token after; the vLLM engine
hands the same schema to vLLM's own structured outputs.

Why llguidance (measured in ``benchmarks/grammar.py``, SmolLM2's 49,152-token vocabulary, 2 cores):
a typical schema compiles cold in ~1 ms (xgrammar: ~2-6 ms), a cached one is a ~11 us matcher
copy, and a mask takes ~17 us p50 (xgrammar ~4 us; both are nothing beside a ~50 ms CPU decode
step). It ships as one 8 MB wheel with no dependencies, where xgrammar pulls triton (~1 GB) into
a CPU install; it covers more of JSON Schema (string lengths, patterns, formats) and names what it
does not support, which becomes the 400. Compiling drops the GIL, and it happens in the replica's
``prepare`` call, off the scheduler thread, so a cold compile never stalls other rows' decoding.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

from voltage_ray.errors import BadRequest

ConstraintKind = Literal["json_schema", "json_object", "tool_calls", "regex", "lark", "choice"]
# Compact JSON with the separators json.dumps (and xgrammar, vLLM's default) writes: no freedom
# in whitespace, so a model cannot wander off into endless blanks.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256


@dataclass(frozen=True)
class Constraint:
    """What a choice's text must be: JSON matching a schema (the JSON kinds), a regular
    expression, or one of some strings. ``spec`` is the schema as compact JSON in the client's
    key order (properties come out in that order), the regex, the Lark grammar, or the choices as
    a JSON list."""

    kind: ConstraintKind
    spec: str
    what: str  # names the request field in error messages

    @classmethod
    def of(cls, kind: ConstraintKind, schema: dict[str, Any], what: str) -> Constraint:
        return cls(kind, json.dumps(schema, separators=(",", ":")), what)

    @classmethod
    def regex(cls, pattern: str, what: str) -> Constraint:
        return cls("regex", pattern, what)

    @classmethod
    def lark(cls, grammar: str, what: str) -> Constraint:
        """Text matching a Lark grammar (llguidance's dialect: a custom tool's ``grammar``)."""
        return cls("lark", grammar, what)

    @classmethod
    def choice(cls, options: list[str], what: str) -> Constraint:
        return cls("choice", json.dumps(options, ensure_ascii=False), what)

    @property
    def schema_dict(self) -> dict[str, Any]:
        return dict(json.loads(self.spec))

    @property
    def choices(self) -> list[str]:
        return list(json.loads(self.spec))

    def grammar(self) -> str:
        """The llguidance grammar of this constraint (a ValueError for malformed JSON)."""
        from llguidance import LLMatcher

        if self.kind == "regex":
            return str(LLMatcher.grammar_from_regex(self.spec))
        if self.kind == "lark":
            return str(LLMatcher.grammar_from_lark(self.spec))
        if self.kind == "choice":
            options = " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choices)
            return str(LLMatcher.grammar_from_lark(f"start: {options}"))
        return str(LLMatcher.grammar_from_json_schema(self.spec, defaults=cast(Any, JSON_OPTIONS)))


class Grammars:
    """llguidance grammars for one tokenizer: compiled once per constraint (LRU), a matcher per
    constrained row. Safe to call from several threads."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> None:
        import llguidance.hf

        self.vocab_size = vocab_size
        self.eos_ids = eos_ids  # what a finished grammar allows (and nothing else)
        self._tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids)
        )
        self._special = {int(i): t for t, i in tokenizer.get_added_vocab().items()}
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._bytes: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def compile(self, constraint: Constraint) -> Any:
        """The compiled matcher of ``constraint`` (cached); a BadRequest naming what is wrong."""
        key = (constraint.kind, constraint.spec)
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                return template
        from llguidance import LLMatcher

        try:
            grammar = constraint.grammar()
        except ValueError as exc:
            raise BadRequest(f"{constraint.what} is not valid: {exc}") from None
        template = LLMatcher(self._tokenizer, grammar, log_level=0)
        if template.is_error():
            raise BadRequest(
                f"{constraint.what} cannot be enforced: {_readable(template.get_error())}",
                details={"param": constraint.what},
            )
        with self._lock:
            self._cache[key] = template
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return template

    def matcher(self, constraint: Constraint) -> RowGrammar:
        """A fresh matcher for one row (a copy of the compiled one)."""
        return RowGrammar(self.compile(constraint).deep_copy(), self.vocab_size)

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens: their text)."""
        found = self._bytes.get(token)
        if found is None:
            special = self._special.get(token)
            found = (
                special.encode() if special is not None else self._tokenizer.decode_bytes([token])
            )
            self._bytes[token] = found
        return found

    def cached(self) -> int:
        return len(self._cache)


class RowGrammar:
    """One row's matcher: the tokens allowed next, and the token it took."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.error: str | None = None  # why the matcher gave up mid-way (e.g. a lexer too complex)

    def allowed(self) -> np.ndarray:
        """A bool array [vocab]: which tokens may come next (only EOS once the JSON is whole)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)

    def consume(self, token: int) -> None:
        """Take the sampled token. A matcher that fails here (llguidance builds its lexer lazily,
        so a huge regex or pattern can exceed its limits only now) records why in ``error``
        instead of raising: the scheduler fails that request alone, with a 400."""
        if not self._matcher.consume_token(token) and self.error is None:
            self.error = _readable(self._matcher.get_error() or "the grammar stopped")

    @property
    def done(self) -> bool:
        return bool(self._matcher.is_stopped())


def _readable(error: str) -> str:
    """llguidance's message without its internal prefixes."""
    return " ".join(error.removeprefix("Error: ").split())[:500]
