"""A chat model with transformers: loading, the chat template, token budgets, stop strings.

:class:`Prompter` turns a request into a :class:`Prepared` token prompt (the same for every
engine); :class:`ChatEngine` adds the transformers model, which the batch scheduler
(``backends/batching.py``) runs. Each generated token of a
choice goes to that choice's :class:`RowDecoder`, which turns tokens into text deltas, holds back
text that may still become a stop string, and decides when the choice is finished, so text and
termination never disagree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from voltage_ray.backends import chat_template
from voltage_ray.backends.chat_template import Turn
from voltage_ray.backends.grammar import Constraint, Grammars
from voltage_ray.config import ChatSettings
from voltage_ray.errors import BadRequest

# OpenAI's error code for a prompt (plus max_tokens) over the model's context, as chat and the
# Responses API report it (clients such as Codex recognise it).
TOO_LONG = {"code": "context_length_exceeded", "param": "messages"}

logger = logging.getLogger(__name__)

FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Asks:
    """What a request asks of its tokens, engine-neutral: the backends read this, never the
    protocol's request models (``deployments/asks.py`` makes it from a chat or completions
    request). ``max_tokens`` None: the model's default, within its context."""

    n: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logit_bias: Mapping[str, float] | None = None  # token id (as OpenAI's JSON key) -> bias
    logprobs: int | None = None  # None: none; k: the chosen token and its k top alternatives
    prompt_logprobs: int | None = None  # legacy completions' echo + logprobs
    constraint: Constraint | None = None  # what the output must be (grammar, schema, tools)


@dataclass
class Prepared:
    """A validated chat request, tokenized, with its token budget resolved: everything it asks
    of its tokens, engine-neutral. The CPU engines honour it in one sampler
    (``backends/sampler.py``), the vLLM engine maps it onto vLLM's own parameters."""

    input_ids: list[int]
    max_tokens: int
    n: int
    temperature: float
    top_p: float
    presence_penalty: float
    frequency_penalty: float
    stop: list[str]
    seed: int | None
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k: the chosen token and its k top alternatives
    constraint: Constraint | None = None  # the JSON the output must be
    # None: none; k: each prompt token's logprob (after the first) and its k top alternatives,
    # sent as a PromptScored item before the first step (legacy completions' echo + logprobs).
    prompt_logprobs: int | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log probability and its most likely alternatives (token, logprob),
    from the model's distribution within the constraint (before logit_bias, penalties,
    temperature and top_p)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class PromptScored:
    """The prompt's logprobs, before a generation's first step: None for the first token (it has
    no context), then each token as the model scored it."""

    tokens: list[int]
    logprobs: list[TokenLogprobs | None]


@dataclass(frozen=True)
class Finished:
    """The last item of a generation: tokens used by each choice, and how many prompt tokens
    the engine took from its prefix cache instead of computing them."""

    tokens: list[int]
    cached_tokens: int = 0


@dataclass
class StepEvent:
    """What one choice produced in one step: new text, the logprobs of the tokens behind it (when
    asked; text held back for stop strings comes later than its tokens' logprobs) and, at its
    end, why it finished."""

    index: int
    text: str
    finish_reason: str | None = None
    tokens: int = 0  # tokens this choice has used so far
    logprobs: list[TokenLogprobs] = field(default_factory=list)


def _held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


# Tokens decoded ahead of the read offset as context (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_
# OFFSET): decoders that strip a leading space, or merge bytes, see the same neighbours as in
# the whole text.
DECODE_CONTEXT = 5


