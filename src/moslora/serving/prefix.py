"""PromptCache: the KV state of prompts already served, so a prompt seen again skips its prefill.

Many requests repeat a prompt (a shared system prompt and question, a retry, a benchmark's
fixed set). vLLM keeps the KV blocks of earlier prompts for this (automatic prefix caching);
on a CPU the prefill of 32 prompts of 64 tokens is most of a round's time, so a server without
it spends most of its time recomputing what it has.

An entry is one whole prompt's KV for one model, all columns but the last: keys and values
``(kv_heads, T - 1, head_dim)`` per layer. A hit joins the batch in the state a row has between
decoding steps (``Batch``: the cache holds every column but the newest token, fed at the next
step), with the prompt's last token as that newest token; so the first decoding step computes
the first answer token exactly as a prefill would (up to float rounding of a different batch).

Only whole prompts match (vLLM matches any shared prefix of whole blocks): enough for repeated
prompts, and no partial-prefill path to get wrong. An adapter's KV depends on its weights, so
an entry remembers the pools it was computed with (weakly: the cache never keeps an unloaded
adapter alive) and is a miss once the name serves other pools (unloaded and loaded again,
evicted and read back, replaced on disk). Entries are evicted least recently used first to stay
within ``max_bytes``.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache


class _Entry(NamedTuple):
    owner: weakref.ref | None  # the adapter's pools when computed; None: the bare base
    layers: list[tuple[Tensor, Tensor]]  # per layer, keys and values (kv_heads, T - 1, head_dim)
    bytes: int


class PromptCache:
    """Whole-prompt KV states per ``(model name, prompt token ids)``, at most ``max_bytes``.

    Args:
        max_bytes: the budget of stored keys and values; 0 disables the cache.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the prompt cache's max_bytes must be >= 0 (0 disables it), got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], _Entry] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def summary(self) -> dict[str, int]:
        """Entries, bytes, budget, hits and misses so far (``/metrics.json``'s ``prompt_cache``)."""
        return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses}

    def get(self, model: str, prompt: Sequence[int], owner: Any) -> list[tuple[Tensor, Tensor]] | None:
        """The stored state of ``prompt`` for ``model`` computed with ``owner`` (the adapter's
        pools, ``None`` for the base), or ``None``."""
        key = (model, tuple(prompt))
        entry = self._entries.get(key)
        if entry is not None and (entry.owner is None) == (owner is None) and (
                owner is None or entry.owner() is owner):
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.layers
        if entry is not None:  # computed with pools this name no longer serves
            self._drop(key)
        self.misses += 1
        return None

    def put(self, model: str, prompt: Sequence[int], owner: Any, layers: list[tuple[Tensor, Tensor]]) -> None:
        """Store ``layers`` (per layer keys, values ``(kv_heads, len(prompt) - 1, head_dim)``,
        which the cache keeps: pass copies, not views of a live cache)."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        key = (model, tuple(prompt))
        if size > self.max_bytes or len(prompt) < 2:
            return
        if key in self._entries:
            self._drop(key)
        while self.bytes + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[key] = _Entry(None if owner is None else weakref.ref(owner), layers, size)
        self.bytes += size

    def _drop(self, key: tuple[str, tuple[int, ...]]) -> None:
        self.bytes -= self._entries.pop(key).bytes


def row_state(cache: DynamicCache, row: int, length: int) -> list[tuple[Tensor, Tensor]]:
    """Row ``row``'s state in a left-padded prefill ``cache``: its last ``length`` columns but
    the final one, copied out of the batch's tensors (``(kv_heads, length - 1, head_dim)`` each)."""
    return [(layer.keys[row, :, -length:-1].clone(), layer.values[row, :, -length:-1].clone())
            for layer in cache.layers]


def batch_cache(states: Sequence[list[tuple[Tensor, Tensor]]]) -> DynamicCache:
    """Rows' states (as ``PromptCache.get`` returns them) as one ``DynamicCache``, left-padded
    with zeros to the longest (the caller masks the padding out)."""
    width = max(state[0][0].shape[-2] for state in states)
    layers = [(torch.stack([left_pad(k, width, -2) for k, _ in per_row]),
               torch.stack([left_pad(v, width, -2) for _, v in per_row]))
              for per_row in zip(*states, strict=True)]
    return DynamicCache(ddp_cache_data=layers)


def left_pad(t: Tensor, width: int, dim: int) -> Tensor:
    """``t`` zero-padded on the left of ``dim`` (negative) to ``width``."""
    missing = width - t.shape[dim]
    return F.pad(t, (0, 0) * (-dim - 1) + (missing, 0)) if missing else t
