"""Fine-tuning with the Hugging Face Trainer: MoS (or PEFT LoRA, same settings) on a task.

``train(TrainConfig(...))`` loads a base model (the embedded SmolLM2 by default, or any local
HF folder or GGUF file), wraps it, trains on a task from ``moslora.data`` with AdamW, linear
warm-up and decay, gradient accumulation and clipping, evaluates every ``eval_steps``, keeps
the best checkpoint, and writes a run folder:

    run/adapter/        the adapter (MoS compact format, or PEFT LoRA for --method lora)
    run/metrics.json    final metrics, parameter counts, adapter bytes, time
    run/config.json     the TrainConfig
    run/loss.png        training and validation loss
    run/checkpoints/    Trainer checkpoints (resume with resume=True)
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    PrinterCallback,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from .assets import resolve_model
from .checkpoint import load_adapter_weights
from .config import MoSConfig, require_int
from .data import Task, collate, evaluate, load_task, tokenize_example
from .model import MoSModel, get_mos_model

Method = Literal["mos", "lora"]


@dataclass
class TrainConfig:
    """Everything a run needs; validated at construction.

    ``mos`` holds the adapter knobs; for ``method="lora"`` its ``target_modules``, ``rank``,
    ``alpha`` and ``dropout`` configure PEFT's LoRA so that both runs share their settings.
    """

    model: str | None = None
    task: str = "sentiment"
    method: Method = "mos"
    mos: MoSConfig = field(default_factory=lambda: MoSConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank=16, budget_rank=2, shards_per_vector=2, private_rank=1, alpha=32.0))
    output_dir: str = "runs/default"
    max_steps: int = 60
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_steps: int = 20
    train_examples: int | None = None
    eval_examples: int = 100
    test_examples: int = 300
    max_length: int = 128
    seed: int = 0
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.mos, dict):
            self.mos = MoSConfig.from_dict(self.mos)
        if self.method not in ("mos", "lora"):
            raise ValueError(f"method must be 'mos' or 'lora', got {self.method!r}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_steps", "eval_examples",
                     "test_examples", "max_length"):
            require_int(name, getattr(self, name), minimum=1)
        if self.train_examples is not None:
            require_int("train_examples", self.train_examples, minimum=1)
        if not (0 < self.learning_rate < 1):
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError("weight_decay must be >= 0 and max_grad_norm > 0")


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    adapter_dir: Path
    model: nn.Module
    tokenizer: Any
    task: Task


# ---------------------------------------------------------------------------- loading


def load_base(model: str | None, load_in_4bit: bool = False) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer from a local path, a GGUF file or the embedded default."""
    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if _bf16() else torch.float32}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
    base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if torch.cuda.is_available() and not load_in_4bit:
        base = base.cuda()
    return base, tokenizer


def _bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def wrap(base: nn.Module, method: Method, cfg: MoSConfig) -> nn.Module:
    """Attach a fresh adapter: MoS, or PEFT LoRA at MoS's per-layer rank with its settings."""
    if method == "mos":
        return get_mos_model(base, cfg)
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules, task_type="CAUSAL_LM"))


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------- trainer