@dataclass
class RowDecoder:
    """Incremental detokenization and termination for one choice.

    Each token decodes a window of a few tokens, not the whole answer (which made a token's
    cost grow with the answer: 25% of the scheduler thread's time at 128 tokens): the text of
    ``tokens[prefix:]`` minus that of ``tokens[prefix:read]`` is what the new tokens add, as
    vLLM's and TGI's detokenizers do. Text ending in an incomplete UTF-8 character (U+FFFD)
    waits for the next token.
    """

    decode: Callable[[list[int]], str]
    stop: list[str]
    max_tokens: int
    eos_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0
    finish_reason: str | None = None
    text: str = ""  # the text of tokens[:read]
    prefix: int = 0  # tokens[prefix:read]: the decoding context of the next tokens
    read: int = 0

    def push(self, token: int) -> str:
        """Consume one token; return the text that is now safe to show."""
        if self.finish_reason is not None:
            return ""
        self.tokens.append(token)
        if token in self.eos_ids:
            self.finish_reason = "stop"
            pending = self._pending(len(self.tokens) - 1)  # (may move text on: call first)
            return self._flush(self.text + pending)
        pending = self._pending(len(self.tokens))
        text = self.text + pending
        for stop in self.stop:
            pos = text.find(stop, max(0, self.emitted - len(stop) + 1))
            if pos != -1:
                self.finish_reason = "stop"
                return self._flush(text[:pos])
        if len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
            return self._flush(text)
        safe = len(text) - _held_suffix(text, self.stop)
        while safe > self.emitted and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 char
            safe -= 1
        return self._flush(text[:safe])

    def _pending(self, end: int) -> str:
        """The text ``tokens[read:end]`` add; once it ends in a whole character it joins
        ``text`` and the window moves on."""
        if end <= self.read:
            return ""
        before = (
            self.decode(self.tokens[self.prefix : self.read]) if self.read > self.prefix else ""
        )
        after = self.decode(self.tokens[self.prefix : end])
        if not after.startswith(before):  # a decoder that rewrites its context: the whole text
            before, after = self.text, self.decode(self.tokens[:end])
        added = after[len(before) :]
        if added and not added.endswith("\ufffd"):
            self.text += added
            self.prefix, self.read = max(self.prefix, end - DECODE_CONTEXT), end
            return ""
        return added

    def _flush(self, text: str) -> str:
        # A stop string found inside already-emitted text cannot be unsent; clamp instead.
        delta = text[self.emitted :]
        self.emitted = max(self.emitted, len(text))
        return delta


