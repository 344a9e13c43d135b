import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from moslora import MoSConfig, ShardPools, solve_pools
from moslora.pools import kind_generator, route

from conftest import budgets


def make_pools(layers=6, d_in=16, d_out=24, **kw) -> ShardPools:
    cfg = MoSConfig(**{"rank": 5, "budget_rank": 2, "private_rank": 1, **kw})
    plan = solve_pools(cfg, layers, d_in, d_out)
    return ShardPools(plan, cfg, kind_generator(cfg.seed, "kind"))


def assemble_by_loop(pools: ShardPools, k: int):
    """Reference assembly, written the slow obvious way."""
    r_pub = pools.index_A.shape[1]
    a_rows = [torch.cat([pools.pool_A[i] for i in pools.index_A[k, j]]) for j in range(r_pub)]
    b_cols = [torch.cat([pools.pool_B[i] for i in pools.index_B[k, j]]) for j in range(r_pub)]
    a = torch.stack(a_rows + list(pools.private_A[k]))
    b = torch.stack(b_cols + list(pools.private_B[k].T), dim=1)
    return a, b


def test_shapes_and_all_layers_at_once():
    pools = make_pools(shards_per_vector=2)
    a, b = pools.factors(3)
    assert a.shape == (5, 16) and b.shape == (24, 5)
    a_all, b_all = pools.factors()
    assert a_all.shape == (6, 5, 16) and b_all.shape == (6, 24, 5)
    assert torch.equal(a_all[3], a) and torch.equal(b_all[3], b)


def test_b_starts_at_zero_and_a_follows_lora_init():
    pools = make_pools(layers=40, d_in=64, budget_rank=3)
    a, b = pools.factors()
    assert torch.count_nonzero(b) == 0
    bound = 1 / math.sqrt(64)
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    g = make_pools(layers=40, d_in=64, budget_rank=3, init="gaussian").pool_A
    assert abs(g.std().item() - 1 / 5) < 0.02


def test_subset_selection_draws_distinct_shards_per_layer():
    pools = make_pools(shards_per_vector=2)
    for idx in (pools.index_A, pools.index_B):
        flat = idx.flatten(1)
        assert all(len(set(row.tolist())) == flat.shape[1] for row in flat)
        assert idx.min() >= 0 and idx.max() < pools.plan.shards
    # different layers get different subsets
    assert len({tuple(row.tolist()) for row in pools.index_A.flatten(1)}) > 1


def test_subset_selection_off_shares_one_A_across_layers():
    pools = make_pools(private_rank=0, subset_selection=False)
    a, _ = pools.factors()
    assert all(torch.equal(a[0], a[k]) for k in range(1, a.shape[0]))
    assert pools.plan.shards == 5


def test_pair_dissociation_off_routes_both_sides_alike():
    joined = make_pools(pair_dissociation=False)
    assert torch.equal(joined.index_A, joined.index_B)
    split = make_pools(pair_dissociation=True)
    assert not torch.equal(split.index_A, split.index_B)


def test_vector_sharding_uses_shards_of_d_over_l():
    pools = make_pools(shards_per_vector=4)
    assert pools.pool_A.shape == (pools.plan.shards, 4)
    assert pools.pool_B.shape == (pools.plan.shards, 6)
    assert pools.index_A.shape == (6, 4, 4)


def test_privatization_off_and_on():
    assert make_pools(private_rank=0).private_A.shape == (6, 0, 16)
    pools = make_pools(private_rank=1)
    assert pools.private_A.shape == (6, 1, 16) and pools.private_B.shape == (6, 24, 1)


def test_routing_is_seeded():
    cfg = MoSConfig(rank=5, budget_rank=2, private_rank=1)
    plan = solve_pools(cfg, 6, 16, 24)
    first = route(cfg, plan, kind_generator(0, "k"))
    again = route(cfg, plan, kind_generator(0, "k"))
    other = route(cfg, plan, kind_generator(1, "k"))
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_gradients_reach_only_the_routed_shards():
    pools = make_pools(layers=6, budget_rank=2, private_rank=1, rank=3)
    with torch.no_grad():
        pools.pool_B.normal_()
        pools.private_B.normal_()
    a, b = pools.factors(2)
    (b @ a).sum().backward()
    used = set(pools.index_A[2].flatten().tolist())
    touched = {i for i in range(pools.plan.shards) if pools.pool_A.grad[i].abs().sum() > 0}
    assert touched == used
    assert pools.private_A.grad[2].abs().sum() > 0
    assert pools.private_A.grad[[0, 1, 3, 4, 5]].abs().sum() == 0