class AdapterTrainer(Trainer):
    """The HF Trainer, saving and restoring only the adapter, plus the task metric at eval.

    The stock Trainer saves a non-``PreTrainedModel`` as its full state dict (the frozen base
    included); an ``MoSModel`` saves its compact adapter instead and reloads it on resume and
    for the best checkpoint. PEFT models keep the Trainer's own handling.
    """

    def __init__(self, *args: Any, task_metric: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.task_metric = task_metric

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        if self.task_metric is not None:
            extra = {f"eval_{k}": v for k, v in self.task_metric(self.model).items()}
            metrics.update(extra)
            self.log(extra)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, MoSModel):
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            output_dir = output_dir or self.args.output_dir
            model.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self.accelerator.unwrap_model(model or self.model)
        if not isinstance(target, MoSModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_weights(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        target = self.accelerator.unwrap_model(self.model)
        if not isinstance(target, MoSModel):
            return super()._load_best_model()
        load_adapter_weights(target, self.state.best_model_checkpoint)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop at the first NaN/Inf loss, before the step's checkpoint is written.

    The Trainer logs before it saves, so raising here keeps the checkpoints on disk the last
    good ones, and the message says which to resume from.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingDiverged(
                f"training loss became {loss} at step {state.global_step}; last good checkpoint: "
                f"{_last_checkpoint(args.output_dir) or 'none'}. Lower learning_rate (or raise "
                "max_grad_norm's strictness) and resume or restart"
            )


def _last_checkpoint(output_dir: str) -> str | None:
    steps = [(int(p.name.split("-")[1]), p) for p in Path(output_dir).glob("checkpoint-*")
             if p.name.split("-")[1].isdigit()]
    return str(max(steps)[1]) if steps else None


class RichProgress(TrainerCallback):
    """A rich progress bar: step, loss, seconds per step, ETA."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.loss = float("nan")
        self.started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[sps]:.2f} s/step"),
            TimeRemainingColumn())
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           loss=float("nan"), sps=0.0)
        self.started, self.first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None and logs and "loss" in logs:
            self.loss = logs["loss"]

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is None:
            return
        done = max(1, state.global_step - self.first_step)
        self.progress.update(self.task, completed=state.global_step, loss=self.loss,
                             sps=(time.perf_counter() - self.started) / done)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _dataset(task: Task, split: str, tokenizer: Any, cfg: TrainConfig, limit: int | None) -> list[dict]:
    examples = getattr(task, split)[:limit]
    return [tokenize_example(tokenizer, e, cfg.max_length) for e in examples]


def training_arguments(cfg: TrainConfig, run_dir: Path, task: Task) -> TrainingArguments:
    best_metric = "eval_accuracy" if task.label_words else "eval_loss"
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=best_metric,
        greater_is_better=bool(task.label_words),
        logging_steps=1,
        logging_nan_inf_filter=False,  # report a NaN loss (StopOnNonFiniteLoss), don't average it away
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=_bf16(),
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        label_names=["labels"],  # MoSModel.forward takes **kwargs, so the Trainer cannot infer it
        disable_tqdm=True,
        report_to=[],
        dataloader_num_workers=0,
    )


# ---------------------------------------------------------------------------- the run


def train(cfg: TrainConfig, base: nn.Module | None = None, tokenizer: Any = None) -> TrainResult:
    """Fine-tune ``cfg.method`` on ``cfg.task`` and write the run folder (see module doc).

    ``base`` / ``tokenizer`` may be passed in (already loaded); else ``cfg.model`` is loaded.
    """
    started = time.perf_counter()
    run_dir = Path(cfg.output_dir)
    set_seed(cfg.seed)
    if base is None:
        base, tokenizer = load_base(cfg.model, cfg.load_in_4bit)
    task = load_task(cfg.task, seed=cfg.seed)
    model = wrap(base, cfg.method, cfg.mos)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    def task_metric(m: nn.Module) -> dict[str, float]:
        limited = Task(task.name, [], task.validation[:cfg.eval_examples], [], task.label_words)
        return evaluate(m, tokenizer, limited, "validation", cfg.max_length, cfg.batch_size)

    pad_id = tokenizer.pad_token_id
    trainer = AdapterTrainer(
        model=model,
        args=training_arguments(cfg, run_dir, task),
        train_dataset=_dataset(task, "train", tokenizer, cfg, cfg.train_examples),
        eval_dataset=_dataset(task, "validation", tokenizer, cfg, cfg.eval_examples),
        data_collator=lambda features: collate(features, pad_id),
        callbacks=[StopOnNonFiniteLoss()] + ([RichProgress()] if cfg.progress else []),
        task_metric=task_metric if task.label_words else None,
    )
    if cfg.progress:
        trainer.remove_callback(PrinterCallback)  # the progress bar replaces the printed logs
    trainer.train(resume_from_checkpoint=cfg.resume or None)

    adapter_dir = run_dir / "adapter"
    test = evaluate(model, tokenizer, Task(task.name, [], [], task.test[:cfg.test_examples],
                                           task.label_words), "test", cfg.max_length, cfg.batch_size)
    metrics = {
        "method": cfg.method,
        "task": cfg.task,
        **{f"test_{k}": v for k, v in test.items()},
        "trainable_params": trainable_parameters(model),
        "steps": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
    }
    if trainer.is_world_process_zero():  # under DDP every rank holds the same adapter
        model.save_pretrained(adapter_dir)
        metrics["adapter_bytes"] = dir_bytes(adapter_dir)
        metrics["seconds"] = time.perf_counter() - started
        _write_json(run_dir / "metrics.json", metrics)
        _write_json(run_dir / "config.json", _config_dict(cfg))
        plot_losses(trainer.state.log_history, run_dir / "loss.png")
    return TrainResult(metrics, adapter_dir, model, tokenizer, task)


def dir_bytes(path: Path) -> int:
    """Bytes of all files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    data = asdict(cfg)
    data["mos"] = cfg.mos.to_dict()
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def plot_losses(log_history: list[dict[str, Any]], path: Path) -> None:
    """Training loss per step and validation loss per evaluation, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    valid = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for points, label, style in ((train, "train", "-"), (valid, "validation", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
