"""Plots and the README's Results section, drawn from the JSON files in results/.

Nothing here measures: every number in the README's Results section comes from these files,
so re-running ``moslora bench report`` after a benchmark is how the README stays true.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402

from .runs import read_json, write_text  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"
COLORS = {"lora": "tab:blue", "vera": "tab:green", "vblora": "tab:purple", "mos": "tab:red",
          "lora-eq": "tab:orange", "none": "tab:gray"}
NAMES = {"lora": "PEFT LoRA", "vera": "PEFT VeRA", "vblora": "PEFT VB-LoRA", "mos": "MoS",
         "lora-eq": "MoS as LoRA (check)", "none": "no adapter (zero-shot)"}


def plot_quality(result: dict[str, Any], path: Path) -> None:
    """Accuracy vs adapter parameters (log x), one panel per track and task, every method."""
    panels = [(t, task, data["results"]) for t, track in result["tracks"].items() if t != "capacity"
              for task, data in track["tasks"].items()]  # capacity has its own (capacity.py)
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (track, task, rows) in zip(axes[0], panels):
        draw_methods(ax, rows, "accuracy")
        ax.set_xlabel("trainable adapter parameters (head excluded)")
        ax.set_ylabel("test accuracy (mean ± std over seeds)")
        ax.set_title(f"{track} · {task}")
    _save(fig, path)


def draw_methods(ax: Any, rows: list[dict[str, Any]], metric: str) -> None:
    """One series per method on log-parameter axes: ``metric`` mean ± std over seeds, LoRA's
    points joined, ranks noted for LoRA and MoS, the zero-shot base as a dotted line, and
    ablation variants (tagged MoS rows) as crosses."""
    for method in COLORS:
        mine = sorted((r for r in rows if r["adapter"]["method"] == method),
                      key=lambda r: r["adapter_params"])
        if not mine:
            continue
        if method == "none":
            ax.axhline(mine[0][metric]["mean"], color=COLORS[method], linestyle=":", label=NAMES[method])
            continue
        plain = [r for r in mine if not r["adapter"].get("tag")]
        tagged = [r for r in mine if r["adapter"].get("tag")]
        for group, style in ((plain, dict(marker="o", label=NAMES[method])),
                             (tagged, dict(marker="x", alpha=0.6, label="MoS ablations"))):
            if group:
                ax.errorbar([r["adapter_params"] for r in group], [r[metric]["mean"] for r in group],
                            yerr=[r[metric]["std"] for r in group], color=COLORS[method], capsize=3,
                            linestyle="-" if method == "lora" else "none", **style)
        for r in plain if method in ("lora", "mos") else []:
            note = f"r={r['adapter']['rank']}" + (f",e={r['adapter']['budget']}" if method == "mos" else "")
            ax.annotate(note, (r["adapter_params"], r[metric]["mean"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -10 if method == "mos" else 4))
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: no overlaps
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_ablation(result: dict[str, Any], path: Path) -> None:
    """Bar per MoS variant with std error bars; LoRA references as horizontal lines."""
    variants = [r for r in result["results"] if r["adapter"]["method"] == "mos"]
    references = [r for r in result["results"] if r["adapter"]["method"] == "lora"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    xs = range(len(variants))
    ax.bar(xs, [r["accuracy"]["mean"] for r in variants], yerr=[r["accuracy"]["std"] for r in variants],
           capsize=4, color=COLORS["mos"], alpha=0.8)
    ax.set_xticks(list(xs), [variant_name(r) for r in variants], rotation=20, ha="right")
    for ref, style in zip(references, ("--", ":")):
        ax.axhline(ref["accuracy"]["mean"], color=COLORS["lora"], linestyle=style, label=ref["label"])
    values = [r["accuracy"]["mean"] for r in result["results"]]
    spread = max(values) - min(values)
    ax.set_ylim(min(values) - spread - 0.01, max(values) + spread + 0.01)
    ax.set_ylabel("test accuracy (mean ± std)")
    ax.set_title(f"MoS ablation · {result['track']} · {result['task']} · e={result['budget']}, "
                 f"r={result['rank']}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def variant_name(row: dict[str, Any]) -> str:
    """An ablation row's name: its tag, "full" for untagged MoS, else the setting's label."""
    if row["adapter"]["method"] != "mos":
        return row["label"]
    return row["adapter"]["tag"] or "full"


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- markdown

def _pm(stat: dict[str, float], scale: float = 1.0, digits: int = 3, runs: int = 2) -> str:
    if math.isnan(stat["mean"]):
        return "diverged"
    if runs == 1:  # no spread to show
        return f"{stat['mean'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def quality_markdown(result: dict[str, Any]) -> str:
    lines = []
    for track, data in result["tracks"].items():
        if track == "capacity":  # its own section (capacity.py)
            continue
        spec = data["spec"]
        if "runs" in data:
            lines += [f"_{track} track: {data['runs']} distinct runs; recorded wall time per run: "
                      f"median {data['median_run_seconds']:.0f} s, total {data['run_seconds'] / 60:.0f} min "
                      "(the runs ran on different days, some while the machine was shared or two side "
                      "by side)._", ""]
        for task, table in data["tasks"].items():
            rates = table["learning_rates"]
            lrs = ", ".join(f"{k} {v['lr']:.1e}" for k, v in rates.items())
            swept = next(iter(rates.values()), {}).get("task", task)
            lines += [f"**{track} · {task}** — {spec['steps']} steps × batch {spec['batch_size']}, "
                      f"{len(table['results'][0]['seeds'])} seeds, "
                      f"{table.get('test_examples', spec['test_examples'])} test examples; "
                      f"learning rates (swept on {swept}): {lrs}", "",
                      "| setting | adapter params | adapter bytes | accuracy | eval loss |",
                      "|---|---:|---:|---:|---:|"]
            lines += [f"| {r['label']} | {r['adapter_params']:,} | {r['adapter_bytes']:,} | "
                      f"{_pm(r['accuracy'], runs=len(r['seeds']))} | {_pm(r['loss'], runs=len(r['seeds']))} |"
                      for r in table["results"]]
            lines += [""] + [f"- {claim}" for claim in claims(table["results"], spec["budgets"])] + [""]
    return "\n".join(lines)


def claims(rows: list[dict[str, Any]], budgets: list[int]) -> list[str]:
    """The paper's comparisons, read off one table: each MoS setting at budget e against
    LoRA@e (same parameters), LoRA@8e (8x the parameters), VeRA and VB-LoRA at e."""
    def find(method: str, budget: int, rank: int | None = None) -> dict[str, Any] | None:
        return next((r for r in rows if r["adapter"]["method"] == method
                     and r["adapter"]["budget"] == budget
                     and (rank is None or r["adapter"]["rank"] == rank)), None)

    out = []
    for e in budgets:
        # VeRA runs once when capped at the same rank for every budget: its largest budget <= e
        vera = max((r for r in rows if r["adapter"]["method"] == "vera" and r["adapter"]["budget"] <= e),
                   key=lambda r: r["adapter"]["budget"], default=None)
        others = [find("lora", e, e), find("lora", 8 * e, 8 * e), vera, find("vblora", e)]
        for mos in (r for r in rows if r["adapter"]["method"] == "mos" and r["adapter"]["budget"] == e
                    and not r["adapter"]["tag"]):
            versus = [f"{o['label']} {_delta(mos, o)}" for o in others if o is not None]
            out.append(f"{mos['label']} ({_pm(mos['accuracy'])}) vs " + "; ".join(versus))
    return out


def _delta(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Accuracy difference in points, with the two runs' stds combined as its uncertainty."""
    d = 100 * (a["accuracy"]["mean"] - b["accuracy"]["mean"])
    sd = 100 * math.hypot(a["accuracy"]["std"], b["accuracy"]["std"])
    return f"{d:+.2f} ± {sd:.2f} pts"


