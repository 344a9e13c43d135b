"""StackedPools: one layer kind's pools of every adapter in a call, laid end to end, so that
one gather assembles all of their factors for a layer, just before the layer uses them.

Why: a decoding step is a few rows per adapter, so each adapter's update is bound by reading
its factors, not by arithmetic. Dense factors of the ~24 adapters of a 32-row SmolLM2 batch
are ~470 MB, read from DRAM at every step. What only MoS has is that a kind's pools are
shared by all its layers and are ``r / e`` times smaller than those factors (~60 MB for the
same batch): they stay in the CPU's last-level cache from one layer to the next, and each
layer gathers its ``(G, r, d)`` factors from them into a buffer small enough to stay in L2
for the product that follows. No dense factors are kept between steps.

Layout, per kind (``l`` = the least common multiple of the adapters' shards per vector, so
every adapter's shards split into whole rows of one width ``d / l``):

- ``pool_a: (N + 1, d_in / l)``: per adapter, its public ``A`` shards (times its
  ``pool_lr_scale``), then its private ranks cut into ``l`` rows each; a last row of zeros
  pads every adapter to the call's largest rank (exact: a zero rank adds nothing);
- ``pool_b: (N + 1, d_out / l)``: the same for ``B``;
- per adapter, ``table_a, table_b: (L, r_max, l)``: the rows of ``pool_a``/``pool_b`` that
  make each of its layers' rank vectors (public ranks first, private last, padding rows).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..pools import ShardPools


class StackedPools:
    """The pools of one kind for ``parts`` (one ``ShardPools`` per adapter), end to end.

    Args:
        parts: each adapter's pools of this kind; they must agree on ``d_in`` and ``d_out``.
    """

    def __init__(self, parts: Sequence[ShardPools]) -> None:
        plans = [p.plan for p in parts]
        self.d_in, self.d_out = plans[0].d_in, plans[0].d_out
        if any((q.d_in, q.d_out) != (self.d_in, self.d_out) for q in plans):
            raise ValueError("StackedPools: every adapter's pools of a kind must have the same d_in and d_out")
        self.l = math.lcm(*(q.shards_per_vector for q in plans))  # divides d: an lcm of divisors of d
        self.rank = max(q.rank for q in plans)
        rows_a, rows_b, tables_a, tables_b = [], [], [], []
        offset = 0
        for part in parts:
            a, b, table_a, table_b = self._lay_out(part, offset)
            rows_a.append(a)
            rows_b.append(b)
            tables_a.append(table_a)
            tables_b.append(table_b)
            offset += a.shape[0]
        zero = offset  # the padding row
        self.pool_a = torch.cat([*rows_a, rows_a[0].new_zeros(1, self.d_in // self.l)])
        self.pool_b = torch.cat([*rows_b, rows_b[0].new_zeros(1, self.d_out // self.l)])
        self.tables_a = [t.masked_fill_(t < 0, zero) for t in tables_a]
        self.tables_b = [t.masked_fill_(t < 0, zero) for t in tables_b]
        self._stacked: tuple[Tensor, Tensor] | None = None
        self.scales = [None if p.scale is None else F.pad(p.scale, (0, self.rank - p.plan.rank)) for p in parts]

    def _lay_out(self, part: ShardPools, offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One adapter's rows of ``pool_a``, ``pool_b`` (starting at row ``offset``) and its
        tables ``(L, r_max, l)``, padding entries -1."""
        plan, l = part.plan, self.l
        k = l // plan.shards_per_vector  # rows per shard of this adapter
        layers, private = plan.num_layers, plan.private_rank
        c = part.pool_lr_scale
        pool_a, pool_b = part.pool_A, part.pool_B
        if c != 1.0:
            pool_a, pool_b = pool_a * c, pool_b * c
        a = torch.cat([pool_a.reshape(-1, self.d_in // l), part.private_A.reshape(-1, self.d_in // l)])
        b = torch.cat([pool_b.reshape(-1, self.d_out // l), part.private_B.mT.reshape(-1, self.d_out // l)])
        public = pool_a.shape[0] * k
        split = torch.arange(k, device=a.device)

        def public_rows(index: Tensor) -> Tensor:  # (L, r - p, l_g) shard ids -> (L, r - p, l) rows
            return (index.long().unsqueeze(-1) * k + split).flatten(-2) + offset

        private_rows = offset + public + torch.arange(layers * private * l, device=a.device).view(layers, private, l)
        pad = torch.full((layers, self.rank - plan.rank, l), -1, dtype=torch.long, device=a.device)
        table_a = torch.cat([public_rows(part.index_A), private_rows, pad], dim=1)
        table_b = torch.cat([public_rows(part.index_B), private_rows, pad], dim=1)
        return a, b, table_a, table_b

    def indices(self, members: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor | None]:
        """What ``factors`` gathers for one layer, computed once per call: ``members`` are, per
        adapter of the layer, ``(its position in parts, the layer's position among that
        adapter's layers of the kind)``. Returns ``index_a, index_b: (G, r_max, l)`` and the
        layer scales ``(G, r_max, 1)`` (``None`` when no member has ``layer_scale``)."""
        positions = {k for _, k in members}
        if (len(positions) == 1 and [g for g, _ in members] == list(range(len(self.tables_a)))
                and len({t.shape[0] for t in self.tables_a}) == 1):
            (k,) = positions  # the usual case, every adapter in order at one layer: two ops, not 2·G
            index_a, index_b = self._all_tables()
            index_a, index_b = index_a[k], index_b[k]
        else:
            index_a = torch.stack([self.tables_a[g][k] for g, k in members])
            index_b = torch.stack([self.tables_b[g][k] for g, k in members])
        scales = [self.scales[g] for g, _ in members]
        scale = None
        if any(s is not None for s in scales):
            ones = self.pool_a.new_ones(self.rank)
            scale = torch.stack([ones if s is None else s[k] for s, (_, k) in zip(scales, members)]).unsqueeze(-1)
        return index_a, index_b, scale

    def _all_tables(self) -> tuple[Tensor, Tensor]:
        """Every adapter's tables stacked: ``(L, G, r_max, l)`` each (when all have L layers)."""
        if self._stacked is None:
            self._stacked = torch.stack(self.tables_a, dim=1), torch.stack(self.tables_b, dim=1)
        return self._stacked

    def factors(self, index_a: Tensor, index_b: Tensor, scale: Tensor | None) -> tuple[Tensor, Tensor]:
        """One layer's factors from ``indices``: ``a: (G, r_max, d_in)`` and ``b: (G, d_out, r_max)``,
        an adapter of lower rank padded with zero ranks at the end. ``b`` is the transposed
        view of a contiguous ``(G, r_max, d_out)``, the layout the second product reads in order."""
        a = F.embedding(index_a, self.pool_a).flatten(-2)
        b_t = F.embedding(index_b, self.pool_b).flatten(-2)
        return (a if scale is None else a * scale), b_t.mT