class Prompter:
    """A chat model's tokenizer side: chat template, context length, end-of-sequence ids.

    Every engine turns requests into token prompts here, so prompt token counts, the context
    check and stop handling are the same whichever engine generates.
    """

    def __init__(self, location: str, settings: ChatSettings, model: Any = None) -> None:
        """``model``: the loaded transformers model, whose configs are then not read again."""
        self.tokenizer = AutoTokenizer.from_pretrained(location)
        # transformers' decode of a fast tokenizer is the Rust one's plus an optional clean-up
        # of spaces; without the clean-up, call the Rust one (a third of the per-token cost).
        backend = getattr(self.tokenizer, "_tokenizer", None)
        self._decode_ids = (
            backend.decode
            if backend is not None
            and not getattr(self.tokenizer, "clean_up_tokenization_spaces", True)
            else None
        )
        if not self.tokenizer.chat_template:
            self.tokenizer.chat_template = FALLBACK_TEMPLATE
        config = model.config if model is not None else AutoConfig.from_pretrained(location)
        config_ctx = getattr(config, "max_position_embeddings", None) or 2048
        self.context_length = settings.max_context or settings.max_model_len or int(config_ctx)
        self.default_max_tokens = settings.default_max_tokens
        if model is not None:
            eos = model.generation_config.eos_token_id
        else:
            try:
                eos = GenerationConfig.from_pretrained(location).eos_token_id
            except OSError:  # no generation_config.json: the model config's
                eos = getattr(config, "eos_token_id", None)
        eos_list = eos if isinstance(eos, list) else [eos]
        if self.tokenizer.eos_token_id is not None:
            eos_list.append(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(int(e) for e in eos_list if e is not None)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(self.eos_ids)
        self.vocab_size = max(int(getattr(config, "vocab_size", 0) or 0), len(self.tokenizer))
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids)
        self.max_choices: int | None = None  # an engine's cap on n (llama.cpp: its KV slots)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def prepare(
        self, messages: Sequence[Turn], tools: Sequence[dict[str, Any]], asks: Asks
    ) -> Prepared:
        """Render the messages (and tools), resolve max_tokens and what the request asks of its
        tokens; a BadRequest past the context, for a token id outside the vocabulary, or for a
        schema that cannot be enforced (compiled here, so the engine finds it cached)."""
        self._check_choices(asks.n)
        input_ids = chat_template.render(self.tokenizer, messages, tools)
        max_tokens = self._max_tokens(len(input_ids), asks.max_tokens)
        if asks.constraint is not None:
            self.grammars.compile(asks.constraint)
        return self._prepared(input_ids, max_tokens, asks)

    def prepare_text(self, prompt: str | list[int], asks: Asks) -> Prepared:
        """A raw prompt (legacy completions: text or token ids, no chat template) with the
        request's sampling; BadRequest for ids outside the vocabulary or past the context.
        ``asks.max_tokens`` 0: the prompt alone (scored, with ``prompt_logprobs``)."""
        self._check_choices(asks.n)
        if isinstance(prompt, str):
            input_ids = [int(t) for t in self.tokenizer.encode(prompt)]
        else:
            outside = sorted(t for t in prompt if t >= self.vocab_size)
            if outside:
                raise BadRequest(
                    f"prompt: token id {outside[0]} is outside this model's vocabulary "
                    f"(0 to {self.vocab_size - 1})",
                    details={"param": "prompt"},
                )
            input_ids = list(prompt)
        if not input_ids:
            raise BadRequest("prompt is empty once tokenized", details={"param": "prompt"})
        max_tokens = asks.max_tokens or 0
        if max_tokens:
            max_tokens = self._max_tokens(len(input_ids), max_tokens)
        elif len(input_ids) > self.context_length:
            raise BadRequest(
                f"This model's maximum context length is {self.context_length} tokens; the "
                f"prompt has {len(input_ids)}.",
                details={**TOO_LONG, "prompt_tokens": len(input_ids)},
            )
        return self._prepared(input_ids, max_tokens, asks)

    def _prepared(self, input_ids: list[int], max_tokens: int, asks: Asks) -> Prepared:
        return Prepared(
            input_ids=input_ids,
            max_tokens=max_tokens,
            n=asks.n,
            temperature=asks.temperature,
            top_p=asks.top_p,
            presence_penalty=asks.presence_penalty,
            frequency_penalty=asks.frequency_penalty,
            stop=list(asks.stop),
            seed=asks.seed,
            logit_bias=self._logit_bias(asks.logit_bias),
            logprobs=asks.logprobs,
            constraint=asks.constraint,
            prompt_logprobs=asks.prompt_logprobs,
        )

    def _check_choices(self, n: int) -> None:
        if self.max_choices is not None and n > self.max_choices:
            raise BadRequest(
                f"n is {n}; this model's engine runs at most {self.max_choices} choices of a "
                "request at once (its max_num_seqs)",
                details={"param": "n", "limit": self.max_choices},
            )

    def _max_tokens(self, prompt: int, requested: int | None) -> int:
        room = self.context_length - prompt
        if requested is None:
            if room < 1:
                raise BadRequest(
                    f"This model's maximum context length is {self.context_length} tokens; "
                    f"the messages use {prompt} tokens, leaving no room for a completion.",
                    details={**TOO_LONG, "prompt_tokens": prompt},
                )
            return min(self.default_max_tokens, room)
        if prompt + requested > self.context_length:
            raise BadRequest(
                f"This model's maximum context length is {self.context_length} tokens. "
                f"However, you requested {prompt + requested} tokens ({prompt} in the "
                f"messages, {requested} in the completion). Please reduce the length of "
                "the messages or max_tokens.",
                details={**TOO_LONG, "prompt_tokens": prompt},
            )
        return requested

    def _logit_bias(self, bias: Mapping[str, float] | None) -> dict[int, float]:
        out = {int(k): float(v) for k, v in (bias or {}).items()}
        outside = sorted(t for t in out if t >= self.vocab_size)
        if outside:
            raise BadRequest(
                f"logit_bias: token id {outside[0]} is outside this model's vocabulary "
                f"(0 to {self.vocab_size - 1})",
                details={"param": "logit_bias"},
            )
        return out

    def token_bytes(self, token: int) -> bytes:
        return self.grammars.token_bytes(token)

    def decode(self, tokens: list[int]) -> str:
        if self._decode_ids is not None:  # the Rust tokenizer, without transformers' wrapper
            return str(self._decode_ids(tokens, skip_special_tokens=True))
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matmuls in hardware. There ``benchmarks/cpu_dtype.py``
    measured SmolLM2-135M at 1.49x float32's tokens/s for one stream and 1.57x at 8 (2 cores,
    AVX512-BF16); without them torch emulates bf16 and float32 is the safe choice."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


class ChatEngine(Prompter):
    """A causal LM with its tokenizer side, loaded from a directory or hub id (transformers)."""

    def __init__(self, location: str, settings: ChatSettings, device: str | None = None) -> None:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = settings.dtype
        if dtype == "auto":
            native = self.device.startswith("cuda") or cpu_has_native_bf16()
            dtype = "bfloat16" if native else "float32"
        self.model = AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        super().__init__(location, settings, self.model)
