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
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from accelerate.utils import broadcast_object_list
from transformers import (
    AutoModelForCausalLM,
    PrinterCallback,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

from .assets import DEFAULT_MODEL_NAMES, resolve_model
from .atomic import (atomic_file, publish_directory, remove_directory, remove_stale_staging,
                     staging_directory)
from .checkpoint import load_adapter_weights
from .config import (MAX_SEED, ConfigError, MoSConfig, require_bool, require_choice, require_float,
                     require_int)
from .data import TASKS, Task, collate, evaluate, load_task, tokenize_example
from .model import MoSModel, get_mos_model

Method = Literal["mos", "lora"]
MIN_LENGTH = 8  # max_length: room for a short prompt and its answer


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
        if not isinstance(self.mos, MoSConfig):
            raise ConfigError("mos", f"mos must be a MoSConfig or a dict of its fields, got {self.mos!r}")
        require_choice("method", self.method, ("mos", "lora"))
        check_task(self.task)
        check_model(self.model)
        _check_output_dir(self.output_dir)
        for name in ("max_steps", "batch_size", "grad_accum", "eval_steps", "eval_examples",
                     "test_examples"):
            require_int(name, getattr(self, name), minimum=1)
        require_int("max_length", self.max_length, minimum=MIN_LENGTH)
        if self.train_examples is not None:
            require_int("train_examples", self.train_examples, minimum=1)
        require_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        require_float("learning_rate", self.learning_rate, low=0.0, high=1.0, low_open=True, high_open=True)
        require_float("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0, high_open=True)
        require_float("weight_decay", self.weight_decay, low=0.0)
        require_float("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        for name in ("gradient_checkpointing", "load_in_4bit", "resume", "progress"):
            require_bool(name, getattr(self, name))
        if self.resume:
            resume_checkpoint(self)


def check_task(task: Any) -> None:
    """Raise ``ConfigError`` unless ``task`` is a built-in task or an existing .jsonl/.csv file."""
    if isinstance(task, str) and task in TASKS:
        return
    path = Path(task) if isinstance(task, (str, os.PathLike)) else None
    if path is None or path.suffix not in (".jsonl", ".csv"):
        raise ConfigError("task", f"task must be one of {' | '.join(TASKS)} or a .jsonl / .csv file, "
                                  f"got {task!r}")
    if not path.is_file():
        raise ConfigError("task", f"task file {str(path)!r} does not exist")


def check_model(model: Any) -> None:
    """Raise ``ConfigError`` unless ``model`` is the default or an existing path."""
    if model in DEFAULT_MODEL_NAMES:
        return
    if not isinstance(model, (str, os.PathLike)) or not Path(model).expanduser().exists():
        raise ConfigError("model", f"model {model!r} does not exist: use 'smollm2' (the default), a "
                                   "local Hugging Face model folder or a .gguf file")


def _check_output_dir(output_dir: Any) -> None:
    if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
        raise ConfigError("output_dir", f"output_dir must be a directory path, got {output_dir!r}")
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ConfigError("output_dir", f"output_dir {str(output_dir)!r} exists and is not a directory")


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

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """HF's checkpoint, written to a staging directory and renamed into place when complete.

        The steps and their order are ``transformers.Trainer._save_checkpoint``'s (adapter,
        optimizer, scheduler, scaler, RNG states, trainer state, then rotation of old
        checkpoints); only the destination differs. A run killed at any point therefore leaves
        every ``checkpoint-N`` complete or absent, and the next save removes the staging
        directories of killed ones. Hyperparameter-search trials and hub pushes, which
        ``train`` never uses, keep HF's own in-place write.
        """
        if trial is not None or self.args.push_to_hub:
            return super()._save_checkpoint(model, trial)
        self.store_flos()
        run_dir = Path(self._get_output_dir(trial=None))
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = self._staging_for(final)
        self.save_model(str(staging), _internal_call=True)
        self.accelerator.wait_for_everyone()  # don't write beside a model save still in flight
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(staging))
            self._save_scaler(str(staging))
            self._save_rng_state(str(staging))
        best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
        # the best checkpoint may be the one being written, which has no final name yet
        if self.state.best_global_step and (self.state.best_global_step == self.state.global_step
                                            or best.exists()):
            self.state.best_model_checkpoint = str(best)
        if self.args.should_save:
            self._store_callback_states()
            self.state.save_to_json(str(staging / TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every process has written its files (rng_state_<rank>)
        if self.args.should_save:
            publish_directory(staging, final)
            self._rotate_checkpoints(run_dir)
        self.accelerator.wait_for_everyone()

    def _staging_for(self, final: Path) -> Path:
        """The main process's fresh staging directory for ``final``, known to every process."""
        staging = [None]
        if self.args.should_save:
            remove_stale_staging(final.parent)  # killed saves of any step, not only this one
            staging = [staging_directory(final)]
        return Path(broadcast_object_list(staging)[0])

    def _rotate_checkpoints(self, run_dir: Path) -> None:
        """HF's rotation (keep the newest ``save_total_limit``, never the latest or the best),
        but each deletion is atomic, so a kill never leaves a half-deleted ``checkpoint-N``."""
        limit = self.args.save_total_limit
        ordered = sort_checkpoints(str(run_dir), use_mtime=True)
        if not limit or limit <= 0 or len(ordered) <= limit:
            return
        protected = {ordered[-1]}
        if self.state.best_model_checkpoint is not None:
            protected.add(str(Path(self.state.best_model_checkpoint)))
        deletable = [c for c in ordered if c not in protected]
        for checkpoint in deletable[:len(ordered) - max(limit, len(protected))]:
            remove_directory(checkpoint)

    def _store_callback_states(self) -> None:
        """Record stateful callbacks (early stopping, ...) in the state, as HF's save does."""
        for cb in self.callback_handler.callbacks + [self.control]:
            if not isinstance(cb, ExportableState):
                continue
            name = cb.__class__.__name__
            if isinstance(self.state.stateful_callbacks[name], list):
                self.state.stateful_callbacks[name].append(cb.state())
            else:
                self.state.stateful_callbacks[name] = cb.state()

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
                f"{last_checkpoint(args.output_dir) or 'none'}. Lower learning_rate (or raise "
                "max_grad_norm's strictness) and resume or restart"
            )


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The complete checkpoint of the highest step in ``output_dir``, or None.

    Complete means it holds the trainer state, which is written last: with atomic saves every
    ``checkpoint-N`` is complete, and this also skips a half-deleted or half-written one left
    by an older version or another tool. Staging directories (``.checkpoint-N.tmp-*``) never
    match.
    """
    steps = [(int(match[1]), p) for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if (match := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", p.name))
             and (p / TRAINER_STATE_NAME).is_file()]
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


def training_arguments(cfg: TrainConfig, task: Task) -> TrainingArguments:
    best_metric = "eval_accuracy" if task.label_words else "eval_loss"
    return TrainingArguments(
        output_dir=str(checkpoint_dir(cfg)),
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
        args=training_arguments(cfg, task),
        train_dataset=_dataset(task, "train", tokenizer, cfg, cfg.train_examples),
        eval_dataset=_dataset(task, "validation", tokenizer, cfg, cfg.eval_examples),
        data_collator=lambda features: collate(features, pad_id),
        callbacks=[StopOnNonFiniteLoss()] + ([RichProgress()] if cfg.progress else []),
        task_metric=task_metric if task.label_words else None,
    )
    if cfg.progress:
        trainer.remove_callback(PrinterCallback)  # the progress bar replaces the printed logs
    trainer.train(resume_from_checkpoint=resume_checkpoint(cfg) if cfg.resume else None)

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


def checkpoint_dir(cfg: TrainConfig) -> Path:
    """Where the Trainer's ``checkpoint-N`` directories of a run go."""
    return Path(cfg.output_dir) / "checkpoints"


def resume_checkpoint(cfg: TrainConfig) -> str:
    """The checkpoint ``resume=True`` continues from: the run's last complete one."""
    last = last_checkpoint(checkpoint_dir(cfg))
    if last is None:
        raise ConfigError("resume", f"resume=True but {checkpoint_dir(cfg)} holds no complete checkpoint "
                                    "(checkpoint-N with trainer_state.json); drop resume to start afresh")
    return last


def dir_bytes(path: Path) -> int:
    """Bytes of all files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    data = asdict(cfg)
    data["mos"] = cfg.mos.to_dict()
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


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
