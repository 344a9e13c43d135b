"""``TrainConfig``: everything a fine-tuning run needs, validated at construction.

It lives apart from ``moslora.train`` (which imports the Hugging Face Trainer, several
seconds) so that the ``moslora`` command can read its defaults for ``--help`` cheaply.
``moslora.train`` re-exports every name here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .assets import DEFAULT_MODEL_NAMES
from .base import bf16_supported
from .config import (MAX_SEED, ConfigError, MoSConfig, default_targets, require_bool, require_choice, require_float,
                     require_int)
from . import memorization
from .tasks import MEMORIZATION_TASKS, TASKS, needs_base

Method = Literal["mos", "lora"]
MIN_LENGTH = 8  # max_length: room for a short prompt and its answer
# learning-rate schedules of the HF Trainer (transformers.SchedulerType) that need no extra
# arguments
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup", "inverse_sqrt")
# transformers' names (trainer_utils.PREFIX_CHECKPOINT_DIR, trainer.TRAINER_STATE_NAME),
# written out because importing those modules costs seconds; tests/test_train.py checks them
CHECKPOINT_PREFIX = "checkpoint"
TRAINER_STATE_NAME = "trainer_state.json"
# what a run writes into its output_dir besides checkpoints (see moslora.train)
RUN_OUTPUTS = ("adapter", "metrics.json", "config.json", "loss.png")


@dataclass
class TrainConfig:
    """Everything a run needs; validated at construction.

    ``mos`` holds the adapter knobs; for ``method="lora"`` its ``target_modules``, ``rank``,
    ``alpha`` and ``dropout`` configure PEFT's LoRA so that both runs share their settings.
    An ``output_dir`` that holds a previous run is refused unless ``resume`` (continue it) or
    ``overwrite`` (delete it first) says what to do with it. ``eval_file`` (a .jsonl/.csv
    file) replaces the task's validation and test splits: then every example of ``task``
    trains. ``save_steps`` defaults to ``eval_steps``; ``bf16`` ``None`` means "when the GPU
    supports it".
    """

    model: str | None = None
    task: str = "sentiment"
    eval_file: str | None = None
    method: Method = "mos"
    mos: MoSConfig = field(default_factory=lambda: MoSConfig(
        target_modules=default_targets("llama"),
        rank=16, budget_rank=2, shards_per_vector=2, private_rank=1, alpha=32.0))
    output_dir: str = "runs/default"
    max_steps: int = 60
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-3
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_steps: int = 20
    save_steps: int | None = None
    logging_steps: int = 1
    train_examples: int | None = None
    eval_examples: int = 100
    test_examples: int = 300
    max_length: int = 128
    seed: int = 0
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.mos, dict):
            self.mos = MoSConfig.from_dict(self.mos)
        if not isinstance(self.mos, MoSConfig):
            raise ConfigError("mos", f"mos must be a MoSConfig or a dict of its fields, got {self.mos!r}")
        require_choice("method", self.method, ("mos", "lora"))
        check_task(self.task)
        if self.eval_file is not None:
            check_data_file("eval_file", self.eval_file)
        check_model(self.model)
        _check_output_dir(self.output_dir)
        for name in ("max_steps", "batch_size", "grad_accum", "eval_steps", "logging_steps",
                     "eval_examples", "test_examples"):
            require_int(name, getattr(self, name), minimum=1)
        require_int("max_length", self.max_length, minimum=MIN_LENGTH)
        for name in ("train_examples", "save_steps"):
            if getattr(self, name) is not None:
                require_int(name, getattr(self, name), minimum=1)
        if self.save_steps is not None and self.save_steps % self.eval_steps:
            # the best checkpoint is chosen among evaluated ones, so saves must follow evals
            raise ConfigError("save_steps", f"save_steps={self.save_steps} must be a multiple of "
                                            f"eval_steps={self.eval_steps}")
        require_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        require_float("learning_rate", self.learning_rate, low=0.0, high=1.0, low_open=True, high_open=True)
        require_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        require_float("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0, high_open=True)
        require_float("weight_decay", self.weight_decay, low=0.0)
        require_float("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        for name in ("gradient_checkpointing", "load_in_4bit", "resume", "overwrite", "progress"):
            require_bool(name, getattr(self, name))
        if self.bf16 is not None:
            require_bool("bf16", self.bf16)
            if self.bf16 and not bf16_supported():
                raise ConfigError("bf16", "bf16=True needs a GPU with bfloat16 support, and this "
                                          "machine has none: leave bf16 unset (auto) or False")
        self._check_run_folder()

    def _check_run_folder(self) -> None:
        """A fresh run never starts beside another run's checkpoints or results."""
        if self.resume and self.overwrite:
            raise ConfigError("overwrite", "resume continues the run in output_dir and overwrite "
                                           "deletes it: pass only one of them")
        if self.resume:
            resume_checkpoint(self)
            return
        found = previous_run(self.output_dir)
        if found and not self.overwrite:
            raise ConfigError("output_dir", f"output_dir {self.output_dir!r} holds a previous run "
                                            f"({', '.join(found[:3])}): resume it (--resume), "
                                            "replace it (--overwrite) or choose another output_dir")

    @property
    def use_bf16(self) -> bool:
        """Whether the run computes in bfloat16 (``bf16``, or auto: when the GPU supports it)."""
        return bf16_supported() if self.bf16 is None else self.bf16


