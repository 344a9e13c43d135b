"""The capacity model's base: a frozen, seeded random-init Llama and a word-level tokenizer
over the facts' words (``benchmarks/capacity_model.py`` says why each choice).

Its own module so that the track (``quality.ModelCapacityTrack``) and the suite built on it
both import it without importing each other.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from moslora import memorization

LAYERS, HIDDEN, FFN, HEADS = 16, 64, 128, 4
INIT_RANGE = 0.15
TARGETS = ["down_proj"]
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


@lru_cache(maxsize=4)
def word_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of ``facts(size)`` (names, ``:``, every answer
    word), putting ``<s>`` in front so a fact's first name token has a fixed left context."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    split = pre_tokenizers.Whitespace().pre_tokenize_str
    words = {w for prompt, answer in memorization.facts(size) for w, _ in split(prompt + answer)}
    vocab = {w: i for i, w in enumerate(SPECIALS + tuple(sorted(words | set(memorization.WORDS))))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def capacity_model(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    """The frozen random base: ``LAYERS`` blocks of width ``HIDDEN``, weights ~ N(0, INIT_RANGE)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, vocab_size=vocab, initializer_range=INIT_RANGE,
        max_position_embeddings=64, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation="eager"))  # eager: SDPA's CPU kernel was a quarter of a 7-token step
    return model.requires_grad_(False).eval()
