"""The demo jobs.

``run_finetune_demo`` (``make demo``): the embedded SmolLM2-135M-Instruct, zero-shot on the
``sentiment`` task, then an MoS fine-tune and the same evaluation again, with parameters and
adapter bytes next to LoRA's, and the PEFT export checked against the MoS model.

``run_selfcheck`` (``moslora selfcheck``, seconds): a small Llama built from a config
(16 layers, so budget e = 2 reaches rank 16), a few training steps, then the parameter
report, merge exactness, a save/load round trip and the export to PEFT LoRA.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM

from .checkpoint import export_peft_lora
from .config import MoSConfig, default_targets
from .model import MoSModel, ParameterReport, get_mos_model
from .sizes import adapter_bytes
from .train_config import TrainConfig

DEMO_DIR = "runs/demo"  # the demo's run folder: each demo replaces the last



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


def run_selfcheck(steps: int = 30, console: Console | None = None) -> dict[str, float]:
    """Run the self-check and return its measurements."""
    # piped output (CI logs, `| tee`) gets a fixed width rather than rich's 80 columns
    console = console or Console(width=None if sys.stdout.isatty() else 120)
    start = time.perf_counter()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        hidden_size=128, intermediate_size=352, num_hidden_layers=16, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512,
    )).eval()
    pristine = copy.deepcopy(base)
    cfg = MoSConfig(target_modules=default_targets("llama"), rank=16, budget_rank=2, shards_per_vector=2,
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
            export_peft_lora(model, peft_dir, overwrite=True)
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(copy.deepcopy(pristine), peft_dir).eval()
            peft_diff = (peft_model(probe).logits - logits).abs().max().item()
            mos_bytes, peft_bytes = adapter_bytes(mos_dir), adapter_bytes(peft_dir)

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


def run_finetune_demo(steps: int = TrainConfig.max_steps, test_examples: int = TrainConfig.test_examples,
                      output_dir: str = DEMO_DIR, console: Console | None = None) -> dict[str, float]:
    """Zero-shot, fine-tune, evaluate again; print the table; write ``output_dir/metrics.json``.

    The run is ``TrainConfig``'s default one (MoS on sentiment), with ``steps`` and a small
    validation set."""
    from .base import load_base
    from .data import load_task
    from .scoring import evaluate
    from .tasks import Task
    from .train import train

    console = console or Console(width=None if sys.stdout.isatty() else 120)
    start = time.perf_counter()
    base, tokenizer = load_base(None)
    pristine = copy.deepcopy(base)
    # overwrite: the demo's folder holds the demo's last run, which a new demo replaces
    cfg = TrainConfig(output_dir=output_dir, max_steps=steps, eval_steps=max(1, steps // 2),
                      eval_examples=48, test_examples=test_examples, overwrite=True)
    task = load_task(cfg.task, seed=cfg.seed)
    test = Task(task.name, [], [], task.test[:test_examples], task.label_words)
    console.print(f"[bold]zero-shot[/bold] SmolLM2-135M-Instruct on {len(test.test)} test reviews ...")
    before = evaluate(base, tokenizer, test, "test", cfg.max_length, cfg.batch_size)["accuracy"]
    console.print(f"accuracy before: {before:.3f}; fine-tuning MoS for {steps} steps ...")
    result = train(cfg, base=base, tokenizer=tokenizer)
    model: MoSModel = result.model
    report = model.parameter_report()
    console.print(report_table(report))

    # export to PEFT and check that a fresh base + PEFT gives the MoS model's logits
    peft_dir = Path(output_dir) / "adapter-peft"
    export_peft_lora(model, peft_dir, overwrite=True)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(pristine, peft_dir).eval()
    probe = tokenizer([e.prompt for e in test.test[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        export_diff = (peft_model(**probe).logits - model.eval()(**probe).logits).abs().max().item()

    e, r = cfg.mos.budget_rank, cfg.mos.rank
    metrics = {
        "accuracy_before": before,
        "accuracy_after": result.metrics["test_accuracy"],
        "test_examples": len(test.test),
        "steps": steps,
        "trainable_params": report.total,
        "lora_params_same_rank": report.lora_same_rank_total,
        "lora_params_8e": sum(p.lora_params(8 * e) for p in report.kinds.values()),
        "adapter_bytes": result.metrics["adapter_bytes"],
        "lora_adapter_bytes_same_rank": adapter_bytes(peft_dir),
        "peft_export_max_logit_diff": export_diff,
        "seconds": time.perf_counter() - start,
    }
    table = Table(title=f"MoS fine-tune of SmolLM2-135M-Instruct on sentiment ({steps} steps)")
    for col in ("", "MoS (r=%d, e=%d)" % (r, e), "LoRA r=%d (= 8e)" % (8 * e) if 8 * e == r else "LoRA r=%d" % r):
        table.add_column(col, justify="right")
    table.add_row("accuracy", f"{before:.3f} -> {metrics['accuracy_after']:.3f}", "")
    table.add_row("trainable params", f"{report.total:,}", f"{report.lora_same_rank_total:,}")
    table.add_row("adapter bytes", f"{metrics['adapter_bytes']:,}", f"{metrics['lora_adapter_bytes_same_rank']:,}")
    table.add_row("PEFT export max |logit diff|", f"{export_diff:.1e}", "")
    table.add_row("run time", f"{metrics['seconds']:.0f} s", "")
    console.print(table)
    out = Path(output_dir) / "metrics.json"
    out.write_text(json.dumps(metrics, indent=2))
    console.print(f"wrote {out}")
    return metrics
