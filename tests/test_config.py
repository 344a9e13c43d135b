import re

import pytest
from hypothesis import assume, given, settings

from conftest import budgets
from hypothesis import strategies as st

from moslora import MoSConfig, get_mos_model, solve_pools
from moslora.config import ConfigError


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
        ({"target_modules": ["q_proj", ""]}, "target_modules"),
        ({"target_modules": None}, "target_modules"),
        ({"rank": "4"}, "rank"),
        ({"rank": True}, "rank"),
        ({"budget_rank": -3}, "budget_rank"),
        ({"shards_per_vector": 1.0}, "shards_per_vector"),
        ({"private_rank": None}, "private_rank"),
        ({"pair_dissociation": 1}, "pair_dissociation"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"alpha": "16"}, "alpha"),
        ({"alpha": True}, "alpha"),
        ({"dropout": float("nan")}, "dropout"),
        ({"dropout": "0.1"}, "dropout"),
        ({"init": ["kaiming"]}, "init"),
        ({"init": "Kaiming"}, "init"),
        ({"seed": 2**32}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"layer_scale": 1}, "layer_scale"),
        ({"pool_lr_scale": 0.0}, "pool_lr_scale"),
        ({"pool_init_scale": float("nan")}, "pool_init_scale"),
        ({"private_shards": -1}, "private_shards"),
        ({"private_shards": 1.0}, "private_shards"),
        ({"private_shards": True}, "private_shards"),
        ({"private_shards": 1, "subset_selection": False}, "private_shards"),
        ({"rank": 4, "budget_rank": 4, "private_rank": 3, "private_shards": 2}, "private_shards"),
        ({"rank": 8, "budget_rank": 2, "private_rank": 1, "shards_per_vector": 2, "private_shards": 3},
         "private_shards"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field) as err:
        MoSConfig(**kwargs)
    assert err.value.field == field


@pytest.mark.parametrize("kwargs, allowed", [
    ({"rank": 0}, "integer >= 1"),
    ({"seed": -1}, "integer in [0, 4294967295]"),
    ({"alpha": 0}, "finite number in (0, inf)"),
    ({"dropout": 1.0}, "finite number in [0, 1)"),
    ({"init": "xavier"}, "one of kaiming | gaussian"),
    ({"subset_selection": None}, "True or False"),
    ({"private_shards": -1}, "integer >= 0"),
    ({"private_shards": 1, "subset_selection": False}, "turn subset_selection on or set private_shards=0"),
    ({"rank": 4, "budget_rank": 4, "private_rank": 3, "private_shards": 2},
     "set private_shards <= 1 or raise rank"),
    ({"rank": 8, "budget_rank": 2, "private_rank": 1, "shards_per_vector": 2, "private_shards": 3},
     "set private_shards <= 2 or raise budget_rank"),
])
def test_messages_state_the_allowed_range(kwargs, allowed):
    with pytest.raises(ConfigError, match=re.escape(allowed)):
        MoSConfig(**kwargs)


def _train_config(tmp_path, **kw):
    from moslora.train import TrainConfig

    return TrainConfig(**{"output_dir": str(tmp_path / "run"), **kw})


@pytest.mark.parametrize("kwargs, field", [
    ({"method": "dora"}, "method"),
    ({"method": None}, "method"),
    ({"task": "sentimental"}, "task"),
    ({"task": "{tmp}/missing.jsonl"}, "task"),
    ({"task": "{tmp}/data.txt"}, "task"),
    ({"task": 3}, "task"),
    ({"model": "{tmp}/no-model"}, "model"),
    ({"model": 7}, "model"),
    ({"output_dir": ""}, "output_dir"),
    ({"output_dir": "{tmp}/file"}, "output_dir"),
    ({"mos": "q_proj"}, "mos"),
    ({"mos": {"rank": 0}}, "rank"),
    ({"mos": {"rnak": 2}}, "rnak"),
    ({"max_steps": 0}, "max_steps"),
    ({"batch_size": 2.0}, "batch_size"),
    ({"grad_accum": 0}, "grad_accum"),
    ({"eval_steps": -1}, "eval_steps"),
    ({"train_examples": 0}, "train_examples"),
    ({"eval_examples": 0}, "eval_examples"),
    ({"test_examples": 0}, "test_examples"),
    ({"max_length": 7}, "max_length"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": 1.0}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"learning_rate": "1e-3"}, "learning_rate"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"warmup_ratio": -0.1}, "warmup_ratio"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"weight_decay": float("inf")}, "weight_decay"),
    ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"max_grad_norm": float("nan")}, "max_grad_norm"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
    ({"load_in_4bit": 1}, "load_in_4bit"),
    ({"progress": None}, "progress"),
    ({"resume": True}, "resume"),  # no checkpoint to resume from
])
def test_bad_train_config_values_name_the_field(kwargs, field, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "data.txt").write_text("x")
    kwargs = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ConfigError, match=field) as err:
        _train_config(tmp_path, **kwargs)
    assert err.value.field == field


