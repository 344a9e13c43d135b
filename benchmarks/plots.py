"""The benchmarks' plots: one color and name per method, drawn the same way in every figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402

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
    save_figure(fig, path)


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
    save_figure(fig, path)


def variant_name(row: dict[str, Any]) -> str:
    """An ablation row's name: its tag, "full" for untagged MoS, else the setting's label."""
    if row["adapter"]["method"] != "mos":
        return row["label"]
    return row["adapter"]["tag"] or "full"


def save_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG at ``path`` (its folder created) and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
