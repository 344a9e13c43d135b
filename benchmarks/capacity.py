"""The capacity track's headline numbers, table and plot, from its section of quality.json.

The question: at LoRA@e's parameter count, how much of LoRA@8e's gain over LoRA@e does MoS@e
recover? Every number here is read off the per-seed results (``summarize``'s ``per_seed``)
with a paired bootstrap over seeds: each resample draws seed indices with replacement and
applies the same draw to every setting compared, since seed s means the same data order
and the same evaluation items for all of them.
"""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .plots import COLORS, draw_methods, save_figure  # noqa: E402

# the metrics, and whether larger is better
METRICS = {"accuracy": True, "bits": True, "loss": False}
METRIC_NAMES = {"accuracy": "exact match", "bits": "bits stored", "loss": "answer NLL/token"}
RESAMPLES = 4000
Row = dict[str, Any]


def find(rows: list[Row], method: str, budget: int, rank: int | None = None, tag: str = "") -> Row | None:
    return next((r for r in rows if r["adapter"]["method"] == method and r["adapter"]["budget"] == budget
                 and (rank is None or r["adapter"]["rank"] == rank) and r["adapter"]["tag"] == tag), None)


def bootstrap(statistic: Callable[..., float], rows: list[Row], metric: str) -> dict[str, float]:
    """``statistic`` of the rows' per-seed means, and its 95 % paired-bootstrap interval."""
    values = [r["per_seed"][metric] for r in rows]
    n = len(values[0])
    point = statistic(*(statistics.fmean(v) for v in values))
    rng = random.Random(0)
    draws = []
    for _ in range(RESAMPLES):
        pick = [rng.randrange(n) for _ in range(n)]
        draws.append(statistic(*(statistics.fmean(v[i] for i in pick) for v in values)))
    finite = sorted(d for d in draws if math.isfinite(d))
    if not finite:
        return {"value": point, "low": math.nan, "high": math.nan}
    return {"value": point, "low": finite[int(0.025 * len(finite))],
            "high": finite[min(len(finite) - 1, int(0.975 * len(finite)))]}


def recovery(mos: float, low: float, high: float) -> float:
    """(MoS@e - LoRA@e) / (LoRA@8e - LoRA@e): 0 = no better than LoRA@e, 1 = all of LoRA@8e."""
    return (mos - low) / (high - low) if high != low else math.nan


def paired_gap(low: Row, high: Row, metric: str) -> dict[str, float]:
    """LoRA@8e - LoRA@e per seed (signed so that positive is better): mean, paired SE, mean/SE."""
    sign = 1 if METRICS[metric] else -1
    diffs = [sign * (h - l) for h, l in zip(high["per_seed"][metric], low["per_seed"][metric])]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    mean = statistics.fmean(diffs)
    return {"mean": mean, "se": se, "z": mean / se if se else math.inf}


def worth(lora: list[Row], params: int, metric: str) -> Callable[[float], float]:
    """A function: MoS's metric -> the LoRA parameter count, on LoRA's quality-vs-log(params)
    curve (piecewise linear), that reaches it, divided by ``params``. Outside LoRA's range
    it is 0 (below its smallest rank) or inf (above its largest)."""
    points = sorted((r["adapter_params"], statistics.fmean(r["per_seed"][metric])) for r in lora)
    sign = 1 if METRICS[metric] else -1

    def k(value: float) -> float:
        v = sign * value
        if v < sign * points[0][1]:
            return 0.0
        for (p0, q0), (p1, q1) in zip(points, points[1:]):
            q0, q1 = sign * q0, sign * q1
            if q0 <= v <= q1 and q1 > q0:
                t = (v - q0) / (q1 - q0)
                return math.exp(math.log(p0) + t * (math.log(p1) - math.log(p0))) / params
        return math.inf if v > max(sign * q for _, q in points) else math.nan

    return k


