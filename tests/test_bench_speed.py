"""The speed benchmark's measuring core on a tiny random Llama: schema and sane numbers."""

import json
import math

import pytest

from benchmarks import speed
from moslora import MoSConfig
from moslora.config import default_targets

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') skips this file


TINY = speed.Plan(
    models=(speed.ModelSpec("tiny", (64, 4, 128)),), shapes=((2, 16),), steps=2, warmup=0,
    memory_steps=2, sweep_model="tiny", sweep_seq=16, sweep_batches=(1, 4), sweep_steps=2,
    # 4 layers allow r <= 5 under subset selection at e = 2, p = 1
    mos=MoSConfig(target_modules=default_targets("llama"), rank=4, budget_rank=2, shards_per_vector=2,
                  private_rank=1))


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_measure_reports_every_method_shape_and_token_count(tmp_path):
    result = json.loads(json.dumps(speed.measure(TINY)))  # JSON-able, as written to speed.json

    assert result["benchmark"] == "speed" and result["plan"]["mos"]["rank"] == 4
    assert set(result["environment"]["versions"]) >= {"torch", "transformers", "peft"}
    trainable = result["models"]["tiny"]["trainable"]
    assert trainable["mos"] <= trainable["lora_e"] < trainable["lora_r"]  # MoS fits LoRA@e's budget
    assert [(r["batch"], r["seq"]) for r in result["rows"]] == [(2, 16)]
    for row in result["rows"]:
        for name in (*speed.METHODS, "assembly"):
            assert len(row["seconds"][name]) == 2 and all(map(_positive, row["seconds"][name]))
        assert set(row["peak_bytes"]) == set(speed.METHODS) and all(map(_positive, row["peak_bytes"].values()))
        for key in ("ratio", "memory_ratio"):
            assert set(row[key]) == {"mos/lora_r", "mos/lora_e"} and all(map(_positive, row[key].values()))
        assert 0 < row["assembly_share"] < 1
    points = result["sweep"]["points"]
    assert [p["tokens"] for p in points] == [16, 64]
    for p in points:
        assert _positive(p["median_seconds"]["base"]) and 0 < p["share"]["assembly"] < 1
        assert math.isfinite(p["share"]["adapter"])

    speed.plot_speed(result, tmp_path / "speed.png")
    assert (tmp_path / "speed.png").stat().st_size > 0
    assert "| tiny | 2 × 16 |" in speed.speed_markdown(result)
