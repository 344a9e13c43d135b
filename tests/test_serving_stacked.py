"""StackedPools: one gather over many adapters' pools equals each adapter's own factors."""

import torch
from hypothesis import given, settings

from conftest import D_IN, D_OUT, LAYERS, stacked_layer

from moslora import MoSConfig, solve_pools
from moslora.pools import ShardPools, kind_generator
from moslora.serving.stacked import StackedPools

@settings(max_examples=60, deadline=None)
@given(layer=stacked_layer())
def test_gathered_factors_are_each_adapters_own_padded_with_zero_ranks(layer):
    parts, stack, members = layer
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
