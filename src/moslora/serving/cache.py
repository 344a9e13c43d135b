"""FactorCache: an LRU of materialized adapter factors, bounded in bytes.

Why a cache at all: adapters stay resident in their compact form (pools + routing indices),
and every call assembles the dense ``A: (r, d_in)``, ``B: (d_out, r)`` of each adapter present
in the batch, one gather per layer kind. That gather is ``r · (d_in + d_out)`` copies per layer
against ``rows · tokens · r · (d_in + d_out)`` multiply-adds for the low-rank product, so for a
prefill batch it is noise; it matters when a server sends many short calls to the same hot
adapters. The dense factors are ``r / e`` times the size of the pools, so a budget in bytes,
not a count of adapters, is what bounds the memory. A budget of 0 turns the cache off.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from torch import Tensor

Factors = dict[str, tuple[Tensor, Tensor]]  # module name -> (A: (r, d_in), B: (d_out, r)), unscaled


def factors_nbytes(factors: Factors) -> int:
    return sum(t.numel() * t.element_size() for pair in factors.values() for t in pair)


class FactorCache:
    """Least-recently-used adapter factors, at most ``budget`` bytes in total.

    An entry larger than the whole budget is built and returned but never stored.
    """

    def __init__(self, budget: int = 0) -> None:
        if budget < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {budget}")
        self.budget = budget
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, tuple[Factors, int]] = OrderedDict()

    def get(self, name: str, build: Callable[[], Factors]) -> Factors:
        """The factors of adapter ``name``: cached, or built with ``build()`` (and cached)."""
        if name in self._entries:
            self.hits += 1
            self._entries.move_to_end(name)
            return self._entries[name][0]
        self.misses += 1
        factors = build()
        size = factors_nbytes(factors)
        if size <= self.budget:
            while self.bytes + size > self.budget:
                self.drop(next(iter(self._entries)))
            self._entries[name] = (factors, size)
            self.bytes += size
        return factors

    def drop(self, name: str) -> None:
        """Forget adapter ``name`` (unloaded, or evicted); absent names are ignored."""
        entry = self._entries.pop(name, None)
        if entry is not None:
            self.bytes -= entry[1]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