def ablation_markdown(result: dict[str, Any]) -> str:
    full = result["results"][0]["accuracy"]["mean"]
    lines = [f"**Ablation** ({result['track']} · {result['task']}, e={result['budget']}, "
             f"r={result['rank']}, {len(result['results'][0]['seeds'])} seeds)", "",
             "| variant | adapter params | accuracy | Δ vs full (points) |", "|---|---:|---:|---:|"]
    for r in result["results"]:
        name = variant_name(r)
        delta = 100 * (r["accuracy"]["mean"] - full)
        lines.append(f"| {name} | {r['adapter_params']:,} | {_pm(r['accuracy'])} | {delta:+.2f} |")
    return "\n".join(lines) + "\n"


def results_markdown(results_dir: Path) -> str:
    """The Results section's body from whichever result files exist."""
    parts = ["_Generated by `moslora bench report` from `results/*.json`; do not edit by hand._", ""]
    quality = read_json(results_dir / "quality.json")
    if quality:
        parts += ["### Quality at matched budgets", "", quality_markdown(quality),
                  "![quality vs parameters](results/quality.png)", ""]
    capacity = (quality or {}).get("tracks", {}).get("capacity")
    if capacity:
        from .capacity import capacity_markdown

        parts += ["### Capacity: where rank matters", "", capacity_markdown(capacity),
                  "![capacity](results/capacity.png)", ""]
    ablation = read_json(results_dir / "ablation.json")
    if ablation:
        parts += ["### Ablation of the four strategies", "", ablation_markdown(ablation),
                  "![ablation](results/ablation.png)", ""]
    speed = read_json(results_dir / "speed.json")
    if speed:
        from .speed import speed_markdown

        parts += ["### Training speed and memory", "", speed_markdown(speed), "",
                  "![speed](results/speed.png)", ""]
    return "\n".join(parts)


def write_report(results_dir: Path = Path("results"), readme: Path = Path("README.md")) -> None:
    """Redraw the plots and replace the README's Results section (between its markers)."""
    results_dir = Path(results_dir)
    for name, plot in (("quality", plot_quality), ("ablation", plot_ablation)):
        data = read_json(results_dir / f"{name}.json")
        if data:
            plot(data, results_dir / f"{name}.png")
    capacity = (read_json(results_dir / "quality.json") or {}).get("tracks", {}).get("capacity")
    if capacity:
        from .capacity import plot_capacity

        plot_capacity(capacity, results_dir / "capacity.png")
    text = readme.read_text()
    body = f"{START}\n{results_markdown(results_dir)}{END}"
    if START in text and END in text:
        text = text[:text.index(START)] + body + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + f"\n\n## Results\n\n{body}\n"
    write_text(readme, text)
