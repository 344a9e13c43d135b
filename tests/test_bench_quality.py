"""The quality benchmark's quick mode end to end (encoder track), its cache and its report."""

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import RunStore, quality, report

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') skips this file



@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result = quality.run_quality(quick=True, results_dir=out, tracks=["encoder"])
    ablation = quality.run_ablation(quick=True, results_dir=out)
    return out, result, ablation


def test_quick_quality_writes_schema_and_finite_metrics(quick):
    out, result, _ = quick
    saved = json.loads((out / "quick" / "quality.json").read_text())
    assert saved["tracks"].keys() == {"encoder"} and saved["environment"]["versions"]["torch"]
    assert (out / "quick" / "quality.png").stat().st_size > 0
    table = saved["tracks"]["encoder"]["tasks"]["sentiment"]
    assert table["test_examples"] == quality.SPECS["encoder"].quick().test_examples
    rows = table["results"]
    assert {r["adapter"]["method"] for r in rows} == {"lora", "vera", "vblora", "mos", "lora-eq"}
    for r in rows:
        for metric in ("accuracy", "loss"):
            assert math.isfinite(r[metric]["mean"]), (r["label"], metric)
        assert 0 <= r["accuracy"]["mean"] <= 1 and r["adapter_bytes"] > 0 and r["diverged"] == 0


def test_quick_quality_budgets_are_matched(quick):
    _, result, _ = quick
    rows = result["tracks"]["encoder"]["tasks"]["sentiment"]["results"]
    e = result["tracks"]["encoder"]["spec"]["budgets"][0]
    by = {(r["adapter"]["method"], r["adapter"]["rank"] or r["adapter"]["budget"]): r for r in rows}
    lora_e = by["lora", e]["adapter_params"]
    assert by["lora-eq", e]["adapter_params"] == lora_e  # the LoRA-equivalent setting is LoRA@e
    assert all(r["adapter_params"] <= lora_e for r in rows if r["adapter"]["method"] == "mos")
    assert abs(by["vblora", e]["adapter_params"] / lora_e - 1) < 0.05
    assert by["lora", 8 * e]["adapter_params"] == 8 * lora_e
    head = {r["head_params"] for r in rows}
    assert head == {2 * 384 + 2}  # the same classification head for every method, counted apart


def test_quick_ablation_has_every_variant(quick):
    out, _, ablation = quick
    tags = [report.variant_name(r) for r in ablation["results"] if r["adapter"]["method"] == "mos"]
    assert tags == ["full", "no subset selection", "no pair dissociation", "no vector sharding",
                    "no privatization", "pure sharing"]
    assert all(math.isfinite(r["accuracy"]["mean"]) for r in ablation["results"])
    assert (out / "quick" / "ablation.png").stat().st_size > 0


def test_finished_runs_are_reused(quick):
    out, result, _ = quick
    store = out / "quick" / "runs.jsonl"
    before = store.read_text()
    again = quality.run_quality(quick=True, results_dir=out, tracks=["encoder"])
    assert store.read_text() == before  # nothing trained again
    assert again["tracks"]["encoder"]["tasks"] == result["tracks"]["encoder"]["tasks"]


