"""The capacity track's pilot: where does LoRA's rank buy quality?

Trains PEFT LoRA at e and 8e (and MoS@e at r = 8e) on candidate regimes (task size, epochs,
learning rate), one or more seeds, and records every run in results/capacity_pilot/ (a run
cache: run again to resume) with a summary JSON. The regime the capacity track uses is the one
where LoRA@8e beats LoRA@e by a wide margin at a cost that fits the track's budget.

    python -m benchmarks.capacity_pilot [--seeds 1] [--regimes 0,1] [--summary summary.json]

With two or more seeds, each regime's summary has the paired gap of LoRA@8e over LoRA@e in
bits (mean over seeds, its standard error, and their ratio): a regime is kept only when the
gap is at least 3 paired SE.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from . import environment, write_json
from .quality import Adapter, TrackSpec, _progress, _run_spec, _runner

BASE = TrackSpec("capacity", ("facts:256",), budgets=(1,), seeds=1, steps=0, batch_size=16,
                 max_length=32, eval_examples=1024, test_examples=1024, bf16=True, epochs=8)
# (task, epochs, learning rate): tried in this order; see the README's capacity section
REGIMES = [("facts:256", 8, 3e-3), ("facts:256", 8, 1e-2), ("facts:512", 6, 1e-2),
           ("facts:1024", 4, 1e-2),
           # the generalization pilot (#27): scored on held-out phrases, 3 seeds (--regimes 4,5 --seeds 3)
           ("codebook:1024", 2, 3e-3), ("codebook:1024", 8, 3e-3),
           # its rate bracket, 2x either side of 3e-3, then 1.2e-2 when LoRA r = 1's best was 6e-3, the
           # top (--regimes 5,6,7,8 --seeds 3)
           ("codebook:1024", 8, 1.5e-3), ("codebook:1024", 8, 6e-3), ("codebook:1024", 8, 1.2e-2)]
ADAPTERS = [Adapter("lora", 1, rank=1), Adapter("lora", 8, rank=8), Adapter("mos", 1, rank=8, private=0)]
# MoS's variants on the generalization task (#27 item 5's second task; --variants): the two that
# won on the capacity model, each Δ paired with ADAPTERS[2]. At e = 1 no whole rank can be
# private, and at l = 2 one private shard per layer is the whole pool: so half a rank as
# private shards needs l = 4 (two of each vector's four shards the layer's own)
VARIANTS = [replace(ADAPTERS[2], tag="layer scale", options=(("layer_scale", True),)),
            replace(ADAPTERS[2], tag="shard privatization", shards=4, options=(("private_shards", 2),))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--regimes", default="", help="comma-separated indices into REGIMES (default all)")
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--summary", default="summary.json", help="file name under results/capacity_pilot/")
    ap.add_argument("--variants", action="store_true", help="also MoS's variants (VARIANTS), paired with MoS")
    args = ap.parse_args()
    adapters = ADAPTERS + VARIANTS * args.variants
    picked = [REGIMES[int(i)] for i in args.regimes.split(",") if i] or REGIMES
    out = args.results / "capacity_pilot"
    rows = []
    with _progress() as progress, _runner(out, progress, None) as runner:
        plan = []
        for task, epochs, lr in picked:
            spec = replace(BASE, tasks=(task,), epochs=epochs)
            plan += [(spec, task, epochs, a, lr, s) for a in adapters for s in range(args.seeds)]
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
        print(f"{r['task']:>11} ep={r['epochs']} lr={r['lr']:.1e} s={r['seed']} {r['label']:<18} "
              f"exact={r['exact']:.3f} nll={r['nll']:.3f} bits={r['bits']:.0f} ({r['seconds']:.0f} s)")
    pairs = [(ADAPTERS[0], ADAPTERS[1]), (ADAPTERS[0], ADAPTERS[2]), *((ADAPTERS[2], v) for v in VARIANTS * args.variants)]
    gaps = [g for regime in picked for low, high in pairs if (g := paired(rows, *regime, low.label, high.label))]
    for g in gaps:
        print(f"{g['task']} ep={g['epochs']} lr={g['lr']:.1e}: {g['high']} - {g['low']} = {g['mean_bits']:+.0f} bits "
              f"(SE {g['se_bits']:.0f}, {g['z']:+.1f} SE, {g['seeds']} seeds)")
    regimes = {(task, epochs) for task, epochs, _ in picked}
    brackets = [rate_bracket(rows, task, epochs) for task, epochs in sorted(regimes)
                if len({lr for t, e, lr in picked if (t, e) == (task, epochs)}) > 1]
    for b in brackets:
        for label, f in b["families"].items():
            print(f"{b['task']} ep={b['epochs']} {label}: best lr {f['best_lr']:.1e}{' (at an edge)' * f['at_edge']}")
    write_json(out / args.summary, {"environment": environment(), "base_spec": asdict(BASE), "runs": rows,
                                    "paired_gaps": gaps, "rate_brackets": brackets,
                                    "median_seconds": statistics.median(r["seconds"] for r in rows)})


def paired(rows: list[dict], task: str, epochs: float, lr: float, low: str, high: str,
           high_lr: float | None = None) -> dict | None:
    """``high`` minus ``low`` (adapter labels) in test bits, paired by seed, for one regime
    (None: < 2 seeds); ``high_lr``: ``high`` at its own rate (default ``lr``). With LoRA@e and
    LoRA@8e it is the regime's rank gap."""
    def bits(label: str, rate: float) -> dict[int, float]:
        return {r["seed"]: r["bits"] for r in rows
                if (r["task"], r["epochs"], r["lr"], r["label"]) == (task, epochs, rate, label)}

    lows, highs = bits(low, lr), bits(high, lr if high_lr is None else high_lr)
    diffs = [highs[s] - lows[s] for s in sorted(lows.keys() & highs.keys())]
    if len(diffs) < 2:
        return None
    mean, se = statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
    gap = {"task": task, "epochs": epochs, "lr": lr, "low": low, "high": high, "seeds": len(diffs),
           "diffs_bits": diffs, "mean_bits": mean, "se_bits": se, "z": mean / se if se else math.inf}
    return gap if high_lr is None else gap | {"high_lr": high_lr}