def test_a_good_train_config_passes(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}")
    cfg = _train_config(tmp_path, task=str(tmp_path / "data.jsonl"), model="smollm2", mos={"rank": 4})
    assert cfg.mos.rank == 4


@pytest.mark.parametrize("cfg, message", [
    (MoSConfig(target_modules=["q_proj", "qkv"], rank=2), r"target_modules \['qkv'\] matched no module in "
                                                         r"LlamaForCausalLM; its linear layers end in \["),
    (MoSConfig(target_modules=r".*\.attn\..*", rank=2), "regex .* matched no module; linear layers look like"),
    (MoSConfig(target_modules=["mlp"], rank=2), r"matched modules that are not linear layers: .*LlamaMLP"),
    (MoSConfig(target_modules=["q_proj"], rank=2, shards_per_vector=3),
     "shards_per_vector=3 does not divide d_in=64 .* choose a shards_per_vector that divides both"),
    (MoSConfig(target_modules=["q_proj"], rank=9, budget_rank=2),
     "rank=9 cannot be met .* the largest rank that fits is 8"),
])
def test_targets_that_do_not_fit_the_model_are_explained(llama, cfg, message):
    with pytest.raises(ValueError, match=message):
        get_mos_model(llama, cfg)


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


def draw_private_shards(data, c: dict) -> int:
    """A ``private_shards`` that ``MoSConfig`` accepts for ``c`` (at least 1 where one is)."""
    most = min((c["r"] - c["p"]) * c["l"], (c["e"] - c["p"]) * c["l"])
    return data.draw(st.integers(min(1, most), most))


@pytest.mark.parametrize("layer_scale, private_shards", [(False, False), (True, False), (False, True),
                                                         (True, True)])
def test_budget_never_exceeds_lora(layer_scale, private_shards):
    tally = {"asserted": 0, "refused": 0}

    @settings(max_examples=300, deadline=None)
    @given(budgets(), st.data())
    def check(c, data):
        if private_shards:  # they need subset selection
            c = {**c, "subset": True, "k": draw_private_shards(data, {**c, "subset": True})}
        k = c.get("k", 0)
        try:
            cfg = MoSConfig(rank=c["r"], budget_rank=c["e"], shards_per_vector=c["l"],
                            private_rank=c["p"], subset_selection=c["subset"], layer_scale=layer_scale,
                            private_shards=k)
            plan = solve_pools(cfg, c["layers"], c["d_in"], c["d_out"])
        except ValueError as err:
            assert str(err)  # a refusal says why
            tally["refused"] += 1
            assume(False)
        assert plan.total_params <= plan.lora_params(c["e"])
        if c["subset"]:  # the pools take what is left; the scales cost less than one shard more
            shard = (c["d_in"] + c["d_out"]) // c["l"]
            assert plan.lora_params(c["e"]) - plan.total_params < (shard if layer_scale else 1)
        # a layer's public draws always fit in the public rows, its private shards after them
        assert plan.public_shards >= (c["r"] - c["p"]) * c["l"] - k
        assert plan.shards == plan.public_shards + c["layers"] * k and plan.private_shards == k
        tally["asserted"] += 1

    check()
    # the scales refuse the narrowest drawn layers, where r·L outweighs the spare shards; the
    # private shards, the settings whose rank only just fits
    floor = {(False, False): 0.9, (True, False): 0.6, (False, True): 0.6, (True, True): 0.4}
    assert tally["asserted"] >= floor[layer_scale, private_shards] * sum(tally.values()), tally