def test_vectorized_assembly_equals_reference():
    tally = {"asserted": 0, "refused": 0}

    @settings(max_examples=150, deadline=None)
    @given(c=budgets(max_budget=4, max_layers=6, max_width=4), pair=st.booleans(), seed=st.integers(0, 10))
    def check(c, pair, seed):
        try:
            cfg = MoSConfig(rank=c["r"], budget_rank=c["e"], shards_per_vector=c["l"], private_rank=c["p"],
                            subset_selection=c["subset"], pair_dissociation=pair, seed=seed)
            plan = solve_pools(cfg, c["layers"], c["d_in"], c["d_out"])
        except ValueError:
            tally["refused"] += 1
            assume(False)
        pools = ShardPools(plan, cfg, kind_generator(seed, "k"))
        with torch.no_grad():
            for param in pools.parameters():
                param.normal_()
        for k in range(c["layers"]):
            a, b = pools.factors(k)
            ra, rb = assemble_by_loop(pools, k)
            assert a.shape == (c["r"], c["d_in"]) and b.shape == (c["d_out"], c["r"])
            assert torch.equal(a, ra) and torch.equal(b, rb)
        assert sum(x.numel() for x in pools.parameters()) == plan.total_params
        tally["asserted"] += 1

    check()
    assert tally["asserted"] >= 0.9 * sum(tally.values()), tally


def test_layer_scale_multiplies_each_layer_s_rows_of_a_and_trains():
    plain, scaled = make_pools(layers=6, d_in=32, d_out=32), make_pools(layers=6, d_in=32, d_out=32, layer_scale=True)
    assert scaled.scale.shape == (6, 5) and torch.equal(scaled.scale, torch.ones(6, 5))
    assert scaled.pool_A.shape[0] == plain.pool_A.shape[0] - 1  # one shard pays for 30 scales
    with torch.no_grad():
        scaled.scale.uniform_(0.5, 2.0)
        scaled.pool_B.normal_()
    a, b = scaled.factors()
    ref_a, ref_b = (torch.stack(t) for t in zip(*(assemble_by_loop(scaled, k) for k in range(6))))
    torch.testing.assert_close(a, ref_a * scaled.scale.unsqueeze(-1))
    torch.testing.assert_close(b, ref_b)
    (b @ a).sum().backward()
    assert scaled.scale.grad.abs().sum() > 0


