"""Fine-tuning with the Hugging Face Trainer: MoS (or PEFT LoRA, same settings) on a task.

``train(TrainConfig(...))`` loads a base model (the embedded SmolLM2 by default, or any local
HF folder or GGUF file), wraps it, trains on a task (``moslora.data.load_task``) with AdamW, linear
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
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from accelerate.utils import broadcast_object_list
from transformers import (
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import sort_checkpoints

from .atomic import (atomic_file, publish_directory, remove_directory, remove_stale_staging,
                     staging_directory)
from .checkpoint import load_adapter_weights
from .config import ConfigError, solve_pools
from .base import load_base, model_skeleton
from .data import load_task
from .model import MoSModel, wrap
from .scoring import answer_scores, classification_metrics, evaluate
from .sizes import adapter_bytes, trainable_parameters
from .targeting import find_targets, group_kinds
from .tasks import Scorer, Task, needs_base
from .tokenizing import collate, tokenize_example
# re-exported: moslora.train is where users import the run's config from
from .train_config import (CHECKPOINT_PREFIX, RUN_OUTPUTS, TRAINER_STATE_NAME, Method, TrainConfig,
                           checkpoint_dir, last_checkpoint, resume_checkpoint)

__all__ = ["AdapterTrainer", "Method", "TrainConfig", "TrainResult", "TrainingDiverged", "checkpoint_dir",
           "last_checkpoint", "resume_checkpoint", "train"]


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    adapter_dir: Path
    model: nn.Module
    tokenizer: Any
    task: Task


# ---------------------------------------------------------------------------- loading


def check_fit(cfg: TrainConfig, base: nn.Module) -> None:
    """Raise ``ConfigError`` unless ``cfg``'s adapter fits ``base`` (or its ``model_skeleton``):
    every target matches a linear layer, and MoS's rank fits each kind's budget."""
    try:
        names = find_targets(base, cfg.mos.target_modules)
    except ValueError as err:
        raise ConfigError("target_modules", str(err)) from None
    if cfg.method == "mos":
        for kind in group_kinds(base, names):
            solve_pools(cfg.mos, len(kind.layers), kind.d_in, kind.d_out, kind.pattern)


def load_run_task(cfg: TrainConfig, scorer: Scorer | None = None) -> Task:
    """``cfg``'s task (with its ``eval_file``), a data error raised as a ``ConfigError``;
    ``scorer`` for a task that picks its items with the base (``needs_base``)."""
    try:
        return load_task(cfg.task, seed=cfg.seed, eval_file=cfg.eval_file, scorer=scorer)
    except ValueError as err:
        raise ConfigError("task", str(err)) from None


# ---------------------------------------------------------------------------- trainer


# What AdapterTrainer still takes from transformers' private API, with the parameters it passes
# or receives: the checkpoint writer it replaces (atomic checkpoints; no public hook decides
# where a checkpoint is written), the three steps of it that it calls in HF's order, and the
# two loaders it overrides so that resume and the best checkpoint read the compact adapter.
# Saving goes through the public save_model. tests/test_transformers_api.py checks these
# against the installed transformers; pyproject.toml bounds transformers to the tested minor.
TRAINER_PRIVATE: dict[str, tuple[str, ...]] = {
    "_save_checkpoint": ("model", "trial"),
    "_save_optimizer_and_scheduler": ("output_dir",),
    "_save_scaler": ("output_dir",),
    "_save_rng_state": ("output_dir",),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_best_model": (),
}


class AdapterTrainer(Trainer):
    """The HF Trainer, saving and restoring only the adapter, evaluating with the task metric.

    The stock Trainer saves a non-``PreTrainedModel`` as its full state dict (the frozen base
    included); an ``MoSModel`` saves its compact adapter instead and reloads it on resume and
    for the best checkpoint. PEFT models keep the Trainer's own handling.
    """

    def __init__(self, *args: Any, task_metric: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.task_metric = task_metric

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """With a task metric, its one pass over the validation examples is the evaluation
        (accuracy and loss, as the benchmark scores); HF's loop would run a second pass over
        the same examples for the loss alone. Callbacks see the metrics as after HF's loop."""
        if self.task_metric is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.task_metric(self.model).items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """An ``MoSModel`` writes its compact adapter (from the main process); others save as HF
        saves them."""
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, MoSModel):
            return super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            model.save_pretrained(output_dir or self.args.output_dir)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """HF's checkpoint, written to a staging directory and renamed into place when complete.

        The steps and their order are ``transformers.Trainer._save_checkpoint``'s (adapter,
        optimizer, scheduler, scaler, RNG states, trainer state, then rotation of old
        checkpoints); only the destination differs. A run killed at any point therefore leaves
        every ``checkpoint-N`` complete or absent, and the next save removes the staging
        directories of killed ones. Hyperparameter-search trials and hub pushes, which
        ``train`` never uses, keep HF's own in-place write.

        No public hook says where or how a checkpoint is written, so this one overrides a
        private method and calls three more (``TRAINER_PRIVATE``).
        """
        if trial is not None or self.args.push_to_hub:
            return super()._save_checkpoint(model, trial)
        self.store_flos()
        run_dir = Path(self.args.output_dir)  # where HF puts checkpoints outside a search trial
        final = run_dir / f"{CHECKPOINT_PREFIX}-{self.state.global_step}"
        staging = self._staging_for(final)
        self.save_model(str(staging), _internal_call=True)
        self.accelerator.wait_for_everyone()  # don't write beside a model save still in flight
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(staging))
            self._save_scaler(str(staging))
            self._save_rng_state(str(staging))
        best = run_dir / f"{CHECKPOINT_PREFIX}-{self.state.best_global_step}"
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
        """Record stateful callbacks (early stopping, ...) in the state, as HF's save does (its
        ``_save_checkpoint`` writes this inline: there is no method of it to call)."""
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


