"""Training step time of MoS vs PEFT LoRA at the same per-layer rank, on one small Llama.

Both models wrap identical copies of one base (hidden 512, 4 layers, all 7 linear kinds) and
run forward+backward+AdamW on the same batch (8 x 128 tokens). Steps are interleaved
(MoS, LoRA, MoS, ...) so that load from other processes hits both alike; the ratio of
medians is the number to read. Writes results/step_time.json.

    python benchmarks/step_time.py [--steps 20] [--rank 16] [--budget-rank 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from moslora import MoSConfig, get_mos_model

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(hidden: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, vocab_size=8192,
    )
    return LlamaForCausalLM(cfg)


def step_fn(model: torch.nn.Module, batch: torch.Tensor):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    # 4 layers cap the rank at p + (e - p)·4 under subset selection, so e = 8 allows r = 16
    ap.add_argument("--budget-rank", type=int, default=8)
    ap.add_argument("--private-rank", type=int, default=1)
    ap.add_argument("--shards-per-vector", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default="results/step_time.json")
    args = ap.parse_args()

    base = build_base(args.hidden, args.layers)
    mos = get_mos_model(copy.deepcopy(base), MoSConfig(
        target_modules=KINDS, rank=args.rank, budget_rank=args.budget_rank,
        shards_per_vector=args.shards_per_vector, private_rank=args.private_rank,
    ))
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=KINDS))
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    steps = {"mos": step_fn(mos.train(), batch), "lora": step_fn(lora.train(), batch)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            t = step()
            if i >= args.warmup:
                times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = med["mos"] / med["lora"]
    result = {
        "benchmark": "step_time",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": vars(args),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "threads": torch.get_num_threads(),
        "median_seconds": med,
        "seconds": times,
        "trainable_params": {"mos": mos.trainable_parameters(),
                             "lora": sum(p.numel() for p in lora.parameters() if p.requires_grad)},
        "ratio_mos_over_lora": ratio,
        "target": 1.10,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"median step: MoS {med['mos']:.3f}s  LoRA {med['lora']:.3f}s  "
          f"ratio MoS/LoRA = {ratio:.3f} (target <= 1.10)")
    print(f"trainable: MoS {result['trainable_params']['mos']:,}  LoRA {result['trainable_params']['lora']:,}")


if __name__ == "__main__":
    main()
