"""Export an MoS adapter as a llama.cpp LoRA adapter: a GGUF file loaded next to a GGUF base.

What llama.cpp expects (written by its ``convert_lora_to_gguf.py``, read by
``src/llama-adapter.cpp``):

- metadata ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``
  (float32) and ``general.architecture`` equal to the base's (``"llama"``), else it refuses;
- for each adapted base tensor, say ``blk.3.attn_q.weight``, the pair
  ``blk.3.attn_q.weight.lora_a`` and ``.lora_b``: ``A: (r, d_in)`` and ``B: (d_out, r)`` in
  torch's row-major order, which ggml reads as ``ne = [d_in, r]`` and ``[r, d_out]``; the
  update is ``(alpha / r) · B A x`` with ``r`` taken from B;
- the GGUF conversion of a Llama reorders the rows of ``q_proj`` and ``k_proj`` within each
  head (HF's rotary layout splits a head into halves, llama.cpp's pairs neighbouring rows),
  so the update of those weights must be reordered the same way: only B's rows move.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import torch
from torch import Tensor

from .atomic import atomic_file
from .checkpoint import lora_factors
from .model import MoSModel

# the transformers class of a base -> llama.cpp's name for its architecture
LLAMA_CPP_ARCHITECTURES = {"LlamaForCausalLM": "llama"}

# a Llama layer (the module path after model.layers.N.) -> its llama.cpp tensor, and the config
# field that counts the heads of its rows when the GGUF conversion permutes them (else None)
LLAMA_TENSORS: dict[str, tuple[str, str | None]] = {
    "self_attn.q_proj": ("attn_q", "num_attention_heads"),
    "self_attn.k_proj": ("attn_k", "num_key_value_heads"),
    "self_attn.v_proj": ("attn_v", None),
    "self_attn.o_proj": ("attn_output", None),
    "mlp.gate_proj": ("ffn_gate", None),
    "mlp.up_proj": ("ffn_up", None),
    "mlp.down_proj": ("ffn_down", None),
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


class GGUFTarget(NamedTuple):
    """Where one adapted layer goes in llama.cpp: the base tensor's name and, for q and k,
    the config field counting the heads whose rows are permuted."""

    tensor: str
    heads: str | None


def gguf_targets(base_fingerprint: dict[str, Any]) -> dict[str, GGUFTarget]:
    """The llama.cpp target of every adapted layer of an adapter, by HF module name.

    ``base_fingerprint`` is the adapter's record of its base (``MoSModel.base_fingerprint`` or
    the saved ``adapter_config.json`` field), so an adapter can be checked before its base
    loads. Raises ``ValueError`` for a base that is not a Llama or a layer llama.cpp's Llama has
    no tensor for (an embedding, the LM head).
    """
    architecture = base_fingerprint["architecture"]
    if architecture not in LLAMA_CPP_ARCHITECTURES:
        raise ValueError(f"llama.cpp export supports Llama bases ({', '.join(LLAMA_CPP_ARCHITECTURES)}); "
                         f"this adapter's base is a {architecture}")
    targets, unsupported = {}, []
    for name in base_fingerprint["layers"]:
        match = _LAYER.fullmatch(name)
        if match is None or match[2] not in LLAMA_TENSORS:
            unsupported.append(name)
            continue
        tensor, heads = LLAMA_TENSORS[match[2]]
        targets[name] = GGUFTarget(f"blk.{match[1]}.{tensor}.weight", heads)
    if unsupported:
        raise ValueError(f"llama.cpp export supports the Llama layers {', '.join(LLAMA_TENSORS)}; this "
                         f"adapter also adapts {', '.join(unsupported[:3])}"
                         + (f" (+{len(unsupported) - 3} more)" if len(unsupported) > 3 else ""))
    return targets


def rope_permute(rows: Tensor, heads: int) -> Tensor:
    """Reorder the rows of a q or k projection (or of its B) from HF's to llama.cpp's layout.

    ``rows: (heads · head_dim, ...)``. Within each head, HF keeps the two rotary halves apart
    (rows ``0..d/2`` then ``d/2..d``) and llama.cpp interleaves them (``0, d/2, 1, d/2 + 1,
    ...``): the permutation ``convert_hf_to_gguf.py`` applies to a Llama's base weights.
    """
    if rows.shape[0] % (2 * heads):
        raise ValueError(f"{rows.shape[0]} rows do not split into {heads} heads of an even size")
    halves = rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
    return halves.transpose(1, 2).reshape(rows.shape)


def check_output_file(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file unless ``overwrite``, and any directory."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; name the .gguf file to write")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it, or choose a new path")


def export_gguf(model: MoSModel, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``model``'s adapter as a llama.cpp LoRA adapter (GGUF, float32, rank ``r``).

    Load it with ``llama-cli -m base.gguf --lora path`` (or llama-cpp-python's
    ``Llama(model_path=..., lora_path=path)``), where ``base.gguf`` is the Llama the adapter
    was trained on. Written atomically; an existing file is kept unless ``overwrite``.
    Returns ``path``.
    """
    path = Path(path)
    check_output_file(path, overwrite)
    targets = gguf_targets(model.base_fingerprint)
    config = model.base_model.config
    with atomic_file(path) as staging:
        writer = gguf.GGUFWriter(staging, LLAMA_CPP_ARCHITECTURES[model.base_fingerprint["architecture"]])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(model.mos_config.alpha))
        for name, (a, b) in lora_factors(model, torch.float32).items():
            target = targets[name]
            if target.heads is not None:
                b = rope_permute(b, getattr(config, target.heads))
            writer.add_tensor(f"{target.tensor}.lora_a", a.numpy())
            writer.add_tensor(f"{target.tensor}.lora_b", b.contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