def headline(track: dict[str, Any]) -> dict[str, Any]:
    """Gap recovery, "worth LoRA at k x", ablation deltas and the low-data curve."""
    spec = track["spec"]
    first, *others = track["tasks"]
    rows = track["tasks"][first]["results"]
    metrics = [m for m in METRICS if m in rows[0]["per_seed"]]
    out: dict[str, Any] = {"task": first, "budgets": {}, "ablation": {}, "low_data": {}}
    lora = [r for r in rows if r["adapter"]["method"] == "lora"]
    for e in spec["budgets"]:
        low, high = find(rows, "lora", e, e), find(rows, "lora", 8 * e, 8 * e)
        if low is None or high is None:  # a suite still under way
            continue
        entry: dict[str, Any] = {"lora_gap": {m: paired_gap(low, high, m) for m in metrics}, "mos": []}
        for mos in (r for r in rows if r["adapter"]["method"] == "mos" and r["adapter"]["budget"] == e
                    and not r["adapter"]["tag"]):
            entry["mos"].append({
                "label": mos["label"], "params": mos["adapter_params"],
                "recovery": {m: bootstrap(recovery, [mos, low, high], m) for m in metrics},
                "worth": {m: bootstrap(worth(lora, mos["adapter_params"], m), [mos], m) for m in metrics}})
        out["budgets"][e] = entry
    ablated = next((r["adapter"] for r in rows if r["adapter"]["tag"]), None)  # its untagged twin is "full"
    full = ablated and find(rows, "mos", ablated["budget"], ablated["rank"])
    if full:
        out["ablation"] = {"full": full["label"], "deltas": {
            r["adapter"]["tag"]: {"params": r["adapter_params"],
                                  **{m: bootstrap(lambda v, f: v - f, [r, full], m) for m in metrics},
                                  "paired_z": {m: paired_gap(full, r, m)["z"] for m in metrics}}
            for r in rows if r["adapter"]["tag"]}}
    sizes = {task: track["tasks"][task]["results"] for task in [first, *others]}
    e = spec["budgets"][0]
    for task, task_rows in sorted(sizes.items(), key=lambda kv: int(kv[0].partition(":")[2] or 0)):
        low, high = find(task_rows, "lora", e, e), find(task_rows, "lora", 8 * e, 8 * e)
        mos = find(task_rows, "mos", e, 8 * e)
        if None in (low, high, mos):
            continue
        out["low_data"][task] = {
            "lora_e": {m: low[m] for m in metrics}, "lora_8e": {m: high[m] for m in metrics},
            "mos": {m: mos[m] for m in metrics},
            "lora_gap": {m: paired_gap(low, high, m) for m in metrics},
            "recovery": {m: bootstrap(recovery, [mos, low, high], m) for m in metrics}}
    return out


def _ci(b: dict[str, float], digits: int = 2) -> str:
    return f"{b['value']:.{digits}f} [{b['low']:.{digits}f}, {b['high']:.{digits}f}]"


def _k(b: dict[str, float]) -> str:
    """k with its interval; 0 and inf mean below LoRA's smallest and above its largest rank."""
    def one(x: float) -> str:
        return "<1×" if x == 0 else ">max×" if math.isinf(x) else f"{x:.1f}×"
    return f"{one(b['value'])} [{one(b['low'])}, {one(b['high'])}]"


