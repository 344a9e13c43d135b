"""The demo job: MoS on a small Llama, end to end, in about a minute on 2 CPU cores.

Build a Llama from a config (16 layers, so budget e = 2 reaches rank 16), adapt all seven
linear kinds, train a few steps so the adapters are non-zero, then show the parameter report
next to LoRA's, merge exactness, a save/load round trip and the export to PEFT LoRA.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM

from .checkpoint import export_peft_lora
from .config import MoSConfig
from .model import MoSModel, ParameterReport, get_mos_model

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def report_table(report: ParameterReport) -> Table:
    """The parameter report as a rich table, one row per layer kind."""
    table = Table(title="MoS parameters per layer kind (LoRA at the budget rank for comparison)")
    rows = report.rows()
    columns = ["kind", "L", "d_in", "d_out", "pool_shards", "private", "public", "total", "lora_e"]
    for col in columns:
        table.add_column(col, justify="left" if col == "kind" else "right")
    for row in rows:
        table.add_row(*(str(row[c]) if c == "kind" else f"{row[c]:,}" for c in columns))
    table.add_row("TOTAL", *[""] * 6, f"{report.total:,}", f"{report.lora_budget_total:,}")
    return table


def run_demo(steps: int = 30, console: Console | None = None) -> dict[str, float]:
    """Run the demo and return its measurements."""
    # piped output (CI logs, `| tee`) gets a fixed width rather than rich's 80 columns
    console = console or Console(width=None if sys.stdout.isatty() else 120)
    start = time.perf_counter()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        hidden_size=128, intermediate_size=352, num_hidden_layers=16, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512,
    )).eval()
    pristine = copy.deepcopy(base)
    cfg = MoSConfig(target_modules=KINDS, rank=16, budget_rank=2, shards_per_vector=2,
                    private_rank=1, alpha=16.0, seed=0)
    model = get_mos_model(base, cfg)
    report = model.parameter_report()
    console.print(report_table(report))
    table = Table(title="trainable parameters")
    table.add_column("adapter")
    table.add_column("params", justify="right")
    table.add_column("vs MoS", justify="right")
    for name, count in [(f"MoS r={cfg.rank}, e={cfg.budget_rank}", report.total),
                        (f"LoRA r={cfg.budget_rank} (the budget)", report.lora_budget_total),
                        (f"LoRA r={cfg.rank} (same per-layer rank)", report.lora_same_rank_total)]:
        table.add_row(name, f"{count:,}", f"{count / report.total:.1f}x")
    console.print(table)

    # a toy task: the sequence shifted by one token; a few AdamW steps make B non-zero
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 512, (8, 33), generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=data[:, :-1], labels=data[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    console.print(f"training loss: {losses[0]:.3f} -> {losses[-1]:.3f} over {steps} steps")

    probe = data[:4, :16]
    with torch.no_grad():
        logits = model(probe).logits
        model.merge()
        merged_diff = (model(probe).logits - logits).abs().max().item()
        model.unmerge()
        with tempfile.TemporaryDirectory() as tmp:
            mos_dir, peft_dir = Path(tmp) / "mos", Path(tmp) / "peft"
            model.save_pretrained(mos_dir)
            reloaded = MoSModel.from_pretrained(copy.deepcopy(pristine), mos_dir)
            reload_diff = (reloaded(probe).logits - logits).abs().max().item()
            export_peft_lora(model, peft_dir)
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(copy.deepcopy(pristine), peft_dir).eval()
            peft_diff = (peft_model(probe).logits - logits).abs().max().item()
            mos_bytes, peft_bytes = dir_bytes(mos_dir), dir_bytes(peft_dir)

    checks = Table(title="exactness (max |logit difference| vs the unmerged MoS model, fp32)")
    checks.add_column("check")
    checks.add_column("max abs diff", justify="right")
    checks.add_column("ok (<= 1e-5)")
    for name, diff in [("merged", merged_diff), ("saved -> loaded", reload_diff),
                       ("exported -> peft.PeftModel", peft_diff)]:
        checks.add_row(name, f"{diff:.2e}", "yes" if diff <= 1e-5 else "NO")
    console.print(checks)
    console.print(f"adapter on disk: MoS {mos_bytes:,} bytes, exported PEFT LoRA (rank {cfg.rank}) "
                  f"{peft_bytes:,} bytes ({peft_bytes / mos_bytes:.1f}x)")
    seconds = time.perf_counter() - start
    console.print(f"done in {seconds:.1f}s")
    return {"merged_diff": merged_diff, "reload_diff": reload_diff, "peft_diff": peft_diff,
            "mos_bytes": mos_bytes, "peft_bytes": peft_bytes, "loss_first": losses[0],
            "loss_last": losses[-1], "seconds": seconds}
