"""How big an adapter is: its trainable parameters, and its bytes on disk.

One counter for every report (``MoSModel``, training's metrics, the demo, ``moslora info``,
the benchmarks), so MoS, PEFT LoRA and the others are counted the same way.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

# what an adapter directory holds: the weights and their config. PEFT also writes a README
# model card, which is not the adapter.
ADAPTER_SUFFIXES = (".safetensors", ".json")


def trainable_parameters(model: nn.Module) -> int:
    """Parameters that train: an adapter's pools and segments, plus anything left unfrozen."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def stored_parameters(model: nn.Module) -> int:
    """Every parameter, counting a 4-bit weight's values (two per stored uint8 element)."""
    return sum(p.numel() * 2 if hasattr(p, "quant_state") else p.numel() for p in model.parameters())


def adapter_bytes(path: str | Path) -> int:
    """Bytes of the adapter saved in directory ``path`` (weights and config, in any library's
    format; a subdirectory's files count too)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.suffix in ADAPTER_SUFFIXES)