def rate_bracket(rows: list[dict], task: str, epochs: float) -> dict:
    """Each adapter's rate grid on one task: mean test bits per rate, the best rate, and whether
    it sits at an end of the grid (then the optimum is not bracketed); then the gaps of
    ``paired`` with every adapter at its own best rate."""
    grids: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        if (r["task"], r["epochs"]) == (task, epochs):
            grids.setdefault(r["label"], {}).setdefault(r["lr"], []).append(r["bits"])
    families = {}
    for label, grid in grids.items():
        means = {lr: statistics.fmean(b) for lr, b in sorted(grid.items())}
        best = max(means, key=means.__getitem__)
        families[label] = {"grid": list(means), "mean_bits": list(means.values()), "best_lr": best,
                           "at_edge": len(means) < 3 or best in (min(means), max(means))}
    low, high, mos = (a.label for a in ADAPTERS)
    gaps = [g for a, b in ((low, high), (low, mos)) if a in families and b in families
            and (g := paired(rows, task, epochs, families[a]["best_lr"], a, b, families[b]["best_lr"]))]
    return {"task": task, "epochs": epochs, "families": families, "gaps_at_best": gaps}


def pilot_markdown(summary: dict) -> str:
    """The README's table of a pilot summary: per regime and adapter, test exact match and bits
    (mean ± std over seeds), then each paired gap with its standard error; with the rank gap
    and MoS's gain over LoRA@e, MoS's gap recovery."""
    lines = ["| task | epochs | lr | adapter | params | seeds | exact match | test bits |", "|---" * 8 + "|"]
    groups: dict[tuple, list[dict]] = {}
    for r in summary["runs"]:
        groups.setdefault((r["task"], r["epochs"], r["lr"], r["label"]), []).append(r)
    for (task, epochs, lr, label), runs in groups.items():
        exact, bits = [r["exact"] for r in runs], [r["bits"] for r in runs]
        lines.append(f"| {task} | {epochs} | {lr:.0e} | {label} | {runs[0]['params']:,} | {len(runs)} | "
                     f"{_mean_sd(exact, '.3f')} | {_mean_sd(bits, ',.0f')} |")
    lines.append("")
    gaps = summary.get("paired_gaps", [])
    for g in gaps:
        lines.append(f"- {g['task']}, {g['epochs']} epochs: {g['high']} − {g['low']} = {g['mean_bits']:+,.0f} bits "
                     f"(SE {g['se_bits']:,.0f}, {g['z']:+.1f} paired SE, {g['seeds']} seeds)")
    by = {(g["task"], g["epochs"], g["lr"], g["low"], g["high"]): g for g in gaps}
    low, high, mos = (a.label for a in ADAPTERS)
    for (task, epochs, lr, a, b), g in by.items():
        gain = by.get((task, epochs, lr, low, mos))
        if (a, b) == (low, high) and gain and g["mean_bits"] > 0:
            lines.append(f"- {task}, {epochs} epochs, lr {lr:.0e}: {mos} recovers {gain['mean_bits'] / g['mean_bits']:.2f} "
                         f"of LoRA's rank gap at {low}'s parameters, at this one rate for all")
    return "\n".join(lines) + "\n"


def bracket_markdown(summary: dict) -> str:
    """The README's table of a summary's rate brackets: per adapter, mean test bits at each rate
    (the best in bold, flagged when at an end of the grid), then the gaps at every adapter's own
    best rate."""
    lines = []
    for b in summary.get("rate_brackets", []):
        grid = sorted({lr for f in b["families"].values() for lr in f["grid"]})
        lines += [f"| {b['task']}, {b['epochs']} epochs | " + " | ".join(f"lr {lr:.1e}" for lr in grid)
                  + " | best rate |", "|---" * (len(grid) + 2) + "|"]
        for label, f in b["families"].items():
            bits = dict(zip(f["grid"], f["mean_bits"]))
            cells = [("**{:,.0f}**" if lr == f["best_lr"] else "{:,.0f}").format(bits[lr]) if lr in bits else "–"
                     for lr in grid]
            edge = " (at an edge: not bracketed)" if f["at_edge"] else " (interior)"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {f['best_lr']:.1e}{edge} |")
        lines.append("")
        for g in b["gaps_at_best"]:
            lines.append(f"- each at its best rate: {g['high']} − {g['low']} = {g['mean_bits']:+,.0f} bits "
                         f"(SE {g['se_bits']:,.0f}, {g['z']:+.1f} paired SE, {g['seeds']} seeds)")
        rank, gain = (next((g for g in b["gaps_at_best"] if g["high"] == a.label), None) for a in ADAPTERS[1:])
        if rank and gain and rank["z"] >= 3:
            lines.append(f"- gap recovery at the best rates: {gain['mean_bits'] / rank['mean_bits']:.2f}")
        elif rank:  # a share of a gap that is within noise would be noise too
            lines.append("- no gap recovery at the best rates: LoRA's own rank gap is under 3 paired SE there")
        lines.append("")
    return "\n".join(lines)


def _mean_sd(xs: list[float], fmt: str) -> str:
    sd = f" ± {statistics.stdev(xs):{fmt}}" if len(xs) > 1 else ""
    return f"{statistics.fmean(xs):{fmt}}{sd}"


if __name__ == "__main__":
    main()
