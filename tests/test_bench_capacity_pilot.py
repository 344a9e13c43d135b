"""The capacity pilot's paired gaps (#27 item 4): differences by seed, only seeds both settings
ran, and no gap from fewer than two seeds."""

from __future__ import annotations

import pytest

from benchmarks.capacity_pilot import ADAPTERS, VARIANTS, paired, pilot_markdown


def row(label: str, seed: int, bits: float, task: str = "codebook:1024") -> dict:
    return {"task": task, "epochs": 8, "lr": 3e-3, "seed": seed, "label": label, "bits": bits}


def test_a_gap_pairs_seeds_and_ignores_other_regimes_and_unpaired_seeds():
    low, high = ADAPTERS[0].label, ADAPTERS[1].label
    rows = [row(low, 0, 10.0), row(low, 1, 20.0), row(low, 2, 5.0), row(high, 0, 14.0), row(high, 1, 30.0),
            row(high, 0, 1e6, task="facts:256")]
    gap = paired(rows, "codebook:1024", 8, 3e-3, low, high)
    assert gap["diffs_bits"] == [4.0, 10.0] and gap["seeds"] == 2
    assert gap["mean_bits"] == pytest.approx(7.0) and gap["se_bits"] == pytest.approx(3.0)
    assert gap["z"] == pytest.approx(7.0 / 3.0) and (gap["low"], gap["high"]) == (low, high)
    assert paired(rows[:1] + rows[3:4], "codebook:1024", 8, 3e-3, low, high) is None


def test_the_variants_are_labelled_apart_from_the_mos_they_pair_with():
    labels = [a.label for a in ADAPTERS + VARIANTS]
    assert len(set(labels)) == len(labels) and all(v.budget == ADAPTERS[2].budget for v in VARIANTS)


def test_the_table_reports_each_gap_and_mos_gap_recovery():
    low, high, mos = (a.label for a in ADAPTERS)
    rows = [row(label, seed, bits) | {"exact": 0.5, "params": 10}
            for label, base in ((low, 100.0), (high, 300.0), (mos, 150.0)) for seed, bits in ((0, base), (1, base + 2))]
    summary = {"runs": rows, "paired_gaps": [paired(rows, "codebook:1024", 8, 3e-3, low, high),
                                             paired(rows, "codebook:1024", 8, 3e-3, low, mos)]}
    text = pilot_markdown(summary)
    assert f"| codebook:1024 | 8 | 3e-03 | {high} | 10 | 2 | 0.500 ± 0.000 | 301 ± 1 |" in text
    assert f"{high} − {low} = +200 bits" in text and "recovers 0.25 of LoRA's rank gap" in text


@pytest.mark.parametrize("mos_bits, layer_scale_bits, words", [
    ((150.0, 152.0, 149.0), (-50.0, 10.0, -20.0), ("recovers 0.24 of", "the default stays the paper's MoS")),
    ((90.0, 150.0, 110.0), (260.0, 262.0, 261.0), ("appears to recover", "it wins on two tasks")),
    ((80.0, 70.0, 95.0), (0.0, 0.0, 0.0), ("does not recover any of", "spend the memory on LoRA's rank")),
])
def test_when_to_use_mos_follows_the_pilot_gaps(mos_bits, layer_scale_bits, words):
    """The pilot's clauses in "When to use MoS" are chosen by its paired gaps (z >= 3 or not),
    next to the committed capacity model's verdict (where the layer scale won)."""
    import json
    from pathlib import Path

    from benchmarks.capacity import guidance_markdown

    model = json.loads((Path(__file__).parents[1] / "results" / "capacity_model.json").read_text())
    low, high, mos = (a.label for a in ADAPTERS)
    scaled = VARIANTS[0].label
    rows = [row(low, s, 100.0 + s) for s in range(3)] + [row(high, s, 300.0 + 3 * s) for s in range(3)]
    rows += [row(mos, s, b) for s, b in enumerate(mos_bits)]
    rows += [row(scaled, s, b + d) for s, (b, d) in enumerate(zip(mos_bits, layer_scale_bits))]
    gaps = [paired(rows, "codebook:1024", 8, 3e-3, a, b) for a, b in ((low, high), (low, mos), (mos, scaled))]
    text = guidance_markdown(model, {"paired_gaps": gaps})
    assert all(w in text for w in words), text