class RichProgress(TrainerCallback):
    """A rich progress bar: step, the latest training and evaluation loss, seconds per step, ETA."""

    def __init__(self, console: Any = None) -> None:
        self.console = console  # a rich Console; None draws on the terminal
        self.progress: Progress | None = None
        self.fields = {"loss": "-", "eval_loss": "-", "sps": 0.0}
        self.started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("eval loss {task.fields[eval_loss]}"),
            TextColumn("{task.fields[sps]:.2f} s/step"), TimeRemainingColumn(), console=self.console)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           **self.fields)
        self.started, self.first_step = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            done = max(1, state.global_step - self.first_step)
            self.fields["sps"] = (time.perf_counter() - self.started) / done
            self.progress.update(self.task, completed=state.global_step, **self.fields)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # the Trainer logs a step's loss after that step's on_step_end: updating the bar only
        # there would show the previous step's loss
        if self.progress is None or not logs:
            return
        for key in ("loss", "eval_loss"):
            if key in logs:
                self.fields[key] = f"{logs[key]:.4f}"
        self.progress.update(self.task, completed=state.global_step, **self.fields)

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
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps or cfg.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=best_metric,
        greater_is_better=bool(task.label_words),
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # report a NaN loss (StopOnNonFiniteLoss), don't average it away
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.use_bf16,
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

    ``base`` / ``tokenizer`` may be passed in (already loaded); else ``cfg.model`` is loaded,
    after the data and the adapter's fit to the model's config have been checked (bad data or
    an unfit rank raise ``ConfigError`` in seconds, not after minutes of loading).
    """
    started = time.perf_counter()
    run_dir = Path(cfg.output_dir)
    set_seed(cfg.seed)
    # wikidata keeps the facts the base gets wrong: that check waits for the base
    task = None if needs_base(cfg.task) else load_run_task(cfg)
    check_fit(cfg, base if base is not None else model_skeleton(cfg.model))
    if base is None:
        base, tokenizer = load_base(cfg.model, cfg.load_in_4bit, cfg.bf16)
    if task is None:
        task = load_run_task(cfg, partial(answer_scores, base, tokenizer, cfg.max_length))
    model = wrap(base, cfg.method, cfg.mos)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    def task_metric(m: nn.Module) -> dict[str, float]:
        return classification_metrics(m, tokenizer, task.validation[:cfg.eval_examples], task.label_words,
                                      cfg.max_length, cfg.batch_size)

    args = training_arguments(cfg, task)
    if cfg.overwrite:
        with args.main_process_first(desc="deleting the previous run"):  # the others wait for it
            if args.process_index == 0:
                clear_run(run_dir)
    pad_id = tokenizer.pad_token_id
    trainer = AdapterTrainer(
        model=model,
        args=args,
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
    test = evaluate(model, tokenizer, replace(task, train=[], validation=[], test=task.test[:cfg.test_examples]),
                    "test", cfg.max_length, cfg.batch_size)
    history = trainer.state.log_history
    metrics = {
        "method": cfg.method,
        "task": cfg.task,
        "task_path": str(Path(cfg.task).resolve()) if Path(cfg.task).suffix else None,
        "eval_file": str(Path(cfg.eval_file).resolve()) if cfg.eval_file else None,
        **{f"test_{k}": v for k, v in test.items()},
        "examples": {"train": len(trainer.train_dataset), "validation": len(trainer.eval_dataset),
                     "test": len(task.test[:cfg.test_examples])},
        "trainable_params": trainable_parameters(model),
        "steps": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "train_loss": [[h["step"], h["loss"]] for h in history if "loss" in h],
        "eval_loss": [[h["step"], h["eval_loss"]] for h in history if "eval_loss" in h],
    }
    if trainer.is_world_process_zero():  # under DDP every rank holds the same adapter
        model.save_pretrained(adapter_dir)
        metrics["adapter_bytes"] = adapter_bytes(adapter_dir)
        metrics["seconds"] = time.perf_counter() - started
        _write_json(run_dir / "metrics.json", metrics)
        _write_json(run_dir / "config.json", _config_dict(cfg))
        plot_losses(history, run_dir / "loss.png", f"{cfg.method} on {task.name}")
    return TrainResult(metrics, adapter_dir, model, tokenizer, task)


def clear_run(run_dir: Path) -> None:
    """Delete what a previous run left in ``run_dir`` (``overwrite=True``), and nothing else.

    Each directory is renamed away in one step before it is deleted, so a kill meanwhile
    never leaves a half-deleted checkpoint that a later run could mistake for its own.
    """
    for name in ("checkpoints", *RUN_OUTPUTS):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            remove_directory(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    data = asdict(cfg)
    data["mos"] = cfg.mos.to_dict()
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


def loss_figure(log_history: list[dict[str, Any]], title: str):
    """A matplotlib figure of the training loss per step and the validation loss per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    valid = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for points, label, style in ((train, "train", "-"), (valid, "validation", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_losses(log_history: list[dict[str, Any]], path: Path, title: str) -> None:
    """``loss_figure`` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = loss_figure(log_history, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
