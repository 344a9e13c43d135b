"""The capacity track's pilot: where does LoRA's rank buy quality?

Trains PEFT LoRA at e and 8e (and MoS@e at r = 8e) on candidate regimes (task size, epochs,
learning rate), one or more seeds, and records every run in results/capacity_pilot/ (a run
cache: run again to resume) with a summary JSON. The regime the capacity track uses is the one
where LoRA@8e beats LoRA@e by a wide margin at a cost that fits the track's budget.

    python -m benchmarks.capacity_pilot [--seeds 1]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from . import environment, write_json
from .quality import Adapter, TrackSpec, _progress, _run_spec, _runner

BASE = TrackSpec("capacity", ("facts:256",), budgets=(1,), seeds=1, steps=0, batch_size=16,
                 max_length=32, eval_examples=1024, test_examples=1024, bf16=True, epochs=8)
# (task, epochs, learning rate): tried in this order; see the README's capacity section
REGIMES = [("facts:256", 8, 3e-3), ("facts:256", 8, 1e-2), ("facts:512", 6, 1e-2),
           ("facts:1024", 4, 1e-2)]
ADAPTERS = [Adapter("lora", 1, rank=1), Adapter("lora", 8, rank=8), Adapter("mos", 1, rank=8, private=0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--regimes", default="", help="comma-separated indices into REGIMES (default all)")
    ap.add_argument("--results", type=Path, default=Path("results"))
    args = ap.parse_args()
    picked = [REGIMES[int(i)] for i in args.regimes.split(",") if i] or REGIMES
    out = args.results / "capacity_pilot"
    rows = []
    with _progress() as progress, _runner(out, progress, None) as runner:
        plan = []
        for task, epochs, lr in picked:
            spec = replace(BASE, tasks=(task,), epochs=epochs)
            plan += [(spec, task, epochs, a, lr, s) for a in ADAPTERS for s in range(args.seeds)]
        runner.task_id = progress.add_task("pilot", total=len(plan))
        for spec in {p[0] for p in plan}:
            mine = [p for p in plan if p[0] == spec]
            runner.run_all(spec, [_run_spec(spec, t, a, lr, s) for _, t, _, a, lr, s in mine])
        for spec, task, epochs, adapter, lr, seed in plan:
            record = runner.store.get(_run_spec(spec, task, adapter, lr, seed).key)
            rows.append({"task": task, "epochs": epochs, "lr": lr, "seed": seed, "label": adapter.label,
                         "params": record["adapter_params"], "steps": record["run"]["steps"],
                         "exact": record["test_accuracy"], "nll": record["test_loss"],
                         "bits": record.get("test_bits"), "seconds": record["seconds"]})
    for r in rows:
        print(f"{r['task']:>11} ep={r['epochs']} lr={r['lr']:.0e} s={r['seed']} {r['label']:<18} "
              f"exact={r['exact']:.3f} nll={r['nll']:.3f} bits={r['bits']:.0f} ({r['seconds']:.0f} s)")
    write_json(out / "summary.json", {"environment": environment(), "base_spec": asdict(BASE),
                                      "runs": rows, "median_seconds": statistics.median(r["seconds"] for r in rows)})


if __name__ == "__main__":
    main()