def capacity_markdown(track: dict[str, Any]) -> str:
    """The README's capacity section: the headline numbers, then every setting's row."""
    h = headline(track)
    spec = track["spec"]
    rows = track["tasks"][h["task"]]["results"]
    metrics = [m for m in METRICS if m in rows[0]["per_seed"]]
    seeds = len(rows[0]["seeds"])
    rates = track["tasks"][h["task"]]["learning_rates"]
    lines = [f"**capacity · {h['task']}** (SmolLM2-135M-Instruct memorizing made-up facts, all seven "
             f"linear kinds; {spec['epochs']:g} epochs × batch {spec['batch_size']}, {seeds} seeds paired "
             f"by data order, scored on the trained facts; chance = ln 99 nats/token; learning rates: "
             + ", ".join(f"{k} {v['lr']:.1e}" for k, v in rates.items()) + ")", ""]
    for e, entry in h["budgets"].items():
        gap = entry["lora_gap"]
        lines.append(f"- **e = {e}**: LoRA@{8 * int(e)} − LoRA@{e} = " + "; ".join(
            f"{METRIC_NAMES[m]} {gap[m]['mean']:+.3g} ({gap[m]['z']:.1f} paired SE)" for m in metrics))
        for mos in entry["mos"]:
            lines.append(f"  - {mos['label']}: gap recovered " + "; ".join(
                f"{METRIC_NAMES[m]} {_ci(mos['recovery'][m])}" for m in metrics)
                + "; worth LoRA at k× its parameters: " + ", ".join(f"{_k(mos['worth'][m])} ({METRIC_NAMES[m]})"
                                                 for m in ("accuracy", "bits") if m in metrics))
    lines += ["", f"Ablation ({h['ablation']['full']}, Δ vs full, 95 % paired-bootstrap interval):", "",
              "| variant | params | " + " | ".join(f"Δ {METRIC_NAMES[m]}" for m in metrics) + " |",
              "|---|---:|" + "---:|" * len(metrics)]
    for tag, d in h["ablation"]["deltas"].items():
        lines.append(f"| {tag} | {d['params']:,} | " + " | ".join(_ci(d[m], 3) for m in metrics) + " |")
    e = spec["budgets"][0]
    lines += ["", f"Low-data curve (e = {e}: LoRA r={e}, LoRA r={8 * e}, MoS r={8 * e}; exact match, "
                  "mean ± std):", "",
              f"| facts | LoRA@{e} | LoRA@{8 * e} | MoS@{e} | LoRA gap (paired SE) | MoS gap recovered |",
              "|---:|---:|---:|---:|---:|---:|"]
    for task, d in h["low_data"].items():
        m = "accuracy"
        lines.append(f"| {task.partition(':')[2]} | {_pmstat(d['lora_e'][m])} | {_pmstat(d['lora_8e'][m])} | "
                     f"{_pmstat(d['mos'][m])} | {d['lora_gap'][m]['mean']:+.3f} ({d['lora_gap'][m]['z']:.1f}) | "
                     f"{_ci(d['recovery'][m])} |")
    lines += ["", "| setting | adapter params | adapter bytes | lr | " +
              " | ".join(METRIC_NAMES[m] for m in metrics) + " |", "|---|---:|---:|---:|" + "---:|" * len(metrics)]
    for r in rows:
        lines.append(f"| {r['label']} | {r['adapter_params']:,} | {r['adapter_bytes']:,} | {r['lr']:.1e} | "
                     + " | ".join(_pmstat(r[m], 3 if m != "bits" else 0) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def _pmstat(stat: dict[str, float], digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def plot_capacity(track: dict[str, Any], path: Path) -> None:
    """Exact match and bits stored vs trainable parameters (log x), every method, mean ± std;
    and the low-data curve."""
    h = headline(track)
    rows = track["tasks"][h["task"]]["results"]
    metrics = [m for m in ("accuracy", "bits") if m in rows[0]["per_seed"]]
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(5.5 * (len(metrics) + 1), 4.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        if metric == "bits":  # the base's -9,000 bits would flatten the panel: chance is the floor
            ax.axhline(0, color="tab:gray", linestyle=":", label="chance (a guess among the words)")
        draw_methods(ax, [r for r in rows if metric != "bits" or r["adapter"]["method"] != "none"], metric)
        ax.set_xlabel("trainable adapter parameters")
        ax.set_ylabel(f"{METRIC_NAMES[metric]} on the trained facts (mean ± std)")
        ax.set_title(f"capacity · {h['task']}")
    ax = axes[0][-1]
    sizes = [int(t.partition(":")[2]) for t in h["low_data"]]
    e = track["spec"]["budgets"][0]
    for key, label, color in (("lora_e", f"LoRA r={e}", COLORS["lora"]),
                              ("lora_8e", f"LoRA r={8 * e}", "tab:cyan"),
                              ("mos", f"MoS e={e} r={8 * e}", COLORS["mos"])):
        stats = [d[key]["accuracy"] for d in h["low_data"].values()]
        ax.errorbar(sizes, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], marker="o",
                    capsize=3, color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("facts trained on (same epochs)")
    ax.set_ylabel("exact match (mean ± std)")
    ax.set_title("low-data curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


# ------------------------------------------------------------------ the capacity model's suite

def _model_track(axis: dict[str, Any]) -> dict[str, Any]:
    """One axis of ``capacity_model.json`` in the shape ``headline`` reads."""
    return {"spec": axis["spec"], "tasks": {axis["spec"]["tasks"][0]: {"results": axis["results"]}}}


def per_param(row: Row) -> dict[str, float]:
    """Bits stored per trainable parameter, with its 95 % bootstrap interval over seeds."""
    return bootstrap(lambda bits: bits / row["adapter_params"], [row], "bits")


def _rate(rates: dict[str, Any], row: Row) -> str:
    """The row's learning rate, marked † when its sweep's best is still at the grid's edge."""
    swept = rates[row["swept_on"]]
    return f"{row['lr']:.1e}" + ("†" if swept["at_edge"] else "")


def model_markdown(result: dict[str, Any]) -> str:
    """The README's capacity-model section: per axis the headline, then every setting's row."""
    model, axes = result["model"], result["axes"]
    first = next(iter(axes.values()))
    task, seeds = first["spec"]["tasks"][0], first["spec"]["seeds"]
    facts = int(task.partition(":")[2])
    total = facts * 3 * math.log2(99)
    lines = [f"**capacity model · {task}** (a frozen random Llama, {model['layers']} blocks of width "
             f"{model['hidden']}, MLP {model['ffn']}, weights ~ N(0, {model['init_range']}); adapters on "
             f"{', '.join(model['targets'])}; batch {first['spec']['batch_size']}; {seeds} seeds paired by "
             f"data order; every setting's learning rate from its own sweep per axis, † = still at the "
             f"grid's edge; the facts hold {total:,.0f} bits; "
             f"{result['runs']} runs, {result['run_seconds'] / 60:.0f} min of run time)", ""]
    for name, axis in axes.items():
        rows = axis["results"]
        h = headline(_model_track(axis))
        lines += [f"**{name}** ({axis['epochs']:g} epochs = {axis['steps']:,} steps):", ""]
        for e, entry in h["budgets"].items():
            gap = entry["lora_gap"]
            lines.append(f"- e = {e}: LoRA@{8 * int(e)} − LoRA@{e} = {gap['bits']['mean']:+,.0f} bits "
                         f"({gap['bits']['z']:.1f} paired SE), exact match {gap['accuracy']['mean']:+.3f}")
            for mos in entry["mos"]:
                lines.append(f"  - {mos['label']}: gap recovered {_ci(mos['recovery']['bits'])} (bits), "
                             f"{_ci(mos['recovery']['accuracy'])} (exact match); worth LoRA at "
                             f"{_k(mos['worth']['bits'])} its parameters (bits)")
        if h.get("ablation"):
            lines.append(f"- ablation and variants of {h['ablation']['full']} (Δ bits vs it, 95 % interval): " + "; ".join(
                f"{tag} {_ci(d['bits'], 0)} ({d['paired_z']['bits']:+.1f} SE)"
                for tag, d in h["ablation"]["deltas"].items()))
        lines += ["", "| setting | params | lr | exact match | bits stored | bits / param [95 %] |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in sorted(rows, key=lambda r: (r["adapter"]["method"] != "lora", r["adapter_params"], r["label"])):
            lines.append(f"| {r['label']} | {r['adapter_params']:,} | {_rate(axis['learning_rates'], r)} "
                         f"| {_pmstat(r['accuracy'])} | {_pmstat(r['bits'], 0)} | {_ci(per_param(r), 3)} |")
        lines.append("")
    if result.get("plateau"):
        lines.append("Is convergence converged? Seed 0 trained twice as long at the same rate: " + "; ".join(
            f"{p['label']} {p['bits'][0]:,.0f} → {p['bits'][1]:,.0f} bits ({p['steps'][0]:,} → {p['steps'][1]:,} "
            f"steps; exact match {p['accuracy'][0]:.3f} → {p['accuracy'][1]:.3f})" for p in result["plateau"]) + ".")
        lines.append("")
    return "\n".join(lines)


def verdict_markdown(result: dict[str, Any]) -> str:
    """Per axis and budget, the best MoS setting against LoRA in words a practitioner can act
    on: whether it beats LoRA at equal parameters, and by how much of what rank buys."""
    lines = []
    for name, axis in result["axes"].items():
        for e, entry in headline(_model_track(axis))["budgets"].items():
            if not entry["mos"]:
                continue
            best = max(entry["mos"], key=lambda m: m["recovery"]["bits"]["value"])
            rec = best["recovery"]["bits"]
            says = ("holds about what LoRA at 8x its parameters holds" if rec["low"] >= 0.8 else
                    "stores more than LoRA at equal parameters" if rec["low"] > 0 else
                    "stores no more than LoRA at equal parameters")
            lines.append(f"- **{name}, e = {e}**: {best['label']} {says}: gap recovered {_ci(rec)}, "
                         f"worth LoRA at {_k(best['worth']['bits'])} its parameters (bits stored).")
    return "\n".join(lines) + "\n"


def guidance_markdown(result: dict[str, Any], pilot: dict[str, Any] | None = None,
                      rates: dict[str, Any] | None = None) -> str:
    """"When to use MoS": what the capacity model's two axes (and, if given, the generalization
    pilot's paired gaps: ``capacity_pilot`` summary; with its rate bracket ``rates``, the gaps
    at each adapter's best rate) say a practitioner should do, each clause chosen by the
    measured intervals (not written for a result)."""
    gaps = {(g["low"], g["high"]): g for g in (pilot or {}).get("paired_gaps", [])}
    brackets = (rates or {}).get("rate_brackets", [])
    tuned = {(g["low"], g["high"]): g for g in (brackets[0]["gaps_at_best"] if brackets else [])}
    best = {}
    for name, axis in result["axes"].items():
        h = headline(_model_track(axis))
        for e, entry in h["budgets"].items():
            if entry["mos"]:
                m = max(entry["mos"], key=lambda m: m["recovery"]["bits"]["value"])
                best.setdefault(name, []).append((e, m))
        best.setdefault(f"{name}/ablation", h.get("ablation", {}))

    def verdict(axis: str) -> str:
        recs = [m["recovery"]["bits"] for _, m in best.get(axis, [])]
        spans = ", ".join(f"e = {e}: {_ci(m['recovery']['bits'])}, worth LoRA at {_k(m['worth']['bits'])}"
                          for e, m in best.get(axis, []))
        if all(r["low"] > 0 for r in recs):
            word = "MoS stores a little more than LoRA at the same parameter count"
        elif all(r["high"] < 0 for r in recs):
            word = "MoS stores less than LoRA at the same parameter count"
        else:
            word = "MoS stores about what LoRA at the same parameter count stores"
        return f"{word} (share of LoRA@8e's extra capacity recovered: {spans})"

    lines = []
    axes = list(result["axes"])
    if len(axes) >= 1:
        lines.append(f"- **Short training ({axes[0]}):** {verdict(axes[0])}. If your run is short, an MoS "
                     "adapter is a fair choice at LoRA@e's memory, but do not expect LoRA@8e's capacity.")
    if len(axes) >= 2:
        lines.append(f"- **Trained to convergence ({axes[1]}):** {verdict(axes[1])}. If you train to a "
                     "plateau and need capacity, spend the memory on LoRA's rank: on this task MoS does not "
                     "buy rank. The paper's 8x is not reproduced here.")
        deltas = best.get(f"{axes[1]}/ablation", {}).get("deltas", {})
        wins = {t: d for t, d in deltas.items() if d["paired_z"]["bits"] >= 3}
        if wins:
            tag, d = max(wins.items(), key=lambda kv: kv[1]["paired_z"]["bits"])
            second = next((g for (_, high), g in gaps.items() if high.endswith(f"({tag})")), None)
            text = (f"- **A variant that helps here:** `{tag}` adds {_ci(d['bits'], 0)} bits "
                    f"({d['paired_z']['bits']:+.1f} paired SE) at convergence")
            if second is None:
                text += ", on this one task; the default stays the paper's MoS until a second task agrees."
            elif second["z"] >= 3:
                text += (f", and {second['mean_bits']:+,.0f} bits ({second['z']:+.1f} SE) on the codebook: it wins "
                         "on two tasks.")
            else:
                text += (f", but {second['mean_bits']:+,.0f} bits ({second['z']:+.1f} SE) on the codebook, a second "
                         "task: the default stays the paper's MoS.")
            lines.append(text)
    rule = tuned or gaps
    rank = next((g for (low, high), g in rule.items() if low.startswith("LoRA") and high.startswith("LoRA")), None)
    mos = next((g for (low, high), g in rule.items()
                if low.startswith("LoRA") and high.startswith("MoS") and "(" not in high), None)
    rate = "each at its best rate" if tuned else "one rate"
    if rank and rank["z"] < 3 and tuned:
        lines.append(f"- **Learning a rule (the codebook, scored on held-out phrases):** with each adapter at its "
                     f"best rate, {rank['low']} learns the rule about as well as {rank['high']} "
                     f"({rank['mean_bits']:+,.0f} bits, {rank['z']:+.1f} paired SE, {rank['seeds']} seeds): rank "
                     "does not matter on this task once the rate is tuned, so it cannot show what MoS buys. "
                     "Tune the rate before buying rank.")
    elif rank and mos and rank["z"] >= 3:
        share = mos["mean_bits"] / rank["mean_bits"]
        word, advice = ((f"recovers {share:.2f} of", "MoS is the better use of LoRA@e's memory") if mos["z"] >= 3 else
                        (f"appears to recover {share:.2f} of", "MoS is worth trying at LoRA@e's memory")
                        if mos["z"] > 0 else ("does not recover any of", "spend the memory on LoRA's rank"))
        lines.append(f"- **Learning a rule (the codebook, scored on held-out phrases):** {mos['high']} {word} "
                     f"LoRA's rank gain at {mos['low']}'s parameters "
                     f"({mos['mean_bits']:+,.0f} bits, {mos['z']:+.1f} paired SE, {mos['seeds']} seeds, {rate}). "
                     f"If your task is a pattern to apply rather than facts to recall, {advice}.")
    lines.append("- **Where MoS is the right tool:** many adapters on one base at LoRA@e's bytes each "
                 "(serving, below), with routing indices shared by same-seed adapters, and the same "
                 "merge and PEFT export as LoRA. Pick the budget e from what quality needs, as for LoRA.")
    return "\n".join(lines) + "\n"


def plot_capacity_model(result: dict[str, Any], path: Path) -> None:
    """Per axis: bits stored, and bits per parameter, vs trainable parameters (log x)."""
    axes_data = result["axes"]
    fig, axes = plt.subplots(2, len(axes_data), figsize=(5.5 * len(axes_data), 8.4), squeeze=False)
    for column, (name, axis) in enumerate(axes_data.items()):
        rows = [{**r, "bits_per_param": {k: v / r["adapter_params"] for k, v in r["bits"].items()}}
                for r in axis["results"]]
        facts = int(axis["spec"]["tasks"][0].partition(":")[2])
        top, bottom = axes[0][column], axes[1][column]
        top.axhline(facts * 3 * math.log2(99), color="tab:gray", linestyle="--", label="all the facts' bits")
        top.axhline(0, color="tab:gray", linestyle=":", label="chance")
        draw_methods(top, rows, "bits")
        draw_methods(bottom, rows, "bits_per_param")
        top.set_title(f"capacity model · {name} ({axis['epochs']:g} epochs)")
        top.set_ylabel("bits stored (mean ± std)")
        bottom.set_ylabel("bits per trainable parameter")
        bottom.set_xlabel("trainable adapter parameters")
    save_figure(fig, path)
