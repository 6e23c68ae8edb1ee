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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from voltage_ray.config import ChatSettings
from voltage_ray.errors import BadRequest

logger = logging.getLogger(__name__)

FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Prepared:
    """A validated chat request, tokenized, with its token budget resolved."""

    input_ids: list[int]
    max_tokens: int
    n: int
    temperature: float
    top_p: float
    presence_penalty: float
    frequency_penalty: float
    stop: list[str]
    seed: int | None

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class StepEvent:
    """What one choice produced in one step: new text and, at its end, why it finished."""

    index: int
    text: str
    finish_reason: str | None = None
    tokens: int = 0  # tokens this choice has used so far


def _held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


@dataclass
class RowDecoder:
    """Incremental detokenization and termination for one choice."""

    decode: Callable[[list[int]], str]
    stop: list[str]
    max_tokens: int
    eos_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0
    finish_reason: str | None = None

    def push(self, token: int) -> str:
        """Consume one token; return the text that is now safe to show."""
        if self.finish_reason is not None:
            return ""
        self.tokens.append(token)
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self._flush(self.decode(self.tokens[:-1]))
        text = self.decode(self.tokens)
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

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def prepare(self, request: Any) -> Prepared:
        """Apply the chat template and resolve max_tokens; raise BadRequest past the context."""
        messages = []
        for m in request.messages:
            entry = {"role": m.role, "content": m.text}
            if m.name:
                entry["name"] = m.name
            messages.append(entry)
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        input_ids = [int(t) for t in ids]
        prompt = len(input_ids)
        requested = request.requested_max_tokens
        room = self.context_length - prompt
        if requested is None:
            max_tokens = min(self.default_max_tokens, room)
            if max_tokens < 1:
                raise BadRequest(
                    f"This model's maximum context length is {self.context_length} tokens; "
                    f"the messages use {prompt} tokens, leaving no room for a completion."
                )
        else:
            if prompt + requested > self.context_length:
                raise BadRequest(
                    f"This model's maximum context length is {self.context_length} tokens. "
                    f"However, you requested {prompt + requested} tokens ({prompt} in the "
                    f"messages, {requested} in the completion). Please reduce the length of "
                    "the messages or max_tokens."
                )
            max_tokens = requested
        return Prepared(
            input_ids=input_ids,
            max_tokens=max_tokens,
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            stop=request.stop_list,
            seed=request.seed,
        )

    def decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))


class ChatEngine(Prompter):
    """A causal LM with its tokenizer side, loaded from a directory or hub id (transformers)."""

    def __init__(self, location: str, settings: ChatSettings, device: str | None = None) -> None:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = settings.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        self.model = AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        super().__init__(location, settings, self.model)
