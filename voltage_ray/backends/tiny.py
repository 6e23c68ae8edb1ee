"""Tiny random-weight models built offline and deterministically.

They load through exactly the code path of real models (``from_pretrained`` on a directory), so
tests exercise the real serving code without any download. Their output is noise by design.
"""

from __future__ import annotations

import itertools
from collections import Counter
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


def _learn_merges(words: Counter[tuple[str, ...]], count: int) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first, ties by the pair itself: deterministic
    (the tokenizers trainer breaks ties in hash order, so its merges vary from run to run)."""
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += n
        if not pairs:
            break
        a, b = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append((a, b))
        merged: Counter[tuple[str, ...]] = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def _tiny_clip_tokenizer() -> object:
    """A CLIP tokenizer (byte-level BPE, ``</w>`` word ends) with merges learned on the corpus.

    Every byte, alone and word-final, is in the vocabulary, so any prompt tokenizes.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    reference = CLIPTokenizer().backend_tokenizer  # CLIP's normalizer and pre-tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    for line in _corpus():
        normalized = reference.normalizer.normalize_str(line)
        for word, _ in reference.pre_tokenizer.pre_tokenize_str(normalized):
            words[(*word[:-1], word[-1] + "</w>")] += 1
    merges = _learn_merges(words, 500)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {bos: 0, eos: 1}
    for token in [*alphabet, *(ch + "</w>" for ch in alphabet), *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    # The merges are pairs: the annotation says strings, the BPE model takes tuples.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]


def build_tiny_sd(out_dir: Path) -> None:
    """A Stable Diffusion pipeline (CLIP text encoder, UNet, VAE, DDIM) with seeded random weights.

    Shaped like SD 1.x (4 latent channels, VAE scale factor 8, cross-attention on text) but tiny:
    attention only at 1/64 of the image side and no attention in the VAE, so every spec size up to
    1792x1024 runs in seconds on a CPU. The images are noise.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tiny_clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),  # type: ignore[arg-type]
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    torch.manual_seed(2)
    vae = AutoencoderKL(
        block_out_channels=(4, 8, 8, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=256,
        mid_block_add_attention=False,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out_dir))  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Builder:
    dirname: str
    build: Callable[[Path], None]


BUILDERS: dict[str, Builder] = {
    "tiny-llama": Builder("tiny-llama-v1", build_tiny_llama),
    "tiny-sd": Builder("tiny-sd-v1", build_tiny_sd),
}