def test_private_shards_refusals_give_advice_that_holds():
    """When the pools are too small, the error names the largest private_shards or rank that
    fits: that one is accepted and one more is refused."""
    tally = {"private_shards": 0, "rank": 0, "accepted": 0}

    def plan(c: dict, **change):
        cfg = dict(rank=c["r"], budget_rank=c["e"], shards_per_vector=c["l"], private_rank=c["p"],
                   private_shards=c["k"])
        cfg.update(change)
        return solve_pools(MoSConfig(**cfg), c["layers"], c["d_in"], c["d_out"])

    @settings(max_examples=300, deadline=None)
    @given(budgets(), st.data())
    def check(c, data):
        c = {**c, "r": c["r"] + data.draw(st.integers(0, 2))}  # now and then past what fits
        c = {**c, "k": draw_private_shards(data, c)}
        assume(c["k"] > 0)
        try:
            plan(c)
        except ConfigError as err:
            tally[err.field] += 1
            if err.field == "private_shards":
                fits = int(re.search(r"set private_shards <= (\d+)", str(err))[1])
                assert fits < c["k"]
                plan(c, private_shards=fits)
                with pytest.raises(ConfigError):
                    plan(c, private_shards=fits + 1)
            else:
                assert err.field == "rank"
                fits = int(re.search(r"the largest rank that fits is (\d+)", str(err))[1])
                plan(c, rank=fits)
                with pytest.raises(ConfigError):
                    plan(c, rank=fits + 1)
            return
        tally["accepted"] += 1

    check()
    assert min(tally.values()) >= 10, tally


def test_private_shards_at_budget_rank_one_privatize_part_of_a_rank():
    # e = 1 forbids a private rank (no pool would be left); half a rank can still be private
    with pytest.raises(ConfigError, match="private_rank"):
        MoSConfig(rank=4, budget_rank=1, private_rank=1)
    cfg = MoSConfig(rank=4, budget_rank=1, private_rank=0, shards_per_vector=2, private_shards=1)
    plan = solve_pools(cfg, num_layers=8, d_in=32, d_out=16)
    assert plan.shards == 1 * 8 * 2 and plan.public_shards == 16 - 8
    assert plan.private_params == 8 * 1 * (16 + 8) and plan.public_params == 8 * (16 + 8)
    assert plan.total_params == plan.lora_params(1)


def test_private_shards_that_crowd_out_the_public_rows_are_refused_by_name():
    # 4 layers, e = 2, l = 2: 16 pool rows; k = 3 each leaves 4 public, but a layer draws 8 - 3
    cfg = MoSConfig(rank=4, budget_rank=2, shards_per_vector=2, private_shards=3)
    with pytest.raises(ConfigError, match="set private_shards <= 2, lower rank") as err:
        solve_pools(cfg, num_layers=4, d_in=8, d_out=8)
    assert err.value.field == "private_shards"
    # beyond what any private_shards allows, the rank is at fault, and the largest that fits
    # counts the private shards' rows: (16 - 4 + 1) // 2
    cfg = MoSConfig(rank=9, budget_rank=2, shards_per_vector=2, private_shards=1)
    with pytest.raises(ConfigError, match="rank=9 cannot be met.*largest rank that fits is 6") as err:
        solve_pools(cfg, num_layers=4, d_in=8, d_out=8)
    assert err.value.field == "rank"


def test_layer_scale_that_eats_the_pool_is_refused_by_name():
    cfg = MoSConfig(rank=8, budget_rank=2, private_rank=1, layer_scale=True)
    with pytest.raises(ConfigError, match="layer_scale") as err:
        solve_pools(cfg, num_layers=8, d_in=2, d_out=2)  # 64 scales vs 8 shards of 4 numbers
    assert err.value.field == "layer_scale"
    plan = solve_pools(cfg, num_layers=8, d_in=64, d_out=64)
    assert plan.shards == 8 - 1 and plan.scale_params == 64  # one shard pays for the scales


def test_bf16_without_support_is_a_clear_error(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="bf16=True needs a GPU with bfloat16 support") as err:
        _train_config(tmp_path, bf16=True)
    assert err.value.field == "bf16"
    assert not _train_config(tmp_path).use_bf16


@pytest.mark.parametrize("kwargs, field", [({"lr_scheduler": "cosine_annealing"}, "lr_scheduler"),
                                           ({"eval_steps": 4, "save_steps": 6}, "save_steps"),
                                           ({"logging_steps": 0}, "logging_steps"),
                                           ({"eval_file": "{tmp}/missing.jsonl"}, "eval_file")])
def test_bad_new_train_options_name_the_field(kwargs, field, tmp_path):
    kwargs = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ConfigError, match=field) as err:
        _train_config(tmp_path, **kwargs)
    assert err.value.field == field


def test_every_lr_scheduler_is_one_of_transformers():
    from transformers import SchedulerType

    from moslora.train_config import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}


def test_config_error_survives_pickling_with_its_field():
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("rank", "rank must be an integer >= 1, got 0")))
    assert isinstance(err, ConfigError) and err.field == "rank" and "got 0" in str(err)