def test_a_run_does_not_depend_on_the_process_it_ran_in(quick, tmp_path):
    out, result, _ = quick
    record = next(iter(RunStore(out / "quick" / "runs.jsonl").records.values()))
    spec = quality.SPECS[record["run"]["track"]].quick()
    run = quality.RunSpec(**{**record["run"], "adapter": quality.Adapter(**record["run"]["adapter"])})
    assert run.key == record["key"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker of two on two cores
    try:
        again = quality.train_and_evaluate(quality.loaded_track(spec), quality.loaded_task(run.task, spec),
                                           run, tmp_path)
    finally:
        torch.set_num_threads(threads)
    for metric in ("val_accuracy", "test_accuracy", "test_loss", "last_loss", "adapter_params"):
        assert again[metric] == record[metric], metric


def test_zero_shot_reference_trains_nothing(quick, tmp_path):
    spec = quality.SPECS["encoder"].quick()
    track = quality.loaded_track(spec)
    before = {k: v.clone() for k, v in track.base.state_dict().items()}
    run = quality._run_spec(spec, "sentiment", quality.Adapter("none", 0), 0.0, 0)
    record = quality.train_and_evaluate(track, quality.loaded_task("sentiment", spec),
                                        dataclasses.replace(run, steps=0), tmp_path)
    assert record["adapter_params"] == record["adapter_bytes"] == 0 and record["label"].startswith("no adapter")
    assert 0 <= record["test_accuracy"] <= 1 and math.isfinite(record["test_loss"])
    assert all(torch.equal(before[k], v) for k, v in track.base.state_dict().items())


WORKERS_THEN_WAIT = """
import os, time
from benchmarks import quality

if __name__ == "__main__":  # spawned workers import this file too
    pool = quality.Runner(None, None, None, workers=2)._pool()
    print(*{pool.submit(os.getpid).result() for _ in range(4)}, flush=True)
    time.sleep(60)
"""


def test_workers_die_with_the_suite(tmp_path):
    script = tmp_path / "suite.py"
    script.write_text(WORKERS_THEN_WAIT)
    # the checkout's root on the path, as pytest's pythonpath option puts it on ours
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    suite = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    workers = {int(pid) for pid in suite.stdout.readline().split()}
    assert workers and suite.pid not in workers
    suite.kill()  # SIGKILL: no chance to shut its pool down
    suite.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_run_store_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    RunStore(path).add({"key": "a", "x": 1})
    with path.open("a") as f:
        f.write('{"key": "b", "x"')  # killed mid-append
    assert RunStore(path).records == {"a": {"key": "a", "x": 1}}


def test_report_replaces_only_its_section(quick, tmp_path):
    out, _, _ = quick
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n")
    report.write_report(out / "quick", readme)
    first = readme.read_text()
    assert first.startswith("# title\n\nintro\n") and "| LoRA r=4 |" in first
    report.write_report(out / "quick", readme)
    assert readme.read_text() == first  # idempotent: the section is replaced, not appended


def test_a_field_at_its_default_keeps_the_cached_keys():
    spec = quality.SPECS["encoder"]
    run = quality._run_spec(spec, "sentiment", quality.Adapter("lora", 4, rank=4), 1e-3, 0)
    added = ("system", "bf16")  # fields added with a default after runs were cached
    before = {k: v for k, v in dataclasses.asdict(run).items() if k not in added}  # the old fields
    del before["adapter"]["options"]  # likewise the adapter's, added after runs were cached
    assert run.key == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert dataclasses.replace(run, system="").key != run.key
    assert dataclasses.replace(run, bf16=True).key != run.key
    variant = dataclasses.replace(run.adapter, options=(("layer_scale", True),))
    assert dataclasses.replace(run, adapter=variant).key != run.key
    llm = quality._run_spec(quality.SPECS["llm"], "sentiment", quality.Adapter("lora", 2, rank=2), 1e-3, 0)
    assert llm.system == "" and llm.key != dataclasses.replace(llm, system=None).key


def test_only_the_sweeps_seed_is_validated(tmp_path):
    spec = quality.SPECS["encoder"].quick()
    run = quality._run_spec(spec, "sentiment", quality.Adapter("lora", 4, rank=4), 1e-3, 1)
    record = quality.train_and_evaluate(quality.loaded_track(spec), quality.loaded_task("sentiment", spec),
                                        dataclasses.replace(run, steps=1), tmp_path)
    assert math.isnan(record["val_accuracy"]) and math.isfinite(record["test_accuracy"])


def test_pick_rate_takes_the_smallest_rate_within_one_standard_error():
    # best 0.74 on 200 examples: one standard error is 3.1 points, so 0.73 ties and 0.70 does not
    assert quality.pick_rate({1e-4: 0.70, 3e-4: 0.73, 1e-3: 0.74, 3e-3: 0.52}, 200) == 3e-4
    assert quality.pick_rate({1e-4: 0.70, 3e-4: 0.73, 1e-3: 0.74}, 20_000) == 1e-3
    assert quality.pick_rate({1e-3: math.nan, 3e-3: 0.6}, 200) == 3e-3  # diverged runs never win
    assert quality.pick_rate({1e-3: math.nan, 3e-3: math.nan}, 200) == 1e-3


def test_vera_matches_the_lora_count_and_runs_once_when_capped():
    small = [(16, 16), (16, 48)] * 4  # an uncapped rank: VeRA matches LoRA@e's count
    for e in (2, 4):
        r, matched = quality.vera_rank(small, e)
        assert r == matched
        vera = r * len(small) + sum(o for _, o in small)
        assert abs(vera - e * sum(i + o for i, o in small)) <= len(small) / 2
    methods = [a.method for a in quality.suite((2, 4), 4, small)]
    assert methods.count("vera") == 2
    wide = [(384, 384)] * 36  # MiniLM-sized: both budgets hit the cap, so one VeRA setting
    assert quality.vera_rank(wide, 4)[0] == quality.vera_rank(wide, 8)[0] == quality.VERA_MAX_RANK
    methods = [a.method for a in quality.suite((4, 8), 6, wide)]
    assert methods.count("vera") == 1 and methods.count("vblora") == 2


def test_quick_capacity_track_end_to_end(tmp_path):
    """The capacity track's smoke run: every setting, memorization metrics, its report."""
    from benchmarks import capacity

    result = quality.run_quality(quick=True, results_dir=tmp_path, tracks=["capacity"])
    track = result["tracks"]["capacity"]
    rows = track["tasks"]["facts:256"]["results"]
    labels = {r["label"] for r in rows}
    assert {"LoRA r=1", "LoRA r=8", "MoS e=1 r=8", "MoS e=1 r=30", "no adapter (zero-shot)",
            "MoS e=2 r=16 (pure sharing)", "MoS e=2 r=16 (no privatization)"} <= labels
    for r in rows:
        assert set(r["per_seed"]) == {"accuracy", "loss", "bits"}, r["label"]
        assert all(math.isfinite(v) for vs in r["per_seed"].values() for v in vs), r["label"]
        assert 0 <= r["accuracy"]["mean"] <= 1
    mos = next(r for r in rows if r["label"] == "MoS e=1 r=8")
    lora = next(r for r in rows if r["label"] == "LoRA r=1")
    assert mos["adapter_params"] == lora["adapter_params"]  # MoS@e costs LoRA@e, at r = 8e
    text = capacity.capacity_markdown(track)
    assert "gap recovered" in text and "worth LoRA" in text
    (tmp_path / "README.md").write_text("# title\n")
    report.write_report(tmp_path / "quick", tmp_path / "README.md")
    assert "### Capacity: where rank matters" in (tmp_path / "README.md").read_text()
    assert (tmp_path / "quick" / "capacity.png").stat().st_size > 10_000


def test_quick_mode_uses_bf16_only_where_it_runs_natively(monkeypatch):
    """Emulated bf16 made the capacity smoke run take 18 of CI's 23 minutes on an AVX2 CPU."""
    full = quality.SPECS["capacity"]
    assert full.bf16
    for native in (True, False):
        monkeypatch.setattr(quality, "fast_bf16", lambda: native)
        assert full.quick().bf16 is native
        assert full.bf16  # the measured track keeps its setting (and its cached runs' keys)
