"""Base models: the causal LM an adapter is trained on or served with.

The embedded default (SmolLM2, converted once from its GGUF file), any local HF folder or GGUF
file, in float32, bfloat16 or 4-bit NF4. Training, the server, the demo, the CLI and the
benchmarks all load through here, so the server needs nothing of the training stack.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .assets import resolve_model
from .config import ConfigError
from .noise import no_loading_bars


def bf16_supported() -> bool:
    """A CUDA GPU with bfloat16 support (on CPU, bf16 autocast is slower than fp32 here)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def load_base(model: str | None, load_in_4bit: bool = False,
              bf16: bool | None = None) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer from a local path, a GGUF file or the embedded default.

    ``bf16`` loads it in bfloat16 (``None``: when the GPU supports it), else in float32.
    """
    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    use_bf16 = bf16_supported() if bf16 is None else bf16
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if use_bf16 else torch.float32}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
    with no_loading_bars():
        base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if torch.cuda.is_available() and not load_in_4bit:
        base = base.cuda()
    return base, tokenizer


def model_skeleton(model: str | None) -> nn.Module:
    """The module tree of ``model`` built from its config.json alone, on the meta device: no
    weights are read, so checks against it take a moment even for a large model."""
    try:
        path = resolve_model(model)
        config = AutoConfig.from_pretrained(path)
    except ValueError as err:  # no config.json, or one transformers cannot read
        raise ConfigError("model", str(err)) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