def test_pool_lr_scale_leaves_the_init_and_scales_adam_s_step_on_the_pools():
    def one_step(c: float):
        pools = make_pools(pool_lr_scale=c)
        before = [t.detach().clone() for t in pools.factors()]
        a, b = pools.factors()
        torch.manual_seed(0)
        target = torch.randn(b.shape[0], b.shape[1], a.shape[-1])
        ((b @ a - target) ** 2).sum().backward()
        torch.optim.Adam(pools.parameters(), lr=1e-3).step()
        return before, [t.detach() for t in pools.factors()], pools

    (a0, b0), (a1, b1), _ = one_step(1.0)
    (c_a0, c_b0), (c_a1, c_b1), pools = one_step(4.0)
    torch.testing.assert_close(c_a0, a0)  # the same function at init
    torch.testing.assert_close(c_b0, b0)
    public = pools.index_A.shape[1]  # Adam's first step is lr·sign(g): 4x on public ranks only
    step, c_step = (b1 - b0)[..., :public], (c_b1 - c_b0)[..., :public]
    torch.testing.assert_close(c_step, 4.0 * step, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close((c_a1 - c_a0)[:, public:], (a1 - a0)[:, public:])


def test_pool_init_scale_scales_the_public_a_pool_only():
    plain, small = make_pools(), make_pools(pool_init_scale=0.25)
    torch.testing.assert_close(small.pool_A, 0.25 * plain.pool_A)
    torch.testing.assert_close(small.private_A, plain.private_A)


def route_as_before_private_shards(cfg: MoSConfig, plan, generator: torch.Generator):
    """``route`` as it was before ``private_shards`` (verbatim but for names): the draw
    sequence that every saved seed's indices came from."""
    layers, shards = plan.num_layers, plan.shards
    per_layer = (plan.rank - plan.private_rank) * plan.shards_per_vector

    def draw(shuffle: bool):
        if cfg.subset_selection:
            rows = [torch.randperm(shards, generator=generator)[:per_layer] for _ in range(layers)]
            flat = torch.stack(rows) if rows else torch.empty(0, per_layer, dtype=torch.long)
        else:
            order = torch.randperm(shards, generator=generator) if shuffle else torch.arange(shards)
            flat = order[:per_layer].expand(layers, per_layer).clone()
        return flat.view(layers, plan.rank - plan.private_rank, plan.shards_per_vector)

    index_a = draw(shuffle=False).to(torch.int32)
    index_b = draw(shuffle=True).to(torch.int32) if cfg.pair_dissociation else index_a.clone()
    return index_a, index_b


@settings(max_examples=100, deadline=None)
@given(c=budgets(max_budget=4, max_layers=8, max_width=4), pair=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_no_private_shards_routes_exactly_as_before(c, pair, seed):
    try:
        cfg = MoSConfig(rank=c["r"], budget_rank=c["e"], shards_per_vector=c["l"], private_rank=c["p"],
                        subset_selection=c["subset"], pair_dissociation=pair, seed=seed)
        plan = solve_pools(cfg, c["layers"], c["d_in"], c["d_out"])
    except ValueError:
        assume(False)
    new = route(cfg, plan, kind_generator(seed, "kind"))
    old = route_as_before_private_shards(cfg, plan, kind_generator(seed, "kind"))
    assert all(torch.equal(x, y) for x, y in zip(new, old))


def private_shard_configs():
    """(config, layers, d_in, d_out) with at least one private shard per layer, that solve."""
    @st.composite
    def draw(draw):
        c = draw(budgets(max_budget=4, max_layers=8, max_width=4))
        most = min((c["r"] - c["p"]) * c["l"], (c["e"] - c["p"]) * c["l"])
        assume(most >= 1)
        cfg = MoSConfig(rank=c["r"], budget_rank=c["e"], shards_per_vector=c["l"], private_rank=c["p"],
                        private_shards=draw(st.integers(1, most)), pair_dissociation=draw(st.booleans()),
                        layer_scale=draw(st.booleans()), seed=draw(st.integers(0, 100)))
        try:
            solve_pools(cfg, c["layers"], c["d_in"], c["d_out"])
        except ValueError:
            assume(False)
        return cfg, c["layers"], c["d_in"], c["d_out"]
    return draw()


@settings(max_examples=150, deadline=None)
@given(setting=private_shard_configs())
def test_private_shards_are_routed_by_their_layer_only_once_and_first(setting):
    cfg, layers, d_in, d_out = setting
    plan = solve_pools(cfg, layers, d_in, d_out)
    index_a, index_b = route(cfg, plan, kind_generator(cfg.seed, "kind"))
    k, public = cfg.private_shards, plan.public_shards
    for i in range(layers):
        own = set(range(public + i * k, public + (i + 1) * k))
        for index in (index_a, index_b):
            flat = index[i].flatten().tolist()
            assert flat[:k] == sorted(own)  # the first k slots, each of its rows once, on both sides
            assert all(0 <= j < public for j in flat[k:])  # the rest: public rows only
            assert len(set(flat)) == len(flat)  # no row twice in a layer, public or private
    if not cfg.pair_dissociation:
        assert torch.equal(index_a, index_b)
    # every private row has one layer, and all pool rows fit the pool
    assert int(index_a.max()) < plan.shards and int(index_b.max()) < plan.shards


def test_private_shards_cost_what_the_plan_says_and_assemble_as_the_reference():
    # 12 pool rows: one private shard per layer, 6 public rows for a layer's other 5 slots
    pools = make_pools(layers=6, rank=4, budget_rank=2, private_rank=1, shards_per_vector=2,
                       private_shards=1)
    assert pools.plan.shards == 12 and pools.plan.public_shards == 6
    assert pools.pool_A.shape == (12, 8) and pools.pool_B.shape == (12, 12)
    assert sum(x.numel() for x in pools.parameters()) == pools.plan.total_params == pools.plan.lora_params(2)
    with torch.no_grad():
        for param in pools.parameters():
            param.normal_()
    for k in range(6):
        assert all(torch.equal(x, y) for x, y in zip(pools.factors(k), assemble_by_loop(pools, k)))


def test_gradients_of_a_layer_s_private_shards_come_from_that_layer_only():
    pools = make_pools(layers=6, rank=3, budget_rank=3, private_rank=1, shards_per_vector=2,
                       private_shards=2)
    with torch.no_grad():
        pools.pool_B.normal_()
    public, k = pools.plan.public_shards, 2
    for layer in range(6):
        pools.zero_grad()
        a, b = pools.factors(layer)
        (b @ a).sum().backward()
        for grad in (pools.pool_A.grad, pools.pool_B.grad):
            touched = {i for i in range(public, pools.plan.shards) if grad[i].abs().sum() > 0}
            assert touched == set(range(public + layer * k, public + (layer + 1) * k))
