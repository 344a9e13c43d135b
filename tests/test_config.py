import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moslora import MoSConfig, solve_pools


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"budget_rank": 0}, "budget_rank"),
        ({"shards_per_vector": 0}, "shards_per_vector"),
        ({"private_rank": -1}, "private_rank"),
        ({"rank": 4, "budget_rank": 8, "private_rank": 5}, "private_rank"),
        ({"rank": 8, "budget_rank": 2, "private_rank": 3}, "private_rank"),
        ({"rank": 8, "budget_rank": 2, "private_rank": 2}, "private_rank"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"init": "xavier"}, "init"),
        ({"seed": -1}, "seed"),
        ({"subset_selection": "yes"}, "subset_selection"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "(["}, "target_modules"),
        ({"target_modules": ["q_proj", 3]}, "target_modules"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoSConfig(**kwargs)


def test_defaults_and_scaling():
    cfg = MoSConfig(rank=16, alpha=32.0)
    assert cfg.scaling == 2.0
    assert MoSConfig.from_dict(cfg.to_dict()) == cfg


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown MoSConfig fields"):
        MoSConfig.from_dict({"rank": 4, "rnak": 2})


def test_lora_equivalent_has_no_pools():
    cfg = MoSConfig.lora_equivalent(8)
    plan = solve_pools(cfg, num_layers=5, d_in=32, d_out=48)
    assert plan.shards == 0
    assert plan.total_params == plan.lora_params(8) == 5 * 8 * (32 + 48)


def test_budget_matches_lora_exactly():
    cfg = MoSConfig(rank=16, budget_rank=2, shards_per_vector=2, private_rank=1)
    plan = solve_pools(cfg, num_layers=30, d_in=576, d_out=192)
    assert plan.shards == (2 - 1) * 30 * 2
    assert plan.shard_dims == (288, 96)
    assert plan.private_params == 30 * 1 * (576 + 192)
    assert plan.public_params == plan.shards * (288 + 96)
    assert plan.total_params == plan.lora_params(2)


def test_impossible_rank_names_the_largest_that_fits():
    cfg = MoSConfig(rank=8, budget_rank=2, private_rank=1)
    with pytest.raises(ValueError, match="largest rank that fits is 7"):
        solve_pools(cfg, num_layers=6, d_in=16, d_out=16)


def test_indivisible_shards_name_the_knob():
    with pytest.raises(ValueError, match="shards_per_vector=3 does not divide"):
        solve_pools(MoSConfig(rank=2, shards_per_vector=3), num_layers=4, d_in=16, d_out=18)


def test_subset_selection_off_shrinks_pool_and_says_why():
    cfg = MoSConfig(rank=4, budget_rank=2, subset_selection=False)
    plan = solve_pools(cfg, num_layers=8, d_in=16, d_out=16)
    assert plan.shards == 4
    assert plan.total_params < plan.lora_params(2)
    assert "subset selection off" in plan.note


@settings(max_examples=300, deadline=None)
@given(
    e=st.integers(1, 8), r=st.integers(1, 64), l=st.sampled_from([1, 2, 3, 4]),
    p=st.integers(0, 8), layers=st.integers(1, 12), d_in=st.integers(1, 96),
    d_out=st.integers(1, 96), subset=st.booleans(),
)
def test_budget_never_exceeds_lora(e, r, l, p, layers, d_in, d_out, subset):
    try:
        cfg = MoSConfig(rank=r, budget_rank=e, shards_per_vector=l, private_rank=p,
                        subset_selection=subset)
        plan = solve_pools(cfg, layers, d_in, d_out)
    except ValueError:
        return  # invalid combinations must fail loudly, which is all we ask here
    assert plan.total_params <= plan.lora_params(e)
    if subset:
        assert plan.total_params == plan.lora_params(e)
    assert plan.shards >= (r - p) * l  # a layer's shards always fit in the pool
    assert d_in % l == 0 and d_out % l == 0
