"""ShardPools: the trainable state of one layer kind, and the one place where the MoS math lives.

For a kind with ``L`` layers, per-layer rank ``r``, ``p`` private ranks, ``k`` private shards
and ``l`` shards per vector, a ``ShardPools`` holds

- pools ``pool_A: (n, d_in / l)`` and ``pool_B: (n, d_out / l)`` (rows are shards): rows
  ``[0, n_pub)`` public, then ``k`` private rows per layer (``MoSConfig.private_shards``),
- private segments ``private_A: (L, p, d_in)`` and ``private_B: (L, d_out, p)``,
- fixed routing indices ``index_A, index_B: (L, r - p, l)`` (buffers, saved with the adapter),
- with ``MoSConfig.layer_scale``, a per-layer scale of each rank ``scale: (L, r)``,

and assembles layer ``k``'s factors ``A: (r, d_in)`` and ``B: (d_out, r)`` with one gather.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoSConfig, PoolPlan


def kind_generator(seed: int, kind: str) -> torch.Generator:
    """A generator seeded from the config seed and the kind's name, stable across processes."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(kind.encode()))


def route(cfg: MoSConfig, plan: PoolPlan, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw the fixed routing indices ``(index_A, index_B)``, each ``(L, r - p, l)`` int32.

    Subset selection: each layer draws its ``(r - p) · l`` shards without replacement, so a
    layer never repeats a shard. Off: every layer takes the whole pool in the same order.
    Private shards (``k``): the first ``k`` of layer ``i``'s flattened slots are its own rows
    ``n_pub + i·k + j``, on both sides; the other slots draw from the public rows as above.
    Pair dissociation: the B side gets its own independent draw; off: B reuses A's index.
    """
    layers, shards, k = plan.num_layers, plan.shards, plan.private_shards
    per_layer = (plan.rank - plan.private_rank) * plan.shards_per_vector
    own = torch.arange(plan.public_shards, shards).view(layers, k)  # (L, k): layer i's rows

    def draw(shuffle: bool) -> Tensor:
        if cfg.subset_selection:
            # randperm over the public rows only: with k = 0 the same draws as ever (same seeds)
            rows = [torch.randperm(plan.public_shards, generator=generator)[:per_layer - k]
                    for _ in range(layers)]
            drawn = torch.stack(rows) if rows else torch.empty(0, per_layer - k, dtype=torch.long)
            flat = torch.cat([own, drawn], dim=1)
        else:  # no private shards here (MoSConfig refuses them without subset selection)
            order = torch.randperm(shards, generator=generator) if shuffle else torch.arange(shards)
            flat = order[:per_layer].expand(layers, per_layer).clone()
        return flat.view(layers, plan.rank - plan.private_rank, plan.shards_per_vector)

    # int32: half the resident bytes of int64 for every adapter held in memory (serving)
    index_a = draw(shuffle=False).to(torch.int32)
    index_b = draw(shuffle=True).to(torch.int32) if cfg.pair_dissociation else index_a.clone()
    return index_a, index_b


def _gather(pool: Tensor, index: Tensor) -> Tensor:
    """Rank vectors from shards: ``index (..., m, l)`` into ``pool (n, d/l)`` -> ``(..., m, d)``.

    ``F.embedding`` rather than fancy indexing: its backward is a dense index-add into the
    pool, the cheapest way for gradients to reach shared shards.
    """
    return F.embedding(index, pool).flatten(-2)


class ShardPools(nn.Module):
    """Pools (public shards, then each layer's private shards), private segments and routing
    of one layer kind.

    Args:
        plan: the solved sizes (``solve_pools``).
        cfg: the adapter config (strategies and init).
        generator: seeds routing and initialisation.
    """

    def __init__(self, plan: PoolPlan, cfg: MoSConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.plan = plan
        shard_a, shard_b = plan.shard_dims
        layers, p = plan.num_layers, plan.private_rank
        index_a, index_b = route(cfg, plan, generator)
        self.register_buffer("index_A", index_a)
        self.register_buffer("index_B", index_b)
        self.pool_lr_scale = cfg.pool_lr_scale
        pool_a = _init_a((plan.shards, shard_a), plan, cfg, generator) * cfg.pool_init_scale
        self.pool_A = nn.Parameter(pool_a / cfg.pool_lr_scale)  # stored over c, used times c
        self.pool_B = nn.Parameter(torch.zeros(plan.shards, shard_b))
        self.private_A = nn.Parameter(_init_a((layers, p, plan.d_in), plan, cfg, generator))
        self.private_B = nn.Parameter(torch.zeros(layers, plan.d_out, p))
        self.scale = nn.Parameter(torch.ones(layers, plan.rank)) if cfg.layer_scale else None

    def factors(self, layer: int | None = None) -> tuple[Tensor, Tensor]:
        """Assemble ``A: (r, d_in)`` and ``B: (d_out, r)`` for ``layer``.

        With ``layer=None`` returns all layers at once: ``A: (L, r, d_in)``, ``B: (L, d_out, r)``.
        Public ranks come first, private ranks last. ``B`` is the transposed view of a contiguous
        ``(r, d_out)``: the gather's own layout, which ``(x A^T) B^T`` reads in order.
        """
        sel = slice(None) if layer is None else layer
        pool_a, pool_b = self.pool_A, self.pool_B
        if self.pool_lr_scale != 1.0:
            pool_a, pool_b = pool_a * self.pool_lr_scale, pool_b * self.pool_lr_scale
        a = torch.cat([_gather(pool_a, self.index_A[sel]), self.private_A[sel]], dim=-2)
        b_t = torch.cat([_gather(pool_b, self.index_B[sel]), self.private_B[sel].mT], dim=-2)
        if self.scale is not None:
            a = a * self.scale[sel].unsqueeze(-1)
        return a, b_t.mT

    def extra_repr(self) -> str:
        p = self.plan
        return (
            f"layers={p.num_layers}, d_in={p.d_in}, d_out={p.d_out}, rank={p.rank}, "
            f"private_rank={p.private_rank}, shards={p.shards}, private_shards={p.private_shards}, "
            f"shard_dims={p.shard_dims}"
        )


def _init_a(shape: tuple[int, ...], plan: PoolPlan, cfg: MoSConfig, g: torch.Generator) -> Tensor:
    """A-side init as LoRA's A, on the *assembled* fan-in ``d_in`` (not the shard width).

    kaiming: ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in));
    gaussian: N(0, 1/r).
    """
    if cfg.init == "gaussian":
        return torch.randn(shape, generator=g) / plan.rank
    bound = 1.0 / math.sqrt(plan.d_in)
    return (torch.rand(shape, generator=g) * 2 - 1) * bound
