"""StackedPools: one gather over many adapters' pools equals each adapter's own factors."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moslora import MoSConfig, solve_pools
from moslora.config import ConfigError
from moslora.pools import ShardPools, kind_generator
from moslora.serving.stacked import StackedPools

LAYERS, D_IN, D_OUT = 4, 24, 12


@st.composite
def adapter_pools(draw) -> ShardPools:
    """One adapter's pools of a (4 layers, 24 -> 12) kind with any strategies and variants,
    shard privatization, every parameter random (so zero-initialised B cannot hide a wrong index)."""
    budget = draw(st.integers(1, 3))
    cfg = dict(rank=draw(st.integers(1, 6)), budget_rank=budget, private_rank=draw(st.integers(0, budget - 1)),
               shards_per_vector=draw(st.sampled_from([1, 2, 3, 4])), subset_selection=draw(st.booleans()),
               pair_dissociation=draw(st.booleans()), layer_scale=draw(st.booleans()),
               pool_lr_scale=draw(st.sampled_from([1.0, 0.5])), private_shards=draw(st.integers(0, 2)),
               seed=draw(st.integers(0, 99)))
    try:
        config = MoSConfig(**cfg)
        plan = solve_pools(config, LAYERS, D_IN, D_OUT)
    except ConfigError:
        config = MoSConfig(rank=2, budget_rank=1, seed=cfg["seed"])
        plan = solve_pools(config, LAYERS, D_IN, D_OUT)
    pools = ShardPools(plan, config, kind_generator(config.seed, "kind"))
    gen = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for p in pools.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return pools


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(adapter_pools(), min_size=1, max_size=4), data=st.data())
def test_gathered_factors_are_each_adapters_own_padded_with_zero_ranks(parts, data):
    stack = StackedPools(parts)
    layer = data.draw(st.integers(0, LAYERS - 1))
    # any subset of the adapters, in any order (a layer that only some adapters target)
    order = data.draw(st.permutations(range(len(parts))))
    members = [(g, layer) for g in order[:data.draw(st.integers(1, len(parts)))]]
    a, b = stack.factors(*stack.indices(members))
    assert a.shape == (len(members), stack.rank, D_IN) and b.shape == (len(members), D_OUT, stack.rank)
    for i, (g, k) in enumerate(members):
        want_a, want_b = parts[g].factors(k)
        r = want_a.shape[0]
        torch.testing.assert_close(a[i, :r], want_a, rtol=0, atol=1e-6)
        torch.testing.assert_close(b[i, :, :r], want_b, rtol=0, atol=1e-6)
        assert not a[i, r:].any() and not b[i, :, r:].any(), "padding ranks must be exactly zero"


def test_the_usual_case_takes_the_stacked_tables():
    """Every adapter at one layer, in order: the same factors through the one-op path."""
    parts = [ShardPools(solve_pools(MoSConfig(rank=4, budget_rank=2, private_rank=1, seed=s), LAYERS, D_IN, D_OUT),
                        MoSConfig(rank=4, budget_rank=2, private_rank=1, seed=s), kind_generator(s, "kind"))
             for s in range(3)]
    stack = StackedPools(parts)
    fast = stack.factors(*stack.indices([(0, 2), (1, 2), (2, 2)]))
    assert stack._stacked is not None
    slow = StackedPools(parts).factors(*StackedPools(parts).indices([(0, 2), (1, 2)]))
    assert torch.equal(fast[0][:2], slow[0]) and torch.equal(fast[1][:2], slow[1])
