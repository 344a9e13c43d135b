"""The README's Results section, written from the JSON files in results/ (plots: plots.py).

Nothing here measures: every number in the README's Results section comes from these files,
so re-running ``python -m benchmarks.report`` after a benchmark is how the README stays true.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from .plots import plot_ablation, plot_quality, variant_name
from . import read_json, write_text

START, END = "<!-- results:start -->", "<!-- results:end -->"


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
    parts = ["_Generated by `python -m benchmarks.report` from `results/*.json`; do not edit by hand._", ""]
    quality = read_json(results_dir / "quality.json")
    if quality:
        parts += ["### Quality at matched budgets", "", quality_markdown(quality),
                  "![quality vs parameters](results/quality.png)", ""]
    capacity = (quality or {}).get("tracks", {}).get("capacity")
    if capacity:
        from .capacity import capacity_markdown

        parts += ["### Capacity: where rank matters", "", capacity_markdown(capacity),
                  "![capacity](results/capacity.png)", ""]
    model = read_json(results_dir / "capacity_model.json")
    pilot = read_json(results_dir / "capacity_pilot" / "codebook8.json")
    rates = read_json(results_dir / "capacity_pilot" / "codebook_lr.json")
    if model:
        from .capacity import guidance_markdown, model_markdown, verdict_markdown

        parts += ["### When to use MoS", "", guidance_markdown(model, pilot, rates), "",
                  "### The capacity model: bits per parameter at equal steps and at convergence", "",
                  "What it says, per axis and budget (MoS's best setting there):", "", verdict_markdown(model),
                  model_markdown(model), "![capacity model](results/capacity_model.png)", ""]
    if pilot:
        from .capacity_pilot import pilot_markdown

        parts += ["### A generalization pilot: the codebook", "",
                  "`python -m benchmarks.capacity_pilot --regimes 5 --seeds 3 --variants --summary codebook8.json`: "
                  "SmolLM2 learns a secret code from 1,024 phrases of three of the 99 answer words (one seeded "
                  "permutation of the words per position: `apple river stone -> tiger lemon castle`) and is "
                  "scored on 256 held-out phrases it never saw, so it must apply the code, not recall phrases; "
                  "bits = chance NLL − NLL over the held-out answers. All seven kinds, 8 epochs (512 steps), "
                  "the table at one shared rate (3e-3) for every adapter and variant. A gap at one shared rate can be "
                  "one adapter's untuned rate: each adapter's rate bracket follows, with the gaps at each one's best "
                  "rate, which are the ones to read.",
                  "", pilot_markdown(pilot)]
    if rates and rates.get("rate_brackets"):
        from .capacity_pilot import bracket_markdown

        parts += ["Each adapter's rates (`python -m benchmarks.capacity_pilot --regimes 5,6,7,8 --seeds 3 --summary "
                  "codebook_lr.json`): mean test bits over 3 seeds, its best in bold. The best rate is chosen on "
                  "the test phrases (the task has no validation split), so the gaps at the best rates lean "
                  "slightly in each adapter's favour alike.", "", bracket_markdown(rates)]
    ablation = read_json(results_dir / "ablation.json")
    if ablation:
        parts += ["### Ablation of the four strategies", "", ablation_markdown(ablation),
                  "![ablation](results/ablation.png)", ""]
    serving = read_json(results_dir / "serving.json")
    if serving and "tracks" in serving:
        from .serving import serving_markdown

        parts += ["### Serving many adapters on one base", "",
                  "`make bench-serving` (each base's date by its name): a batch of 32 rows, a random adapter of the first N "
                  "per row; our paired speedup (median over repetitions [min, max]) over the merged model (one "
                  "adapter folded in: no adapter work), PEFT's mixed batch and, for decoding, our torch path. "
                  "Prefill: 32 × 64 tokens; generate: 16 new tokens after 16; decode: generate's 15 one-token "
                  "steps alone. See \"Serving many adapters on one base\" above.", "",
                  serving_markdown(serving), "![serving](results/serving.png)", ""]
    vllm = read_json(results_dir / "serving_vllm.json")
    if vllm and "rows" in vllm:
        from .serving_vllm import vllm_markdown

        parts += ["### Serving against vLLM", "", f"`make bench-vllm`, {vllm['environment']['date'][:10]}: "
                  "32 concurrent `/v1/completions` per round, a random adapter of the first N each "
                  "(N = 0: the bare base); see \"Against vLLM\" above.", "", vllm_markdown(vllm), ""]
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
    model = read_json(results_dir / "capacity_model.json")
    if model:
        from .capacity import plot_capacity_model

        plot_capacity_model(model, results_dir / "capacity_model.png")
    text = readme.read_text()
    body = f"{START}\n{results_markdown(results_dir)}{END}"
    if START in text and END in text:
        text = text[:text.index(START)] + body + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + f"\n\n## Results\n\n{body}\n"
    write_text(readme, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("results"), help="where the JSON files are")
    ap.add_argument("--readme", type=Path, default=Path("README.md"),
                    help="the README whose Results section is rewritten")
    args = ap.parse_args()
    write_report(results_dir=args.results, readme=args.readme)


if __name__ == "__main__":
    main()
