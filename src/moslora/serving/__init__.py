"""Serving many MoS adapters on one base: mixed batches with one adapter per row.

    from moslora.serving import MultiAdapterModel
    mm = MultiAdapterModel(base_model)
    mm.load_adapter("a", path_a); mm.load_adapter("b", path_b)
    logits = mm(input_ids, adapter_names=["a", "b", None]).logits   # None = base

    mm = MultiAdapterModel(base_model, adapter_root="adapters", max_resident_bytes=2**30)
    mm.available()                                                   # every adapter under adapters/
    mm.generate(input_ids, adapter_names=["x", "y"], max_new_tokens=8)  # x, y loaded on first use
"""

from .multi import BASE, MultiAdapterLinear, MultiAdapterModel, ResidencyStats, UnknownAdapterError
from .root import AdapterRoot

__all__ = [
    "BASE",
    "AdapterRoot",
    "MultiAdapterLinear",
    "MultiAdapterModel",
    "ResidencyStats",
    "UnknownAdapterError",
]