def test_the_rate_bracket_picks_each_adapters_best_rate_flags_edges_and_pairs_at_the_best():
    from benchmarks.capacity_pilot import bracket_markdown, rate_bracket

    low, high, mos = (a.label for a in ADAPTERS)
    means = {low: {1e-3: 100.0, 2e-3: 120.0, 4e-3: 110.0},   # interior
             high: {1e-3: 200.0, 2e-3: 250.0, 4e-3: 300.0},  # best at the top: not bracketed
             mos: {1e-3: 130.0, 2e-3: 125.0, 4e-3: 90.0}}    # best at the bottom
    rows = [row(label, seed, bits + seed * (1 + i)) | {"lr": lr}
            for i, (label, grid) in enumerate(means.items()) for lr, bits in grid.items() for seed in range(3)]
    b = rate_bracket(rows, "codebook:1024", 8)
    assert {k: (f["best_lr"], f["at_edge"]) for k, f in b["families"].items()} == {
        low: (2e-3, False), high: (4e-3, True), mos: (1e-3, True)}
    rank, gain = b["gaps_at_best"]
    # paired by seed across the two rates: high@4e-3 (300 + 2s) minus low@2e-3 (120 + s)
    assert rank["diffs_bits"] == [180.0, 181.0, 182.0] and rank["high_lr"] == 4e-3 and rank["lr"] == 2e-3
    assert gain["high"] == mos and gain["mean_bits"] == pytest.approx(133 - 121)  # mos@1e-3 (130 + 3s)
    text = bracket_markdown({"rate_brackets": [b]})
    assert f"| {high} | 202 | 252 | **302** | 4.0e-03 (at an edge: not bracketed) |" in text
    assert f"| {low} | 101 | **121** | 111 | 2.0e-03 (interior) |" in text
    assert "gap recovery at the best rates: 0.07" in text  # 12 / 181


def test_when_to_use_mos_takes_the_gaps_at_the_best_rates_when_a_bracket_exists():
    """Tuned rates replace the one-rate gaps: a rank gap that vanishes once LoRA@e's rate is
    tuned says so (and makes no claim about MoS); one that holds is quoted "each at its best rate"."""
    import json
    from pathlib import Path

    from benchmarks.capacity import guidance_markdown
    from benchmarks.capacity_pilot import rate_bracket

    model = json.loads((Path(__file__).parents[1] / "results" / "capacity_model.json").read_text())
    low, high, mos = (a.label for a in ADAPTERS)
    one_rate = [row(low, s, 100.0 + s) for s in range(3)] + [row(high, s, 300.0 + 3 * s) for s in range(3)]
    one_rate += [row(mos, s, 200.0 + s * s) for s in range(3)]
    pilot = {"paired_gaps": [paired(one_rate, "codebook:1024", 8, 3e-3, low, b) for b in (high, mos)]}
    # LoRA r = 1 at 6e-3 per seed: within noise of LoRA r = 8's 300, 303, 306 (z < 3), or far below it
    for low_top, words in (((296.0, 310.0, 292.0), "learns the rule about as well as"),
                           ((150.0, 151.0, 154.0), "each at its best rate")):
        tuned = one_rate + [row(low, s, b) | {"lr": 6e-3} for s, b in enumerate(low_top)]
        tuned += [row(label, s, bits + s * s) | {"lr": 6e-3} for label, bits in ((high, 290.0), (mos, 190.0))
                  for s in range(3)]
        tuned += [row(label, s, 10.0 + s) | {"lr": 1.5e-3} for label in (low, high, mos) for s in range(3)]
        rates = {"rate_brackets": [rate_bracket(tuned, "codebook:1024", 8)]}
        text = guidance_markdown(model, pilot, rates)
        assert words in text, text
