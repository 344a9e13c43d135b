"""The capacity model: does MoS hold LoRA@8e's information at LoRA@e's parameters, once
training has stopped improving?

SmolLM2 cannot reach convergence on thousands of facts on 2 cores (the capacity track's 256
facts at 8 epochs measure learning speed). Here the base is a frozen, seeded random-init
``LlamaForCausalLM`` of 0.2 M parameters (no download) with a word-level tokenizer over the
facts' words, so a fact is 7 tokens: ``<s> Kavo Rilen : apple river stone``. Every setting
trains on the same 512 facts along two axes, each with its own learning-rate sweep:

  equal steps   ``AXES["equal steps"]`` epochs: learning speed, the SmolLM2 track's regime
  convergence   ``AXES["convergence"]`` epochs: what each adapter can hold

and reports bits stored per trainable parameter (``memorization.metrics``; chance = ln 99
nats per answer token), gap recovery and "worth LoRA at k×" (``capacity.headline``), with
paired-bootstrap intervals over 5 seeds.

Why this model: weights drawn at ``INIT_RANGE`` (HF's 0.02 leaves a frozen random model
unable to give confident logits through any adapter: the loss stayed near ln(vocab) in a
pilot); ``LAYERS`` = 16 blocks so that MoS's pools are shared widely enough for subset
selection to reach r = 8e at e = 2 with a private rank (r <= p + (e - p)·L); only
``down_proj`` adapted (3,072 LoRA parameters per rank), so that LoRA@2 is capacity-limited on
512 facts (10,190 bits) while LoRA@16 is not, and a step costs ~50 ms on one core.

Learning rates bracket the optimum (``bracket``): per family and budget, a grid of
``GRID`` × the family's start, 2x apart, swept on seed 0 and extended by one point beyond
whichever end holds the lowest validation loss until the best is interior (at most
``MAX_EXTENSIONS`` times; the JSON says when a rate is still at an edge). MoS's ranks and
ablation variants at one budget use the rate swept for MoS at r = 8e there; LoRA is swept at
every rank (each rank is its own budget).

    python -m benchmarks.capacity_model [--quick] [--results DIR] [--workers N]

Finished runs go to ``results/runs.jsonl`` (the suite's run cache), the summary to
``results/capacity_model.json``; an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from moslora import MoSConfig, solve_pools
from moslora.config import ConfigError

from . import environment, write_json
from .capacity_base import FFN, HEADS, HIDDEN, INIT_RANGE, LAYERS, TARGETS
from .quality import (Adapter, Runner, TrackSpec, _positive, _progress, _run_spec, _runner, _suite_dir,
                      ablations, lowest_loss, mos_rank, summarize)


SPEC = TrackSpec("capacity-model", ("facts:512",), budgets=(2, 4, 8), seeds=5, steps=0, batch_size=64,
                 max_length=16, eval_examples=512, test_examples=512, epochs=256.0, sweep_on="loss")
AXES = {"equal steps": 32.0, "convergence": 128.0}  # epochs; 8 steps each at batch 64
# the sweep: start x these (2x apart), extended beyond an edge until the best is interior
LR_START = {"lora": 1e-2, "mos": 1e-2, "vera": 4e-2, "vblora": 1e-2}
GRID = (0.25, 0.5, 1.0, 2.0)
MAX_EXTENSIONS = 3
PLATEAU = 2.0  # the plateau check trains this many times the convergence axis' epochs


# ------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Group:
    """Settings run together, in the order of what the verdict needs first."""

    name: str
    adapters: tuple[Adapter, ...]


def plan(budgets: tuple[int, ...], layers: int) -> list[Group]:
    """LoRA at every rank from 1 to 8·max(e); MoS at e with r = 4e and 8e (p = 1); VeRA,
    VB-LoRA, the ablation and the variants at the smallest budget. The smallest budget's
    settings first, the variants last."""
    e = budgets[0]
    lora = [Adapter("lora", r, rank=r) for r in sorted({1} | {k * b for b in budgets for k in (1, 2, 4, 8)})]
    mos = {b: [Adapter("mos", b, rank=mos_rank(b, layers, 1, k * b), private=1) for k in (4, 8)] for b in budgets}
    first = [a for a in lora if a.rank <= 8 * e] + mos[e]
    groups = [Group(f"e={e}", tuple(first)),
              Group("other methods and ablation", (Adapter("vera", e), Adapter("vblora", e),
                                                   *[a for a in ablations(e, mos[e][-1].rank) if a.tag]))]
    rest = [a for a in lora if a not in first] + [a for b in budgets[1:] for a in mos[b]]
    return groups + ([Group("larger budgets", tuple(rest))] if rest else []) + [
        Group("variants", variants(mos[e][-1]))]


def variants(full: Adapter) -> tuple[Adapter, ...]:
    """MoS with one ``MoSConfig`` variant switched on, each fixed before any run (not tuned):

    - layer scale: a trainable scale per rank and layer (at the largest rank whose pool can
      still pay for the scales: r = 8e uses every public shard);
    - pool lr ÷ √reuse: each public shard serves (r - p)/(e - p) layers and sums their
      gradients; under Adam that does not slow it, so damp its rate by √reuse (μP's fan-in rule);
    - pool A init ×¼: the shared A pool's random features start smaller, so training moves
      them further from what every layer shares at init;
    - shard privatization: half of full's private rank kept, as private shards (p = 0,
      ``private_shards`` = l/2, i.e. 1 at full's l = 2): each layer keeps half its private
      parameters, the other half-rank's worth goes back to the public pools, and all r ranks
      are routed, the first one's first shard (each side) the layer's own. Same parameters as
      full (both exactly LoRA@e), so it asks: is a layer's privacy worth more as one whole
      rank, or half of it as shards with one more public rank? (A rank has no half at l = 1:
      this needs l even.)
    """
    reuse = (full.rank - full.private) / (full.budget - full.private)
    scaled = replace(full, tag="layer scale", options=(("layer_scale", True),))
    return (replace(scaled, rank=_largest_rank_that_fits(scaled)),
            replace(full, tag="pool lr ÷ √reuse", options=(("pool_lr_scale", round(reuse ** -0.5, 4)),)),
            replace(full, tag="pool A init ×¼", options=(("pool_init_scale", 0.25),)),
            replace(full, tag="shard privatization", private=0,
                    options=(("private_shards", full.shards // 2),)))


def _largest_rank_that_fits(adapter: Adapter) -> int:
    """The highest rank <= ``adapter.rank`` that ``solve_pools`` accepts on the model's layers."""
    for rank in range(adapter.rank, 0, -1):
        cfg = dict(rank=rank, budget_rank=adapter.budget, private_rank=min(adapter.private, rank),
                   shards_per_vector=adapter.shards, **dict(adapter.options))
        try:
            solve_pools(MoSConfig(**cfg), LAYERS, FFN, HIDDEN)  # down_proj: FFN -> HIDDEN
            return rank
        except ConfigError:
            continue
    raise ConfigError("rank", f"{adapter.label} fits at no rank on the capacity model")


def probe(adapter: Adapter, layers: int) -> Adapter:
    """The setting whose sweep gives ``adapter`` its rate: itself for LoRA (each rank is a
    budget), VeRA, VB-LoRA and MoS's variants (a variant may move the optimum); MoS at r = 8e
    with p = 1 for every other MoS setting at budget e."""
    if adapter.method != "mos" or adapter.options:
        return adapter
    return Adapter("mos", adapter.budget, rank=mos_rank(adapter.budget, layers, 1, 8 * adapter.budget), private=1)


def bracket(spec: TrackSpec, task: str, probes: list[Adapter], runner: Runner,
            grid: tuple[float, ...] = GRID) -> dict[Adapter, dict[str, Any]]:
    """Per probe: its grid of rates with the seed-0 validation loss, the lowest-loss rate, and
    whether it is still at an edge after ``MAX_EXTENSIONS`` extensions (all probes advance
    together, so the runs of one round train side by side)."""
    rates = {p: [LR_START[p.family] * f for f in grid] for p in probes}
    for round_ in range(MAX_EXTENSIONS + 1):
        runs = [_run_spec(spec, task, p, lr, 0) for p in probes for lr in rates[p]]
        loss = {r["key"]: r["val_loss"] for r in runner.run_all(spec, runs)}
        scores = {p: {lr: loss[_run_spec(spec, task, p, lr, 0).key] for lr in rates[p]} for p in probes}
        edges = {p: _edge(scores[p]) for p in probes}
        if round_ == MAX_EXTENSIONS or not any(edges.values()):
            break
        for p, edge in edges.items():
            if edge == "low":
                rates[p].insert(0, rates[p][0] / 2)
            elif edge == "high":
                rates[p].append(rates[p][-1] * 2)
    return {p: {"probe": p.label, "grid": scores[p], "lr": lowest_loss(scores[p]), "at_edge": edges[p] or "",
                "sweep_runs": len(scores[p])} for p in probes}


def _edge(scores: dict[float, float]) -> str | None:
    """"low" or "high" when the lowest loss is at that end of the grid, else None. A grid whose
    every rate diverged is at its high edge (go lower)."""
    if all(math.isnan(s) for s in scores.values()):
        return "low"
    best = lowest_loss(scores)
    return "low" if best == min(scores) else "high" if best == max(scores) else None


def run_axis(spec: TrackSpec, groups: list[Group], runner: Runner,
             saved: Callable[[dict[str, Any]], None] = lambda axis: None) -> dict[str, Any]:
    """Every group's sweep then seeds, in order; returns the axis' rows and rates, handing
    the axis so far to ``saved`` after each group (a long suite is readable part-way)."""
    task = spec.tasks[0]
    rows, rates = [], {}
    axis: dict[str, Any] = {}
    for group in groups:
        probes = list(dict.fromkeys(probe(a, LAYERS) for a in group.adapters))
        found = bracket(spec, task, [p for p in probes if p.label not in rates], runner)
        rates.update({p.label: r for p, r in found.items()})
        runs = [[_run_spec(spec, task, a, rates[probe(a, LAYERS).label]["lr"], s)
                 for s in range(spec.seeds)] for a in group.adapters]
        records = {r["key"]: r for r in runner.run_all(spec, [run for row in runs for run in row])}
        rows += [{**summarize([records[run.key] for run in row]), "swept_on": probe(a, LAYERS).label}
                 for a, row in zip(group.adapters, runs)]
        axis = {"spec": asdict(spec), "steps": _steps(spec), "learning_rates": rates, "results": rows,
                "groups_done": [g.name for g in groups[:groups.index(group) + 1]]}
        saved(axis)
    return axis


def plateau(spec: TrackSpec, axis: dict[str, Any], runner: Runner) -> list[dict[str, Any]]:
    """Is "convergence" converged? Seed 0 of LoRA at e and 2e and MoS at e with r = 8e
    (e the smallest budget), trained ``PLATEAU`` times as long at the axis' rate: the bits
    each still gains (0 at a plateau)."""
    e, task = spec.budgets[0], spec.tasks[0]
    wanted = {f"LoRA r={e}", f"LoRA r={2 * e}", Adapter("mos", e, rank=mos_rank(e, LAYERS, 1, 8 * e)).label}
    rows = [r for r in axis["results"] if r["label"] in wanted]
    longer = replace(spec, epochs=spec.epochs * PLATEAU)
    runs = [_run_spec(longer, task, Adapter.from_dict(r["adapter"]), r["lr"], 0) for r in rows]
    records = {x["key"]: x for x in runner.run_all(longer, runs)}
    return [{"label": r["label"], "lr": r["lr"], "steps": (axis["steps"], _steps(longer)),
             "bits": (r["per_seed"]["bits"][0], records[run.key]["test_bits"]),
             "accuracy": (r["per_seed"]["accuracy"][0], records[run.key]["test_accuracy"])}
            for r, run in zip(rows, runs)]


def _steps(spec: TrackSpec) -> int:
    size = int(spec.tasks[0].partition(":")[2])
    return max(1, round(spec.epochs * size / spec.batch_size))


def quick_spec() -> TrackSpec:
    """A smoke run for the test suite: 32 facts, one budget, one seed, a few steps."""
    return replace(SPEC, tasks=("facts:32",), budgets=(2,), seeds=1, batch_size=16, eval_examples=32,
                   test_examples=32)


QUICK_AXES = {"equal steps": 1.0, "convergence": 2.0}


def run_capacity_model(quick: bool = False, results_dir: Path = Path("results"),
                       workers: int | None = None, axes: tuple[str, ...] = tuple(AXES)) -> dict[str, Any]:
    """Both axes (equal steps first: it is cheap and complete early), each group in order;
    writes ``capacity_model.json`` after every axis, so a partial suite is readable."""
    out = _suite_dir(Path(results_dir), quick)
    base = quick_spec() if quick else SPEC
    epochs = QUICK_AXES if quick else AXES
    groups = plan(base.budgets, LAYERS)
    if quick:  # the smallest setting of each method family, so the smoke run stays seconds
        groups = [Group("quick", (Adapter("lora", 2, rank=2), Adapter("lora", 16, rank=16),
                                  Adapter("mos", 2, rank=16, private=1)))]
    began = time.perf_counter()
    result: dict[str, Any] = {"suite": "capacity-model", "quick": quick, "environment": environment(),
                              "model": {"layers": LAYERS, "hidden": HIDDEN, "ffn": FFN, "heads": HEADS,
                                        "init_range": INIT_RANGE, "targets": TARGETS},
                              "grid": list(GRID), "lr_start": LR_START, "axes": {}}
    with _progress() as progress, _runner(out, progress, workers) as runner:
        runner.task_id = progress.add_task("capacity-model", total=None)
        for name in axes:
            def saved(axis: dict[str, Any], name: str = name) -> None:
                result["axes"][name] = {"epochs": epochs[name], **axis}
                seconds = [r.get("seconds", r["train_seconds"]) for r in runner.used.values()]
                result.update(runs=len(seconds), run_seconds=sum(seconds), wall_seconds=time.perf_counter() - began)
                write_json(out / "capacity_model.json", result)

            run_axis(replace(base, epochs=epochs[name]), groups, runner, saved)
        if "convergence" in result["axes"]:
            result["plateau"] = plateau(replace(base, epochs=epochs["convergence"]), result["axes"]["convergence"],
                                        runner)
            write_json(out / "capacity_model.json", result)
    from .capacity import plot_capacity_model

    plot_capacity_model(result, out / "capacity_model.png")
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a seconds-long smoke run (one seed, few steps)")
    ap.add_argument("--results", type=Path, default=Path("results"),
                    help="where the JSON and PNG go (finished runs are reused)")
    ap.add_argument("--axes", default=",".join(AXES), help="comma-separated: " + ", ".join(AXES))
    ap.add_argument("--workers", type=_positive, default=None,
                    help="runs trained side by side, each on cores/workers threads (default: 2 on 2+ cores)")
    args = ap.parse_args(argv)
    axes = tuple(a.strip() for a in args.axes.split(",") if a.strip())
    if not axes or set(axes) - set(AXES):
        ap.error(f"unknown axes {args.axes!r}; choose from {', '.join(AXES)}")
    run_capacity_model(quick=args.quick, results_dir=args.results, workers=args.workers, axes=axes)


if __name__ == "__main__":
    main()