def check_task(task: Any) -> None:
    """Raise ``ConfigError`` unless ``task`` is a built-in task or an existing .jsonl/.csv file."""
    if isinstance(task, str) and task in TASKS:
        return
    if isinstance(task, str) and task.partition(":")[0] in MEMORIZATION_TASKS:
        # its size is checked when the task loads, before the model does; an optional asset
        # that set-up could not have is said here, before anything loads
        reason = memorization.wikidata_unavailable() if needs_base(task) else None
        if reason:
            raise ConfigError("task", reason)
        return
    names = " | ".join([*TASKS, *(f"{k}:N" for k in MEMORIZATION_TASKS)])
    check_data_file("task", task, f"task must be one of {names} or a .jsonl / .csv file")


def check_data_file(name: str, path: Any, expected: str | None = None) -> None:
    """Raise ``ConfigError`` (field ``name``) unless ``path`` is an existing .jsonl/.csv file."""
    as_path = Path(path) if isinstance(path, (str, os.PathLike)) else None
    if as_path is None or as_path.suffix not in (".jsonl", ".csv"):
        raise ConfigError(name, f"{expected or f'{name} must be a .jsonl / .csv file'}, got {path!r}")
    if not as_path.is_file():
        raise ConfigError(name, f"{name} file {str(as_path)!r} does not exist")


def check_model(model: Any) -> None:
    """Raise ``ConfigError`` unless ``model`` is the default, an HF folder or a .gguf file."""
    if model in DEFAULT_MODEL_NAMES:
        return
    usable = "use 'smollm2' (the default), a local Hugging Face model folder or a .gguf file"
    if not isinstance(model, (str, os.PathLike)) or not Path(model).expanduser().exists():
        raise ConfigError("model", f"model {model!r} does not exist: {usable}")
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError("model", f"model folder {str(model)!r} has no config.json, so it is not a "
                                   f"Hugging Face model folder: {usable}")
    if path.is_file() and path.suffix != ".gguf":
        raise ConfigError("model", f"model file {str(model)!r} is not a .gguf file: {usable}")


def _check_output_dir(output_dir: Any) -> None:
    if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
        raise ConfigError("output_dir", f"output_dir must be a directory path, got {output_dir!r}")
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ConfigError("output_dir", f"output_dir {str(output_dir)!r} exists and is not a directory")


def checkpoint_dir(cfg: TrainConfig) -> Path:
    """Where the Trainer's ``checkpoint-N`` directories of a run go."""
    return Path(cfg.output_dir) / "checkpoints"


def previous_run(output_dir: str | Path) -> list[str]:
    """What a previous run left in ``output_dir``: its checkpoints and outputs (relative paths).

    Staging directories of killed saves do not count: the next save removes them.
    """
    run = Path(output_dir)
    checkpoints = sorted(f"checkpoints/{p.name}" for p in (run / "checkpoints").glob(f"{CHECKPOINT_PREFIX}-*")
                         if re.fullmatch(rf"{CHECKPOINT_PREFIX}-\d+", p.name))
    return checkpoints + [name for name in RUN_OUTPUTS if (run / name).exists()]


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The complete checkpoint of the highest step in ``output_dir``, or None.

    Complete means it holds the trainer state, which is written last: with atomic saves every
    ``checkpoint-N`` is complete, and this also skips a half-deleted or half-written one left
    by an older version or another tool. Staging directories (``.checkpoint-N.tmp-*``) never
    match.
    """
    steps = [(int(match[1]), p) for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}-*")
             if (match := re.fullmatch(rf"{CHECKPOINT_PREFIX}-(\d+)", p.name))
             and (p / TRAINER_STATE_NAME).is_file()]
    return str(max(steps)[1]) if steps else None


def resume_checkpoint(cfg: TrainConfig) -> str:
    """The checkpoint ``resume=True`` continues from: the run's last complete one."""
    last = last_checkpoint(checkpoint_dir(cfg))
    if last is None:
        raise ConfigError("resume", f"resume=True but {checkpoint_dir(cfg)} holds no complete checkpoint "
                                    "(checkpoint-N with trainer_state.json); drop resume to start afresh")
    return last
