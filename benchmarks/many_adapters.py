"""Serving 1,000 MoS adapters from disk on one base: start-up, first- and later-request latency,
resident bytes under a budget, next to what LoRA at rank 8e would hold for the same count.

The base is the embedded SmolLM2-135M-Instruct; every adapter has the serving benchmark's
SmolLM2 shape (r = 16 at the budget of LoRA rank e = 2, all 7 kinds, p = 1, l = 2). They are
made quickly, not trained: one MoS model, its pools drawn afresh for each adapter and saved
(so they share the seed's routing indices, which the registry holds once; a few kB per
adapter against its ~2.5 MB of pools).

Measured through the model API (``MultiAdapterModel(adapter_root=..., max_resident_bytes=...)``,
what ``moslora serve --adapters ROOT --max-resident-bytes N`` builds), not over HTTP, so the
figures are the registry's and the model's, without tokenizing or queueing:

- start-up: constructing the model over the root and listing ``available()`` (no adapter is
  read), against loading every adapter at start as the server did before (timed on a sample
  and scaled to the count);
- requests: one row of ``prompt`` tokens, greedy ``new_tokens``; *first* = an adapter's first
  use (read, validated, made resident, maybe evicting), *later* = an adapter already resident,
  and the bare base, interleaved (medians, and the medians of the paired differences); and a
  mixed batch of ``batch`` rows naming ``batch`` adapters never used before;
- memory: resident adapter bytes after serving ``distinct`` different adapters under the
  budget, the resident count, loads and evictions; all adapters resident at once (the bytes of
  one adapter times the count) and LoRA at rank 8e and e for the same count (PEFT's rank-r
  bytes formula, as benchmarks/serving.py states them).

Writes results/serving_adapters.json (``--quick``: runs/serving-adapters-quick.json).

    python benchmarks/many_adapters.py [--quick] [--adapters 1000] [--budget-mb 128]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from moslora import MoSConfig, get_mos_model
from moslora.serving import MultiAdapterModel

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG = MoSConfig(target_modules=KINDS, rank=16, budget_rank=2, private_rank=1, shards_per_vector=2)


def make_adapters(base: torch.nn.Module, root: Path, count: int) -> dict[int, int]:
    """``count`` adapters ``root/a0000 ..``, each with fresh random pools (existing ones kept);
    returns LoRA's parameter count per adapter at ranks e and 8e, for the memory comparison."""
    model = get_mos_model(copy.deepcopy(base), CONFIG)
    with torch.no_grad():
        for i in range(count):
            path = root / f"a{i:04d}"
            if path.is_dir():
                continue
            gen = torch.Generator().manual_seed(i)
            for p in model.mos_pools.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            model.save_pretrained(path)
    kinds = model.parameter_report().kinds.values()
    return {rank: sum(k.lora_params(rank) for k in kinds) for rank in (CONFIG.budget_rank, 8 * CONFIG.budget_rank)}


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {"median": statistics.median(ordered), "p90": ordered[int(0.9 * (len(ordered) - 1))],
            "min": ordered[0], "max": ordered[-1], "count": len(ordered)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from moslora.base import load_base

    torch.set_num_threads(args.threads)
    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = load_base(None)[0].eval()
    lora_params = make_adapters(base, root, args.adapters)
    setup = time.perf_counter() - start
    names = sorted(p.name for p in root.iterdir() if p.is_dir())[: args.adapters]
    budget = args.budget_mb * 2**20

    # start-up: the registry over the root, against loading every adapter (timed on a sample)
    mm = None

    def start_up() -> None:
        nonlocal mm
        mm = MultiAdapterModel(base, adapter_root=root, max_resident_bytes=budget)
        assert len(mm.available()) >= len(names)

    startup = timed(start_up)
    eager = MultiAdapterModel(base)
    sample = names[: args.eager_sample]
    eager_seconds = timed(lambda: [eager.load_adapter(n, root / n) for n in sample])
    one_adapter = eager.memory_report()["adapters_total"] / len(sample)
    for n in sample:
        eager.unload_adapter(n)
    del eager

    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    rng = random.Random(0)
    ids = torch.randint(0, base.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    mm.generate(ids, adapter_names=[None], **gen)  # warm the base (first-call allocations)
    # interleaved, so that the load of a shared machine hits the three alike: each round times
    # an adapter's first use, a request to an adapter used before, and the bare base
    cold = rng.sample(names, args.requests)
    first, later, base_only = [], [], []
    for i, name in enumerate(cold):
        first.append(timed(lambda: mm.generate(ids, adapter_names=[name], **gen)))
        warm = rng.choice([n for n in cold[: i + 1] if n in mm.adapters()])
        later.append(timed(lambda: mm.generate(ids, adapter_names=[warm], **gen)))
        base_only.append(timed(lambda: mm.generate(ids, adapter_names=[None], **gen)))
    batch_ids = ids.expand(args.batch, -1)
    untouched = [n for n in names if n not in set(cold)]
    fresh = rng.sample(untouched, args.batch)
    mixed_first = timed(lambda: mm.generate(batch_ids, adapter_names=fresh, **gen))
    mixed_later = timed(lambda: mm.generate(batch_ids, adapter_names=fresh, **gen))

    # memory: keep serving distinct adapters under the budget
    for n in rng.sample(untouched, min(args.distinct, len(untouched))):
        mm(ids[:, :4], adapter_names=[n])
    report = mm.memory_report()
    count = len(names)
    e = CONFIG.budget_rank
    lora_8e, lora_e = (4 * count * lora_params[rank] for rank in (8 * e, e))  # float32
    return {
        "adapters_on_disk": count,
        "adapter_bytes_on_disk": sum(f.stat().st_size for f in (root / names[0]).iterdir()),
        "setup_seconds": setup,
        "startup": {
            "lazy_seconds": startup,
            "eager_seconds_per_adapter": eager_seconds / len(sample),
            "eager_seconds_estimated": eager_seconds / len(sample) * count,
            "eager_sample": len(sample),
        },
        "requests": {
            "shape": f"1 row, {args.prompt} prompt tokens, {args.new_tokens} new tokens (greedy)",
            "first_use_seconds": summary(first),
            "later_seconds": summary(later),
            "base_seconds": summary(base_only),
            "first_use_overhead_seconds": statistics.median(f - w for f, w in zip(first, later)),
            "adapter_overhead_seconds": statistics.median(w - b for w, b in zip(later, base_only)),
            f"mixed_{args.batch}_rows_first_use_seconds": mixed_first,
            f"mixed_{args.batch}_rows_later_seconds": mixed_later,
        },
        "memory": {
            "budget_bytes": budget,
            "distinct_adapters_served": len(set(cold) | set(fresh)) + min(args.distinct, len(untouched)),
            "resident_adapters": len(report["adapters"]),
            "resident_bytes": report["adapters_total"],
            "loads": mm.stats.loads,
            "evictions": mm.stats.evictions,
            "over_budget_calls": mm.stats.over_budget,
            "mos_one_adapter_bytes": one_adapter,
            "mos_all_resident_bytes": one_adapter * count,
            "lora_8e_all_bytes": lora_8e,
            "lora_e_all_bytes": lora_e,
            "lora_8e_one_adapter_bytes": lora_8e / count,
            "mos_over_lora_8e": one_adapter / (lora_8e / count),
            "lora_8e_adapters_in_budget": int(budget // (lora_8e / count)),
        },
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="50 adapters, 5 requests; writes runs/")
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--root", type=Path, default=Path("build/many-adapters"),
                    help="where the adapters are written (kept between runs; never committed)")
    ap.add_argument("--budget-mb", type=int, default=128, help="max_resident_bytes, in MiB")
    ap.add_argument("--requests", type=int, default=20, help="first-use and later requests timed")
    ap.add_argument("--distinct", type=int, default=200, help="further distinct adapters served for the memory figures")
    ap.add_argument("--batch", type=int, default=8, help="rows (and new adapters) of the mixed first-use batch")
    ap.add_argument("--eager-sample", type=int, default=20, help="adapters loaded eagerly to time start-up as before")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.adapters, args.requests, args.distinct, args.eager_sample = 50, 5, 20, 5
    args.out = args.out or Path("runs/serving-adapters-quick.json" if args.quick else "results/serving_adapters.json")
    return args


def main() -> None:
    args = parse_args()
    result = {
        "benchmark": "serving_adapters",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "mos_config": CONFIG.to_dict(),
        "measured_through": "the model API (MultiAdapterModel over the adapter root), not HTTP",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "load_average_at_start": os.getloadavg(),
        **run(args),
        "load_average_at_end": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    s, r, m = result["startup"], result["requests"], result["memory"]
    print(f"{result['adapters_on_disk']} adapters on disk: start-up {s['lazy_seconds']:.2f} s "
          f"(loading all at start: ~{s['eager_seconds_estimated']:.0f} s)")
    print(f"request: first use {r['first_use_seconds']['median']:.3f} s, later {r['later_seconds']['median']:.3f} s, "
          f"base {r['base_seconds']['median']:.3f} s (medians)")
    print(f"resident {m['resident_bytes'] / 2**20:.1f} MiB ({m['resident_adapters']} adapters) under "
          f"{m['budget_bytes'] / 2**20:.0f} MiB after {m['distinct_adapters_served']} distinct; all {result['adapters_on_disk']}: "
          f"MoS {m['mos_all_resident_bytes'] / 2**30:.2f} GiB vs LoRA@8e {m['lora_8e_all_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
