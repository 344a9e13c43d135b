"""Serving many MoS adapters on one base: mixed batches with one adapter per row.

    from moslora.serving import MultiAdapterModel
    mm = MultiAdapterModel(base_model)
    mm.load_adapter("a", path_a); mm.load_adapter("b", path_b)
    logits = mm(input_ids, adapter_names=["a", "b", None]).logits   # None = base
"""

from .cache import FactorCache
from .multi import BASE, MultiAdapterLinear, MultiAdapterModel, UnknownAdapterError

__all__ = [
    "BASE",
    "FactorCache",
    "MultiAdapterLinear",
    "MultiAdapterModel",
    "UnknownAdapterError",
]
