"""The capacity track's headline numbers on hand-made results whose answers are known."""

from __future__ import annotations

import math

import pytest

from benchmarks import capacity

LORA_PARAMS = 1000  # LoRA@1; LoRA@r has r times as many


def row(method: str, budget: int, rank: int, accuracy: list[float], tag: str = "",
        params: int | None = None) -> dict:
    bits = [1000 * a for a in accuracy]
    loss = [4.6 * (1 - a) for a in accuracy]
    stat = lambda v: {"mean": sum(v) / len(v), "std": 0.0}  # noqa: E731
    return {"label": f"{method} e={budget} r={rank} {tag}".strip(), "lr": 1e-3,
            "adapter": {"method": method, "budget": budget, "rank": rank, "tag": tag},
            "adapter_params": params or (rank if method == "lora" else budget) * LORA_PARAMS,
            "adapter_bytes": 4 * (params or LORA_PARAMS), "seeds": list(range(len(accuracy))),
            "accuracy": stat(accuracy), "bits": stat(bits), "loss": stat(loss),
            "per_seed": {"accuracy": accuracy, "bits": bits, "loss": loss}}


def lora_curve() -> list[dict]:
    # LoRA's quality grows linearly in log2(rank): 0.1 at r=1 up to 0.5 at r=16
    return [row("lora", r, r, [0.1 * (1 + math.log2(r)) + d for d in (-0.01, 0.0, 0.01)])
            for r in (1, 2, 4, 8, 16)]


def track(mos_accuracy: list[float]) -> dict:
    rows = lora_curve() + [row("mos", 1, 8, mos_accuracy),
                           row("mos", 2, 16, [0.3, 0.3, 0.3]),
                           row("mos", 2, 16, [0.25, 0.2, 0.3], tag="pure sharing")]
    curve = [row("lora", 1, 1, [0.5, 0.5, 0.5]), row("lora", 8, 8, [0.9, 0.9, 0.8]),
             row("mos", 1, 8, [0.7, 0.7, 0.7])]
    return {"spec": {"budgets": [1, 2], "epochs": 6, "batch_size": 16},
            "tasks": {"facts:256": {"results": rows, "learning_rates": {"lora": {"lr": 1e-3}}},
                      "facts:64": {"results": curve, "learning_rates": {}}}}


def test_recovery_is_zero_at_lora_e_and_one_at_lora_8e():
    lora = {r["adapter"]["rank"]: r for r in lora_curve()}
    at_8e = capacity.headline(track(lora[8]["per_seed"]["accuracy"]))["budgets"][1]["mos"][0]
    at_e = capacity.headline(track(lora[1]["per_seed"]["accuracy"]))["budgets"][1]["mos"][0]
    for metric in ("accuracy", "bits", "loss"):  # loss: lower is better, the ratio is the same
        assert at_8e["recovery"][metric]["value"] == pytest.approx(1.0)
        assert at_e["recovery"][metric]["value"] == pytest.approx(0.0, abs=1e-12)


def test_worth_reads_the_lora_curve_in_log_parameters():
    h = capacity.headline(track([0.3, 0.3, 0.3]))  # LoRA r=4's quality at LoRA r=1's count
    mos = h["budgets"][1]["mos"][0]
    assert mos["worth"]["accuracy"]["value"] == pytest.approx(4.0)
    assert mos["worth"]["loss"]["value"] == pytest.approx(4.0)
    halfway = capacity.headline(track([0.35] * 3))["budgets"][1]["mos"][0]  # between r=4 and 8
    assert halfway["worth"]["accuracy"]["value"] == pytest.approx(math.sqrt(32))
    below = capacity.headline(track([0.0] * 3))["budgets"][1]["mos"][0]
    assert below["worth"]["accuracy"]["value"] == 0.0 and capacity._k(below["worth"]["accuracy"]).startswith("<1×")


def test_paired_gap_and_bootstrap_interval():
    h = capacity.headline(track([0.3, 0.2, 0.4]))
    gap = h["budgets"][1]["lora_gap"]["accuracy"]  # r=8 - r=1 is exactly 0.3 on every seed
    assert gap["mean"] == pytest.approx(0.3) and gap["se"] == pytest.approx(0.0, abs=1e-12)
    rec = h["budgets"][1]["mos"][0]["recovery"]["accuracy"]
    assert rec["low"] < rec["value"] < rec["high"]  # seeds disagree: the interval has width
    loss_gap = h["budgets"][1]["lora_gap"]["loss"]
    assert loss_gap["mean"] > 0  # signed so that better is positive, also for a loss


def test_ablation_and_low_data_curve():
    h = capacity.headline(track([0.3] * 3))
    delta = h["ablation"]["deltas"]["pure sharing"]["accuracy"]
    assert h["ablation"]["full"] == "mos e=2 r=16" and delta["value"] == pytest.approx(-0.05)
    assert list(h["low_data"]) == ["facts:64", "facts:256"]  # by size


def test_low_data_recovery_value():
    h = capacity.headline(track([0.3] * 3))
    # facts:64: LoRA@1 0.5, LoRA@8 0.8667, MoS 0.7 -> (0.7 - 0.5) / (0.8667 - 0.5)
    assert h["low_data"]["facts:64"]["recovery"]["accuracy"]["value"] == pytest.approx(0.2 / (2.6 / 3 - 0.5))


def test_markdown_and_plot(tmp_path):
    result = track([0.3, 0.2, 0.4])
    text = capacity.capacity_markdown(result)
    assert "gap recovered" in text and "pure sharing" in text and "| 64 |" in text
    capacity.plot_capacity(result, tmp_path / "capacity.png")
    assert (tmp_path / "capacity.png").stat().st_size > 10_000
