"""Serving many adapters on one base: MoS mixed batches vs PEFT mixed batches vs a merged model.

One small Llama from a config (hidden 512, 4 layers, all 7 linear kinds; the same base as
step_time.py) and N MoS adapters (r = 16 at the budget of LoRA rank e = 8, random weights, a
seed each). For each N, one batch of 32 x 64 tokens per repetition with a fresh random
adapter per row, forward only (prefill), timed interleaved across

- ``mos``: ``MultiAdapterModel`` (factors assembled per call);
- ``mos_cache``: the same with a ``FactorCache`` budget (hot adapters' factors kept dense);
- ``peft``: ``PeftModel`` with the same adapters exported by ``export_peft_lora`` and
  ``adapter_names=[...]`` (PEFT's mixed-batch inference);
- ``merged``: one adapter merged into the base (the ceiling: no adapter work at all).

Memory: resident adapter bytes of MoS (compact form) vs LoRA at rank 8e (the paper's
equal-quality setting) vs LoRA at rank e, and PEFT's actual resident bytes (rank r).
Writes results/serving.json and results/serving.png.

    python benchmarks/serving.py [--adapters 1 10 50 200] [--threads 1 2] [--reps 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from peft import PeftModel
from step_time import KINDS, build_base

from moslora import MoSConfig, MoSModel, ParameterReport, export_peft_lora, get_mos_model
from moslora.serving import FactorCache, MultiAdapterModel

Forward = Callable[[torch.Tensor, list[str | None]], torch.Tensor]


def make_adapters(base: torch.nn.Module, cfg: MoSConfig, count: int, root: Path) -> tuple[list[Path], ParameterReport]:
    """``count`` adapters with random non-zero weights, each saved as MoS and exported to PEFT
    (``root/mos{i}``, ``root/peft{i}``). Returns the MoS directories and the parameter report."""
    dirs = []
    for i in range(count):
        model = get_mos_model(copy.deepcopy(base), MoSConfig(**{**cfg.to_dict(), "seed": i}))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.mos_pools.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        model.save_pretrained(root / f"mos{i}")
        export_peft_lora(model, root / f"peft{i}")
        dirs.append(root / f"mos{i}")
    return dirs, model.parameter_report()


def build_systems(
    base: torch.nn.Module, dirs: list[Path], cache_bytes: int
) -> tuple[dict[str, Forward], dict[str, int], FactorCache]:
    """The four contenders over the same ``len(dirs)`` adapters, their resident adapter bytes,
    and the cache of ``mos_cache``."""
    names = [f"a{i}" for i in range(len(dirs))]
    mos, mos_cache = MultiAdapterModel(copy.deepcopy(base)), MultiAdapterModel(copy.deepcopy(base), cache_bytes)
    for name, path in zip(names, dirs):
        mos.load_adapter(name, path)
        mos_cache.load_adapter(name, path)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), dirs[0].with_name("peft0"), adapter_name=names[0])
    for name, path in zip(names[1:], dirs[1:]):
        peft.load_adapter(path.with_name(path.name.replace("mos", "peft")), adapter_name=name)
    merged = MoSModel.from_pretrained(copy.deepcopy(base), dirs[0]).merge_and_unload()
    systems: dict[str, Forward] = {
        "mos": lambda ids, rows: mos(ids, adapter_names=rows).logits,
        "mos_cache": lambda ids, rows: mos_cache(ids, adapter_names=rows).logits,
        "peft": lambda ids, rows: peft(input_ids=ids, adapter_names=rows).logits,
        "merged": lambda ids, rows: merged(input_ids=ids).logits,
    }
    peft_bytes = sum(p.numel() * p.element_size() for n, p in peft.named_parameters() if "lora_" in n)
    memory = {"mos": mos.memory_report()["adapters_total"], "peft_rank_r": peft_bytes}
    return systems, memory, mos_cache.cache


def run(systems: dict[str, Forward], count: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Interleaved timings: each repetition draws a batch and a random adapter per row, then
    runs every system on it, so that load from other processes hits all of them alike."""
    gen = torch.Generator().manual_seed(count)
    times: dict[str, list[float]] = {name: [] for name in systems}
    for rep in range(args.warmup + args.reps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        rows = [f"a{int(i)}" for i in torch.randint(0, count, (args.batch,), generator=gen)]
        for name, forward in systems.items():
            start = time.perf_counter()
            with torch.no_grad():
                forward(ids, rows)
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return times


def max_diffs(systems: dict[str, Forward], count: int, args: argparse.Namespace) -> dict[str, float]:
    """Sanity: MoS (both) vs PEFT on a mixed batch; MoS vs the merged model on adapter 0 rows;
    and how far the adapters move the logits from the base (so the other checks have teeth)."""
    ids = torch.randint(0, args.vocab, (4, 16), generator=torch.Generator().manual_seed(1))
    rows = [f"a{i % count}" for i in range(4)]
    with torch.no_grad():
        out = {name: forward(ids, rows) for name, forward in systems.items()}
        first = systems["mos"](ids, ["a0"] * 4)
        bare = systems["mos"](ids, [None] * 4)
    return {
        "mos_vs_base": (out["mos"] - bare).abs().max().item(),
        "mos_vs_peft": (out["mos"] - out["peft"]).abs().max().item(),
        "mos_cache_vs_peft": (out["mos_cache"] - out["peft"]).abs().max().item(),
        "mos_a0_vs_merged": (first - out["merged"]).abs().max().item(),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result["runs"]) + 1, figsize=(5 * (len(result["runs"]) + 1), 4))
    for ax, run_ in zip(axes, result["runs"]):
        ns = [row["adapters"] for row in run_["rows"]]
        for name in ("mos", "mos_cache", "peft", "merged"):
            ax.plot(ns, [row["tokens_per_s"][name] for row in run_["rows"]], marker="o", label=name)
        ax.set(xscale="log", xlabel="adapters resident (N)", ylabel="tokens/s (prefill)",
               title=f"{run_['threads']} thread(s), batch {result['config']['batch']}x{result['config']['seq']}")
        ax.set_ylim(bottom=0)
        ax.legend()
    ax = axes[-1]
    mem = result["memory"]
    ns = [row["adapters"] for row in mem]
    cfg = result["config"]
    e, r = cfg["budget_rank"], cfg["rank"]
    for key, label, style in (("mos", f"MoS (budget e={e}, r={r})", "o-"), ("lora_e", f"LoRA rank e={e}", "x--"),
                              ("lora_8e", f"LoRA rank 8e={8 * e}", "s-"), ("peft_rank_r", f"PEFT as served (rank {r})", "^-")):
        ax.plot(ns, [row[key] / 2**20 for row in mem], style, label=label)
    ax.set(xscale="log", yscale="log", xlabel="adapters resident (N)", ylabel="MiB", title="resident adapter memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 10, 50, 200])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--budget-rank", type=int, default=8)
    ap.add_argument("--private-rank", type=int, default=1)
    ap.add_argument("--shards-per-vector", type=int, default=2)
    ap.add_argument("--cache-mb", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default="results/serving.json")
    args = ap.parse_args()

    base = build_base(args.hidden, args.layers).eval()
    args.vocab = base.config.vocab_size
    cfg = MoSConfig(target_modules=KINDS, rank=args.rank, budget_rank=args.budget_rank,
                    private_rank=args.private_rank, shards_per_vector=args.shards_per_vector)
    result = {
        "benchmark": "serving",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {k: v for k, v in vars(args).items()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "load_average_at_start": os.getloadavg(),
        "memory": [],
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        dirs, report = make_adapters(base, cfg, max(args.adapters), Path(tmp))
        lora_bytes = {rank: 4 * sum(p.lora_params(rank) for p in report.kinds.values())
                      for rank in (args.budget_rank, 8 * args.budget_rank, args.rank)}
        runs = {threads: {"threads": threads, "rows": []} for threads in args.threads}
        for count in args.adapters:
            systems, memory, cache = build_systems(base, dirs[:count], args.cache_mb * 2**20)
            # PEFT's measured bytes must match the formula, so the LoRA rows below are right too
            assert memory["peft_rank_r"] == count * lora_bytes[args.rank], memory
            result["memory"].append({
                "adapters": count, "mos": memory["mos"], "peft_rank_r": memory["peft_rank_r"],
                "lora_8e": count * lora_bytes[8 * args.budget_rank], "lora_e": count * lora_bytes[args.budget_rank],
                "mos_over_lora_8e": memory["mos"] / (count * lora_bytes[8 * args.budget_rank]),
            })
            diffs = max_diffs(systems, count, args)
            for threads in args.threads:
                torch.set_num_threads(threads)
                hits, misses = cache.hits, cache.misses
                times = run(systems, count, args)
                med = {name: statistics.median(ts) for name, ts in times.items()}
                tps = {name: args.batch * args.seq / m for name, m in med.items()}
                row = {
                    "adapters": count,
                    "median_seconds": med,
                    "tokens_per_s": tps,
                    "mos_over_peft": tps["mos"] / tps["peft"],
                    "mos_over_merged": tps["mos"] / tps["merged"],
                    "mos_cache_over_peft": tps["mos_cache"] / tps["peft"],
                    "mos_cache_over_merged": tps["mos_cache"] / tps["merged"],
                    "cache_hit_rate": (cache.hits - hits) / max(1, cache.hits - hits + cache.misses - misses),
                    "cache_bytes": cache.bytes,
                    "max_abs_diff": diffs,
                    # other processes on the machine skew multi-threaded runs: keep the evidence
                    "load_average": os.getloadavg(),
                    "seconds": times,
                }
                runs[threads]["rows"].append(row)
                print(f"threads={threads} N={count:>3}: tokens/s mos {tps['mos']:.0f}  mos+cache "
                      f"{tps['mos_cache']:.0f}  peft {tps['peft']:.0f}  merged {tps['merged']:.0f}  | "
                      f"mos/peft {row['mos_over_peft']:.2f}  mos/merged {row['mos_over_merged']:.2f}  "
                      f"cache/merged {row['mos_cache_over_merged']:.2f}  diff {diffs['mos_vs_peft']:.1e}",
                      flush=True)
            del systems
        result["runs"] = list(runs.values())
    result["load_average_at_end"] = os.getloadavg()
    result["targets"] = {"mos_over_lora_8e": 1 / 8, "mos_over_peft_at_50": 2.0, "mos_over_merged": 0.7}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    for row in result["memory"]:
        print(f"N={row['adapters']:>3}: MoS {row['mos'] / 2**20:.1f} MiB, LoRA-8e {row['lora_8e'] / 2**20:.1f} MiB, "
              f"LoRA-e {row['lora_e'] / 2**20:.1f} MiB, MoS/LoRA-8e = {row['mos_over_lora_8e']:.4f} (target <= 0.125)")


if __name__ == "__main__":
    main()
