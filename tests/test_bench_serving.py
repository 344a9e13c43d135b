"""The serving benchmark's own parts: the decode clock on a real generate, and the README table."""

import torch
from conftest import tiny_llama

from benchmarks.serving import StepClock, paired_ratios, serving_markdown


def test_the_clock_times_the_decoding_steps_of_a_real_generate():
    clock = StepClock()
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(0))
    tiny_llama().generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, streamer=clock)
    assert len(clock.stamps) == 1 + 6, "generate puts the prompt, then each new token"
    assert clock.stamps == sorted(clock.stamps)
    clock.record("merged")
    assert clock.stamps == [] and len(clock.decode["merged"]) == 1 and clock.decode["merged"][0] > 0
    clock.put(None), clock.put(None)
    clock.record(None)  # a warm-up call: dropped
    assert clock.stamps == [] and list(clock.decode) == ["merged"] and len(clock.decode["merged"]) == 1


def test_the_table_takes_paired_ratios_per_repetition():
    times = {"mos": [1.0, 2.0, 4.0], "merged": [0.9, 1.0, 3.6], "peft": [2.0, 3.0, 12.0]}
    assert paired_ratios(times, "mos", "peft") == [2.0, 1.5, 3.0]
    row = {"adapters": 50, "seconds": {"prefill": times, "decode": {"mos": [1.0, 1.0], "mos_torch": [1.2, 1.5]}}}
    memory = {"adapters": 50, "distinct_over_lora_8e": 0.12758, "same_seed_over_lora_8e": 0.125049}
    result = {"date": "2026-12-07T10:00:00+00:00",
              "tracks": [{"name": "smollm2", "memory": [memory], "runs": [{"threads": 1, "rows": [row]}]}]}
    line = serving_markdown(result).splitlines()[2]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:5] == ["smollm2 (2026-12-07)", "1", "50", "0.1276", "0.12505"]
    assert cells[5] == "0.90 [0.50, 0.90]"  # prefill vs merged: 0.9, 0.5, 0.9
    assert cells[6] == "2.00 [1.50, 3.00]"  # prefill vs PEFT
    assert cells[7] == "–" and cells[8] == "–", "a system not run is a dash, not a number"
    assert cells[9] == "1.35 [1.20, 1.50]" and cells[10:] == ["–", "–"]
