"""The capacity model's suite: its base, its sweep's bracketing, and its quick mode end to end."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import capacity, capacity_base, capacity_model
from benchmarks.quality import Adapter
from moslora import memorization


def test_word_tokenizer_makes_a_fact_seven_tokens():
    tok = capacity_base.word_tokenizer(32)
    for prompt, answer in memorization.facts(32):
        ids = tok(prompt + answer)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == ["<s>", *prompt[:-1].split(), ":", *answer.split()]
    assert tok.convert_ids_to_tokens(tok("Zzyx:")["input_ids"]) == ["<s>", "<unk>", ":"]  # not a fact's word


def test_edge_says_which_end_holds_the_best_rate():
    assert capacity_model._edge({1e-3: 2.0, 2e-3: 1.0, 4e-3: 3.0}) is None
    assert capacity_model._edge({1e-3: 0.5, 2e-3: 1.0, 4e-3: 3.0}) == "low"
    assert capacity_model._edge({1e-3: 2.0, 2e-3: 1.0, 4e-3: 0.5}) == "high"
    assert capacity_model._edge({1e-3: 2.0, 2e-3: 1.0, 4e-3: math.nan}) is None  # diverged above
    assert capacity_model._edge({1e-3: math.nan, 2e-3: math.nan}) == "low"


def test_plan_runs_lora_at_every_budget_and_8x_and_mos_at_4e_8e():
    from benchmarks.quality import attach

    adapters = [a for g in capacity_model.plan((2, 4, 8), 16) for a in g.adapters]
    assert sorted(a.rank for a in adapters if a.method == "lora") == [1, 2, 4, 8, 16, 32, 64]
    assert sorted((a.budget, a.rank) for a in adapters if a.method == "mos" and not a.tag) == [
        (2, 8), (2, 16), (4, 16), (4, 32), (8, 32), (8, 64)]
    # MoS settings and ablations at a budget share the sweep of MoS r = 8e there
    tagged = next(a for a in adapters if a.tag)
    assert capacity_model.probe(tagged, 16) == Adapter("mos", 2, rank=16, private=1)
    # the variants sweep their own rates, and their options reach MoSConfig
    variant = next(a for a in adapters if a.options)
    assert capacity_model.probe(variant, 16) == variant
    assert {a.tag for a in adapters if a.options} == {"layer scale", "pool lr ÷ √reuse", "pool A init ×¼",
                                                      "shard privatization"}
    # r = 16 routes every public shard, so the layer scales are paid for at r = 15
    assert next(a.rank for a in adapters if a.tag == "layer scale") == 15
    # half of full's private rank, as one private shard of l = 2 per layer and no private rank
    shard_private = next(a for a in adapters if a.tag == "shard privatization")
    assert (shard_private.rank, shard_private.private, shard_private.options) == (16, 0, (("private_shards", 1),))
    full = Adapter("mos", 2, rank=16, private=1)
    # every variant fits the budget (attach would refuse one that did not)
    params = {a.label: attach(capacity_base.capacity_model(vocab=128), a, capacity_base.TARGETS, seed=0)[0]
              .trainable_parameters() for a in [full, *(a for a in adapters if a.options)]}
    assert params[full.label] == params[shard_private.label] == 2 * capacity_base.LAYERS * (
        capacity_base.FFN + capacity_base.HIDDEN)  # both LoRA@2 exactly: down_proj is FFN -> HIDDEN


def test_a_variant_s_options_reach_its_mos_config():
    from benchmarks.quality import attach
    from conftest import tiny_llama

    variant = Adapter("mos", 2, rank=4, private=1, options=(("layer_scale", True), ("pool_init_scale", 0.5)))
    model, _ = attach(tiny_llama(), variant, ["down_proj"], seed=0)
    assert model.mos_config.layer_scale and model.mos_config.pool_init_scale == 0.5
    row = {"adapter": {**vars(variant), "options": [list(o) for o in variant.options]}}  # as JSON has it
    assert Adapter.from_dict(row["adapter"]) == variant


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("capacity-model")
    return out, capacity_model.run_capacity_model(quick=True, results_dir=out, workers=1)


def test_quick_suite_sweeps_until_interior_and_reports(quick):
    out, result = quick
    saved = json.loads((out / "quick" / "capacity_model.json").read_text())
    assert set(saved["axes"]) == set(capacity_model.AXES)
    for axis in saved["axes"].values():
        for rate in axis["learning_rates"].values():
            grid = sorted(float(lr) for lr in rate["grid"])
            assert rate["sweep_runs"] == len(grid) >= len(capacity_model.GRID)
            # interior, or the extensions ran out
            assert rate["at_edge"] or grid[0] < rate["lr"] < grid[-1]
        for row in axis["results"]:
            assert math.isfinite(row["bits"]["mean"]) and row["adapter_params"] > 0
    # the plateau check: seed 0 again, trained twice as long at the same rate
    assert {p["label"] for p in saved["plateau"]} == {"LoRA r=2", "MoS e=2 r=16"}
    for p in saved["plateau"]:
        assert p["steps"][1] == 2 * p["steps"][0] and math.isfinite(p["bits"][1])
    text = capacity.model_markdown(saved)
    assert "bits / param" in text and "LoRA r=16" in text and "twice as long" in text
    verdict = capacity.verdict_markdown(saved)
    assert verdict.count("gap recovered") == len(saved["axes"]) and "MoS e=2 r=16" in verdict
    guidance = capacity.guidance_markdown(saved)
    assert "Short training (equal steps)" in guidance and "Trained to convergence (convergence)" in guidance
    for name, axis in saved["axes"].items():  # the words follow the measured intervals
        recs = [max(m["recovery"]["bits"]["value"] for m in entry["mos"])
                for entry in capacity.headline(capacity._model_track(axis))["budgets"].values() if entry["mos"]]
        line = next(line for line in guidance.splitlines() if f"({name})" in line)
        assert ("stores less" in line) <= all(r < 0 for r in recs)
        assert ("a little more" in line) <= all(r > 0 for r in recs)
    assert (out / "quick" / "capacity_model.png").stat().st_size > 10_000
