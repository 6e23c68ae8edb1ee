"""Tiny random-weight models built offline and deterministically.

They load through exactly the code path of real models (``from_pretrained`` on a directory), so
tests exercise the real serving code without any download. Their output is noise by design.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = [
    "the",
    "a",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "hello",
    "world",
    "model",
    "serve",
    "ray",
    "batch",
    "token",
    "stream",
    "chat",
    "image",
    "embed",
    "vector",
    "sunset",
    "mountain",
    "city",
    "future",
    "car",
    "story",
    "tell",
    "me",
    "you",
    "are",
    "helpful",
    "assistant",
    "what",
    "is",
    "capital",
    "france",
    "paris",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
]


def _corpus() -> list[str]:
    # A fixed pseudo-random corpus: deterministic without any RNG state.
    lines = []
    for i in range(400):
        words = [_WORDS[(i * 7 + j * 13 + (i * j) % 5) % len(_WORDS)] for j in range(12)]
        lines.append(" ".join(words) + f" {i}.")
    return lines


def build_tiny_llama(out_dir: Path) -> None:
    """A BPE tokenizer trained on a fixed corpus and a 2-layer Llama with seeded random weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=512,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out_dir))

    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir))


@dataclass(frozen=True)
class Builder:
    dirname: str
    build: Callable[[Path], None]


BUILDERS: dict[str, Builder] = {
    "tiny-llama": Builder("tiny-llama-v1", build_tiny_llama),
}
