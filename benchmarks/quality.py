"""Quality at matched parameter budgets: MoS vs PEFT LoRA, VeRA and VB-LoRA, and ablations.

Two tracks, both offline:
  encoder  all-MiniLM-L6-v2 (BERT, 6 layers) + a linear classification head, on ``sentiment``
           and ``party``; the head is trained identically for every method (same init per
           seed, same learning rate) and counted apart from the adapter.
  llm      SmolLM2-135M-Instruct as instruction tuning on ``sentiment`` (label-word scoring).

For each budget ``e`` the suite trains PEFT LoRA at ranks e, 2e, 4e, 8e, PEFT VeRA and PEFT
VB-LoRA sized to LoRA@e's parameter count, MoS at budget e with per-layer rank 4e and 8e
(capped where subset selection cannot reach it, see ``mos_rank``), and our LoRA-equivalent
MoS setting; VeRA runs once when its capped rank is the same at every budget. Every run uses
the same data order, steps, schedule and seeds; the learning rate of each method family comes
from the same four-point sweep around a family default, on seed 0 of the smallest budget and
the track's first task (see ``pick_rate`` for the choice); the LLM track also scores the
base model zero-shot. Runs train two at a time in worker processes (``default_workers``).
Finished runs are appended to ``runs.jsonl`` in the results folder and skipped when the
suite runs again.

    python -m benchmarks.quality [--quick] [--results DIR] [--tracks encoder,llm,capacity] [--no-ablation]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import hashlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from transformers import get_linear_schedule_with_warmup

from moslora import MoSConfig, get_mos_model, memorization
from moslora.config import default_targets
from moslora.data import load_task
from moslora.layer import linear_shape
from moslora.noise import peft_calls
from moslora.scoring import answer_scores, classification_metrics
from moslora.sizes import adapter_bytes
from moslora.targeting import find_targets
from moslora.tasks import Example, Task, needs_base
from moslora.tokenizing import answer_window, collate, tokenize_example

from . import RunStore, capacity_base, environment, read_json, write_json

TRACKS = ("encoder", "llm", "capacity")
# learning-rate sweep: the same four points (default / 3 ... default * 9) per family, around
# each method's usual default (VeRA and VB-LoRA train few scalars / a small bank and are tuned
# at higher rates in their papers). A first three-point grid put LoRA's and VB-LoRA's best
# rate on its upper edge, so the grid reaches one step further up for everyone.
LR_DEFAULTS = {"lora": 1e-3, "mos": 1e-3, "vera": 1e-2, "vblora": 3e-3}
LR_FACTORS = (1 / 3, 1.0, 3.0, 9.0)
VBLORA_RANK, VBLORA_VECTOR = 4, 64
# VeRA's trainable count grows by only one scalar per layer per rank, so matching LoRA@e takes
# r in the thousands, and its compute grows with r (x @ A costs d_in·r per token): r = 4032 ran
# 5x slower than LoRA on the encoder, r = 1024 3.5x. We cap r at PEFT's default, 256, to fit the
# suite's time budget; VeRA's point then sits left of the others on the parameter axis, and
# its JSON row records the rank the budget would have needed.
VERA_MAX_RANK = 256


# --------------------------------------------------------------------------------- adapters

@dataclass(frozen=True)
class Adapter:
    """One adapter setting. ``rank`` is the per-layer rank (VeRA's and VB-LoRA's sizes are
    solved from ``budget`` on the model at hand); ``budget`` is the LoRA rank e it is matched to."""

    method: str  # lora | vera | vblora | mos | lora-eq | none
    budget: int
    rank: int = 0
    private: int = 1
    shards: int = 2
    subset: bool = True
    pair: bool = True
    tag: str = ""  # names an ablation variant
    options: tuple[tuple[str, Any], ...] = ()  # further MoSConfig fields, as (name, value) pairs

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Adapter":
        """The setting a result row's ``adapter`` (its JSON form) describes."""
        return cls(**{**data, "options": tuple(tuple(o) for o in data.get("options", ()))})

    @property
    def family(self) -> str:
        """Whose learning rate it uses: LoRA-equivalent MoS is checked at LoRA's."""
        return "lora" if self.method == "lora-eq" else self.method

    @property
    def label(self) -> str:
        if self.method == "lora":
            return f"LoRA r={self.rank}"
        if self.method == "mos":
            return f"MoS e={self.budget} r={self.rank}" + (f" ({self.tag})" if self.tag else "")
        if self.method == "none":
            return "no adapter (zero-shot)"
        names = {"vera": "VeRA", "vblora": "VB-LoRA", "lora-eq": "MoS as LoRA"}
        return f"{names[self.method]} (e={self.budget})"


def mos_rank(budget: int, layers: int, private: int, want: int) -> int:
    """``want``, or the largest rank subset selection allows: (e - p)·L >= r - p."""
    return min(want, private + (budget - private) * layers)


def lora_count(dims: list[tuple[int, int]], rank: int) -> int:
    """Trainable parameters of LoRA at ``rank`` over layers of ``dims`` (d_in, d_out)."""
    return rank * sum(i + o for i, o in dims)


def vera_rank(dims: list[tuple[int, int]], budget: int) -> tuple[int, int]:
    """VeRA's rank at LoRA@budget's parameter count over layers of ``dims`` (d_in, d_out):
    (the rank used, capped at VERA_MAX_RANK; the rank the count alone would ask for).
    VeRA trains lambda_d (r) and lambda_b (d_out) per layer."""
    matched = max(1, round((lora_count(dims, budget) - sum(o for _, o in dims)) / len(dims)))
    return min(matched, VERA_MAX_RANK), matched


def suite(budgets: tuple[int, ...], layers: int, dims: list[tuple[int, int]],
          private: int = 1) -> list[Adapter]:
    """Every setting of the quality suite for these budgets, over ``layers`` blocks whose
    adapted layers have ``dims`` (LoRA ranks deduplicated; VeRA once per distinct rank)."""
    ranks = sorted({k * e for e in budgets for k in (1, 2, 4, 8)})
    adapters = [Adapter("lora", r, rank=r) for r in ranks]
    # the LoRA-equivalent setting is a correctness check: once, at the smallest budget
    adapters.append(Adapter("lora-eq", budgets[0], rank=budgets[0]))
    vera_ranks = set()
    for e in budgets:
        r, _ = vera_rank(dims, e)
        if r not in vera_ranks:  # capped at a larger budget, VeRA would repeat the same runs
            adapters.append(Adapter("vera", e))
            vera_ranks.add(r)
        adapters.append(Adapter("vblora", e))
        p = min(private, e - 1)  # at e = 1 every rank is public: p = e leaves the pools empty
        mos = {mos_rank(e, layers, p, k * e) for k in (4, 8)}
        adapters += [Adapter("mos", e, rank=r, private=p) for r in sorted(mos)]
    return adapters


def ablations(budget: int, rank: int) -> list[Adapter]:
    """MoS full, each strategy removed, and pure sharing (all four off), at one budget."""
    # "full" is the quality suite's own MoS setting (untagged), so its runs are shared
    full = Adapter("mos", budget, rank=rank, private=1, shards=2)
    return [full,
            replace(full, subset=False, tag="no subset selection"),
            replace(full, pair=False, tag="no pair dissociation"),
            replace(full, shards=1, tag="no vector sharding"),
            replace(full, private=0, tag="no privatization"),
            replace(full, subset=False, pair=False, shards=1, private=0, tag="pure sharing")]


def attach(base: nn.Module, adapter: Adapter, targets: list[str] | str, seed: int) -> tuple[nn.Module, dict]:
    """Wrap ``base`` (frozen) with ``adapter``; returns the model and the sizes it solved."""
    if adapter.method == "none":  # the base as it is: the zero-shot reference
        return base.requires_grad_(False), {}
    dims = _dims(base, targets)
    if adapter.method in ("mos", "lora-eq"):
        common = dict(target_modules=targets, alpha=2.0 * adapter.rank, seed=seed)
        cfg = (MoSConfig.lora_equivalent(adapter.rank, **common) if adapter.method == "lora-eq" else
               MoSConfig(rank=adapter.rank, budget_rank=adapter.budget, private_rank=adapter.private,
                         shards_per_vector=adapter.shards, subset_selection=adapter.subset,
                         pair_dissociation=adapter.pair, **dict(adapter.options), **common))
        return get_mos_model(base, cfg), {}
    with peft_calls():
        return _attach_peft(base, adapter, targets, dims, seed)


def _attach_peft(base: nn.Module, adapter: Adapter, targets: list[str] | str,
                 dims: list[tuple[int, int]], seed: int) -> tuple[nn.Module, dict]:
    from peft import LoraConfig, VBLoRAConfig, VeraConfig, get_peft_model

    if adapter.method == "lora":
        # scale alpha / r = 2 for every rank, as for MoS
        return get_peft_model(base, LoraConfig(r=adapter.rank, lora_alpha=2 * adapter.rank,
                                               target_modules=targets)), {}
    if adapter.method == "vera":
        r, matched = vera_rank(dims, adapter.budget)
        return get_peft_model(base, VeraConfig(r=r, target_modules=targets, projection_prng_key=seed,
                                               save_projection=False)), {"vera_r": r, "vera_r_matched": matched}
    if adapter.method == "vblora":
        # trainable: the bank (n, v) and per layer r·(d_in + d_out)/v logits over n vectors;
        # n solves LoRA@e's parameter count
        per_vector = VBLORA_VECTOR + VBLORA_RANK * sum(i + o for i, o in dims) // VBLORA_VECTOR
        n = max(VBLORA_RANK, round(lora_count(dims, adapter.budget) / per_vector))
        return get_peft_model(base, VBLoRAConfig(
            r=VBLORA_RANK, num_vectors=n, vector_length=VBLORA_VECTOR, topk=2,
            target_modules=targets, save_only_topk_weights=True)), {"vblora_vectors": n}
    raise ValueError(f"unknown adapter method {adapter.method!r}")


def _dims(model: nn.Module, targets: list[str] | str) -> list[tuple[int, int]]:
    """(d_in, d_out) of every layer of ``model`` that ``targets`` selects."""
    named = dict(model.named_modules())
    return [linear_shape(named[n]) for n in find_targets(model, targets)]


def saved_bytes(model: nn.Module, scratch: Path) -> int:
    """Bytes of the adapter saved in each library's own format (``sizes.adapter_bytes``)."""
    model.save_pretrained(scratch)
    size = adapter_bytes(scratch)
    shutil.rmtree(scratch)
    return size


# ----------------------------------------------------------------------------------- tracks

@dataclass(frozen=True)
class TrackSpec:
    """What a track runs: tasks, budgets, seeds, and the training/eval sizes."""

    name: str
    tasks: tuple[str, ...]
    budgets: tuple[int, ...]
    seeds: int
    steps: int
    batch_size: int
    max_length: int
    eval_examples: int
    test_examples: int
    head_lr: float = 0.0  # classification head (encoder track); 0 = no head
    system: str | None = None  # LLM track: the system message (None = the chat template's)
    sweep: bool = True
    lr_factors: tuple[float, ...] = LR_FACTORS  # the sweep's grid: LR_DEFAULTS x these
    bf16: bool = False  # train and score under bf16 autocast
    epochs: float = 0.0  # > 0: each task trains this many epochs (steps then vary by task)
    sweep_on: str = "accuracy"  # or "loss": the validation metric the rate is picked on

    def quick(self) -> "TrackSpec":
        """Minutes instead of hours: one task, the smaller budget, one seed, no sweep, a few
        steps and examples (a smoke run of every setting, not a measurement); bf16 only where
        it runs natively (emulated, it would take most of the test suite's time)."""
        return replace(self, tasks=self.tasks[:1], budgets=self.budgets[:1], seeds=1,
                       steps=max(4, self.steps // 10), eval_examples=16, test_examples=32,
                       sweep=False, epochs=0.0, bf16=self.bf16 and fast_bf16())


SPECS = {
    "encoder": TrackSpec("encoder", ("sentiment", "party"), budgets=(4, 8), seeds=5, steps=80,
                         batch_size=16, max_length=64, eval_examples=200, test_examples=500,
                         head_lr=2e-3),
    # an empty system message: SmolLM2's default one is ~20 of a prompt's ~76 tokens, a
    # quarter of every step, and says nothing about the task
    "llm": TrackSpec("llm", ("sentiment",), budgets=(2, 4), seeds=3, steps=30, batch_size=8,
                     max_length=96, eval_examples=40, test_examples=120, system=""),
    # where rank matters (see memorization.py and the pilot, benchmarks/capacity_pilot.py):
    # 256 facts for 8 epochs (the pilot's regime: 6 epochs left LoRA r = 1 at exact match 0),
    # then the low-data curve at 64 and 128 facts, as many epochs. Items are scored on what
    # was trained, so validation = test = the facts; the rate is picked on validation loss
    # (exact match is 0 for every rate of the smallest settings). The sweep drops the 9x
    # point: at 1e-2 every method stayed at chance in the pilot.
    "capacity": TrackSpec("capacity", ("facts:256", "facts:64", "facts:128"), budgets=(1, 2),
                          seeds=3, steps=0, batch_size=16, max_length=32, eval_examples=256,
                          test_examples=256, lr_factors=LR_FACTORS[:3], bf16=True, epochs=8.0,
                          sweep_on="loss"),
}


class Track:
    """A loaded base model and tokenizer with the track's batching and metric."""

    spec: TrackSpec
    targets: list[str] | str
    layers: int

    def dims(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of every layer the adapters wrap."""
        return _dims(self.base, self.targets)

    def fresh_model(self, seed: int) -> tuple[nn.Module, list[nn.Parameter]]:
        """A copy of the base (and its head, initialized from ``seed``) and the head's parameters."""
        raise NotImplementedError

    def batches(self, examples: list[Example], seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless shuffled training batches, reshuffled each epoch, reproducible from ``seed``."""
        rng = random.Random(seed)
        order = list(range(len(examples)))
        while True:
            rng.shuffle(order)
            for start in range(0, len(order) - self.spec.batch_size + 1, self.spec.batch_size):
                yield self.collate([examples[i] for i in order[start:start + self.spec.batch_size]])

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def plans(self) -> dict[str, list[Adapter]]:
        """The settings each task runs: the first task every budget, the others the smallest
        budget only. The second tasks are small (party tests on 44 examples, one standard
        error ~7 points): they show whether results carry over, not how budgets rank."""
        return {task: suite(self.spec.budgets if i == 0 else self.spec.budgets[:1], self.layers,
                            self.dims())
                for i, task in enumerate(self.spec.tasks)}

    def evaluate(self, model: nn.Module, examples: list[Example], task: Task) -> dict[str, float]:
        """``accuracy`` and ``loss`` (mean cross-entropy of the answer) on ``examples`` of ``task``."""
        raise NotImplementedError


class EncoderTrack(Track):
    def __init__(self, spec: TrackSpec) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from moslora.assets import encoder_model_path

        path = encoder_model_path()
        self.spec, self.targets = spec, default_targets("bert")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        self.layers = self.base.config.num_hidden_layers

    def fresh_model(self, seed: int) -> tuple[nn.Module, list[nn.Parameter]]:
        model = copy.deepcopy(self.base)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model.classifier.reset_parameters()
        return model, list(model.classifier.parameters())

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        # the encoder sees the text alone, not the LLM's instruction before it
        texts = [e.prompt.split("\n\n", 1)[-1] for e in examples]
        batch = self.tokenizer(texts, truncation=True, max_length=self.spec.max_length,
                               padding=True, return_tensors="pt")
        return {**batch, "labels": torch.tensor([e.label for e in examples])}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list[Example], task: Task) -> dict[str, float]:
        model.eval()
        correct, loss = 0, 0.0
        for start in range(0, len(examples), 64):
            batch = self.collate(examples[start:start + 64])
            out = model(**batch)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            loss += float(out.loss) * len(batch["labels"])
        model.train()
        return {"accuracy": correct / len(examples), "loss": loss / len(examples)}


class LLMTrack(Track):
    def __init__(self, spec: TrackSpec) -> None:
        from moslora.base import load_base

        self.spec, self.targets = spec, default_targets("llama")
        self.base, self.tokenizer = load_base(None)
        self.layers = self.base.config.num_hidden_layers

    def fresh_model(self, seed: int) -> tuple[nn.Module, list[nn.Parameter]]:
        return copy.deepcopy(self.base), []

    def _with_system(self, examples: list[Example]) -> list[Example]:
        return [replace(e, system=self.spec.system) for e in examples]

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        # left padding, so that the LM head runs on the answers only (answer_window)
        features = [tokenize_example(self.tokenizer, e, self.spec.max_length)
                    for e in self._with_system(examples)]
        return answer_window(collate(features, self.tokenizer.pad_token_id, "left"))

    def evaluate(self, model: nn.Module, examples: list[Example], task: Task) -> dict[str, float]:
        return classification_metrics(model, self.tokenizer, self._with_system(examples),
                                      task.label_words, self.spec.max_length, 16)


class CapacityTrack(LLMTrack):
    """SmolLM2 storing what it does not know (``memorization``): ``accuracy`` is greedy exact
    match of the whole answer, ``loss`` the NLL per answer token, ``bits`` (where chance is
    known) the information stored."""

    def evaluate(self, model: nn.Module, examples: list[Example], task: Task) -> dict[str, float]:
        with _autocast(self.spec.bf16):
            scores = answer_scores(model, self.tokenizer, examples, self.spec.max_length, 32)
        return memorization.metrics(scores, task.chance_nll)


    def plans(self) -> dict[str, list[Adapter]]:
        """Sized to the track's 90-minute budget (runs of 128 steps of SmolLM2).

        The first task: LoRA at e, 2e, 4e, 8e of both budgets; MoS@e at r = 8e, and at the
        smallest budget also at the widest rank subset selection allows (r = L); VeRA and
        VB-LoRA at the smallest budget; our LoRA-equivalent; the ablation at the largest
        budget (at least 2: p = 1 needs e >= 2). The other tasks (the low-data curve):
        LoRA@e, LoRA@8e and MoS@e at r = 8e at the smallest budget."""
        first, *others = self.spec.tasks
        e, top = self.spec.budgets[0], max(2, self.spec.budgets[-1])  # quick mode has e = 1 only
        main = [Adapter("lora", r, rank=r) for r in sorted({k * b for b in self.spec.budgets for k in (1, 2, 4, 8)})]
        main += [Adapter("mos", b, rank=8 * b, private=min(1, b - 1)) for b in self.spec.budgets]
        main += [Adapter("mos", e, rank=mos_rank(e, self.layers, 0, 10**6), private=0),
                 Adapter("vera", e), Adapter("vblora", e), Adapter("lora-eq", e, rank=e)]
        main += [a for a in ablations(top, 8 * top) if a not in main]
        curve = [Adapter("lora", e, rank=e), Adapter("lora", 8 * e, rank=8 * e),
                 Adapter("mos", e, rank=8 * e, private=0)]
        return {first: main, **{task: curve for task in others}}


class ModelCapacityTrack(CapacityTrack):
    """The capacity track's runs on the capacity model (``capacity_base``), which the
    suite ``capacity_model`` drives with its own plan."""

    def __init__(self, spec: TrackSpec) -> None:
        size = max(int(t.partition(":")[2]) for t in spec.tasks)  # facts(n) is a prefix of facts(size)
        self.spec, self.targets, self.layers = spec, list(capacity_base.TARGETS), capacity_base.LAYERS
        self.tokenizer = capacity_base.word_tokenizer(size)
        self.base = capacity_base.capacity_model(len(self.tokenizer))


def fast_bf16() -> bool:
    """Whether bf16 runs natively here: a CUDA GPU with bf16, or a CPU that oneDNN runs bf16 on
    (AVX512-BF16 or AMX). Without them, CPU autocast emulates bf16, and a SmolLM2 step took 14x
    fp32's time (an AVX2 EPYC, 27 s against 1.9 s). ``torch.ops.mkldnn._is_mkldnn_bf16_supported``
    is private (the op inductor asks); if it goes, this answers False."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _autocast(enabled: bool):
    """bf16 autocast on the model's device: 1.7x a SmolLM2 step on a CPU with AVX512-BF16."""
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16,
                          enabled=enabled)


def load_track(spec: TrackSpec) -> Track:
    tracks = {"encoder": EncoderTrack, "llm": LLMTrack, "capacity": CapacityTrack,
              "capacity-model": ModelCapacityTrack}
    return tracks[spec.name](spec)


# -------------------------------------------------------------------------------- one run

@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one run's result; its hash is the cache key."""

    track: str
    task: str
    adapter: Adapter
    lr: float
    seed: int
    steps: int
    batch_size: int
    max_length: int
    eval_examples: int
    test_examples: int
    head_lr: float
    system: str | None = None
    bf16: bool = False

    @property
    def key(self) -> str:
        # a field added with a default is hashed only when set away from it, so the runs
        # cached before it existed keep their keys
        spec = asdict(self)
        for f in fields(self):
            if f.default is not MISSING and spec[f.name] == f.default:
                del spec[f.name]
        if not spec["adapter"]["options"]:  # likewise the adapter's options, added later
            del spec["adapter"]["options"]
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def train_and_evaluate(track: Track, task: Task, run: RunSpec, scratch: Path) -> dict[str, Any]:
    """Fine-tune one adapter, then score validation and test: the record stored for ``run``."""
    began = time.perf_counter()
    torch.manual_seed(run.seed)
    base, head = track.fresh_model(run.seed)
    model, solved = attach(base, run.adapter, track.targets, run.seed)
    for p in head:
        p.requires_grad_(True)
    head_ids = {id(p) for p in head}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": params, "lr": run.lr}] + ([{"params": head, "lr": run.head_lr}] if head else [])
    if run.steps:  # zero steps: the zero-shot reference, nothing to train
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        schedule = get_linear_schedule_with_warmup(optimizer, max(1, run.steps // 10), run.steps)
    batches = track.batches(task.train, run.seed)
    start, losses = time.perf_counter(), []
    model.train()
    for _ in range(run.steps):
        with _autocast(run.bf16):
            loss = model(**next(batches)).loss
        if not torch.isfinite(loss):
            break  # a diverged run is recorded as such; the sweep skips it
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + head, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
    seconds = time.perf_counter() - start
    diverged = len(losses) < run.steps
    def scores(examples: list[Example]) -> dict[str, float]:
        if diverged:
            return dict.fromkeys(("accuracy", "loss", "bits") if task.chance_nll else ("accuracy", "loss"),
                                 math.nan)
        return track.evaluate(model, examples, task)

    # validation is read by the learning-rate sweep only, which runs seed 0
    val = scores(task.validation[:run.eval_examples]) if not run.seed else {"accuracy": math.nan,
                                                                            "loss": math.nan}
    test = scores(task.test[:run.test_examples])
    control = {f"control_{k}": v for k, v in scores(task.control).items()} if task.control else {}
    size = saved_bytes(model, scratch / run.key) if params else 0
    return {"key": run.key, "run": asdict(run), "label": run.adapter.label, "solved": solved,
            "adapter_params": sum(p.numel() for p in params),
            "head_params": sum(p.numel() for p in head), "adapter_bytes": size,
            "val_accuracy": val["accuracy"], "val_loss": val["loss"], **{f"test_{k}": v for k, v in test.items()}, **control,
            "diverged": diverged, "train_seconds": seconds,
            "seconds": time.perf_counter() - began,
            "first_loss": losses[0] if losses else math.nan,
            "last_loss": statistics.fmean(losses[-10:]) if losses else math.nan}


# ----------------------------------------------------------------------------------- suite

# per process (the suite's and each worker's): a track's model and a task's splits, loaded once
_TRACKS: dict[TrackSpec, Track] = {}
_TASKS: dict[str, Task] = {}


def loaded_track(spec: TrackSpec) -> Track:
    if spec not in _TRACKS:
        _TRACKS[spec] = load_track(spec)
    return _TRACKS[spec]


def loaded_task(name: str, spec: TrackSpec) -> Task:
    """The task's fixed splits (seed 0); a task that picks its items with the base model
    (wikidata) asks the track's."""
    if name not in _TASKS:
        track = loaded_track(spec) if needs_base(name) else None
        scorer = track and partial(answer_scores, track.base, track.tokenizer, batch_size=32)
        _TASKS[name] = load_task(name, seed=0, scorer=scorer)
    return _TASKS[name]


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        # die with the suite's process (PR_SET_PDEATHSIG) rather than finish a run that
        # nobody will record, on cores the resumed suite needs
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))


def _run(spec: TrackSpec, run: RunSpec, scratch: Path) -> dict[str, Any]:
    return train_and_evaluate(loaded_track(spec), loaded_task(run.task, spec), run, scratch)


def default_workers() -> int:
    """Two runs side by side on one thread each, on a machine of two or more cores.

    These models are small for a CPU's threads: on 2 cores, two runs side by side finished
    1.17x (MiniLM) and 1.12x (SmolLM2) sooner than one after another on two threads each."""
    return min(2, len(os.sched_getaffinity(0)))


@dataclass
class Runner:
    """Runs RunSpecs through the cache with one progress bar, ``workers`` at a time.

    With ``workers > 1`` each run trains in a worker process (started on first use) on
    ``cores // workers`` threads; a run's result depends only on its RunSpec (it seeds
    itself), not on where it ran.
    """

    store: RunStore
    scratch: Path
    progress: Progress
    workers: int = 1
    task_id: Any = None
    used: dict[str, dict[str, Any]] = field(default_factory=dict)  # every record asked for, by key
    _workers: ProcessPoolExecutor | None = None

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._workers is not None:
            self._workers.shutdown(cancel_futures=True)

    def _pool(self) -> ProcessPoolExecutor | None:
        if self.workers > 1 and self._workers is None:
            threads = max(1, len(os.sched_getaffinity(0)) // self.workers)
            self._workers = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                                initializer=_init_worker, initargs=(threads,))
        return self._workers

    def run_all(self, spec: TrackSpec, runs: list[RunSpec]) -> list[dict[str, Any]]:
        """The record of every run, in order: cached ones as stored, the others trained."""
        todo = list({r.key: r for r in runs if self.store.get(r.key) is None}.values())
        self.progress.advance(self.task_id, len(runs) - len(todo))
        pool = self._pool()
        if pool is None:
            for run in todo:
                self._describe(spec, run)
                self._finish(_run(spec, run, self.scratch))
        else:
            futures = [pool.submit(_run, spec, run, self.scratch) for run in todo]
            for future in as_completed(futures):
                self._finish(future.result())
        records = [self.store.get(r.key) for r in runs]
        self.used.update((r["key"], r) for r in records)
        return records

    def _describe(self, spec: TrackSpec, run: RunSpec) -> None:
        self.progress.update(self.task_id, description=f"{spec.name}/{run.task} {run.adapter.label} "
                                                       f"lr={run.lr:.0e} seed={run.seed}")

    def _finish(self, record: dict[str, Any]) -> None:
        self.store.add(record)
        self.progress.advance(self.task_id)


def _run_spec(spec: TrackSpec, task: str, adapter: Adapter, lr: float, seed: int) -> RunSpec:
    return RunSpec(spec.name, task, adapter, lr, seed, task_steps(spec, task), spec.batch_size,
                   spec.max_length, spec.eval_examples, spec.test_examples, spec.head_lr, spec.system,
                   spec.bf16)


def task_steps(spec: TrackSpec, task: str) -> int:
    """The track's steps, or with ``spec.epochs`` the steps that pass over ``task`` that often."""
    if not spec.epochs:
        return spec.steps
    return max(1, round(spec.epochs * len(loaded_task(task, spec).train) / spec.batch_size))


def _sweep_adapter(adapters: list[Adapter], family: str) -> Adapter:
    """The family member the learning rate is tuned on: its smallest-budget, smallest setting."""
    members = [a for a in adapters if a.family == family and a.method != "lora-eq"]
    return min(members, key=lambda a: (a.budget, a.rank))


def pick_rate(scores: dict[float, float], examples: int) -> float:
    """The smallest rate whose validation accuracy is within one standard error of the best.

    ``scores`` maps rate -> accuracy on ``examples`` validation examples (NaN = diverged).
    The rate is tuned on one setting and reused for the family's larger ranks and budgets;
    a rate at the edge of stability there is not worth a win within noise (MoS's 3e-3 tied 1e-3
    on r = 16, then left 5 of 9 seeds at r = 32 and 43 stuck at chance, train loss ln 2).
    """
    finite = {lr: s for lr, s in scores.items() if not math.isnan(s)}
    if not finite:
        return min(scores)
    best = max(finite.values())
    standard_error = math.sqrt(best * (1 - best) / examples)
    return min(lr for lr, s in finite.items() if s >= best - standard_error)


def learning_rates(spec: TrackSpec, task: str, adapters: list[Adapter], runner: Runner,
                   families: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Per family: the swept rates with their seed-0 validation metric (``spec.sweep_on``),
    and the chosen one (``pick_rate`` on accuracy; the lowest loss on loss)."""
    probes = {}
    for family in families or sorted({a.family for a in adapters}):
        grid = [LR_DEFAULTS[family] * f for f in spec.lr_factors] if spec.sweep else [LR_DEFAULTS[family]]
        probes[family] = (_sweep_adapter(adapters, family), grid)
    runs = [_run_spec(spec, task, probe, lr, 0) for probe, grid in probes.values() for lr in grid]
    metric = {r["key"]: r[f"val_{spec.sweep_on}"] for r in runner.run_all(spec, runs)}
    chosen = {}
    for family, (probe, grid) in probes.items():
        scores = {lr: metric[_run_spec(spec, task, probe, lr, 0).key] for lr in grid}
        chosen[family] = {"adapter": probe.label, "task": task, "metric": spec.sweep_on, "grid": scores,
                          "lr": pick_rate(scores, spec.eval_examples) if spec.sweep_on == "accuracy"
                          else lowest_loss(scores)}
    return chosen


def lowest_loss(scores: dict[float, float]) -> float:
    """The rate with the lowest validation loss (NaN = diverged, never chosen).

    For memorization, where exact match sits at 0 for every rate early in training while the
    loss already tells them apart; a loss has no binomial standard error to tie within."""
    finite = {lr: s for lr, s in scores.items() if not math.isnan(s)}
    return min(finite, key=finite.get) if finite else min(scores)


def seed_rows(spec: TrackSpec, task: str, adapters: list[Adapter], rates: dict[str, dict],
              seeds: int, runner: Runner) -> list[dict[str, Any]]:
    """One summary row per adapter: its runs at the family's rate over ``seeds`` seeds."""
    runs = [[_run_spec(spec, task, a, rates[a.family]["lr"], s) for s in range(seeds)] for a in adapters]
    records = {r["key"]: r for r in runner.run_all(spec, [run for row in runs for run in row])}
    return [summarize([records[run.key] for run in row]) for row in runs]


def _plan_size(spec: TrackSpec, plans: dict[str, list[Adapter]]) -> int:
    families = {a.family for a in plans[spec.tasks[0]]}
    sweep = len(families) * (len(spec.lr_factors) if spec.sweep else 1)
    zero_shot = 0 if spec.head_lr else len(plans)
    return sweep + sum(len(adapters) for adapters in plans.values()) * spec.seeds + zero_shot


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """mean ± std over seeds of the test metrics, with sizes (the same for every seed)."""
    def stats(key: str) -> dict[str, float]:
        values = [r[key] for r in records]
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    first = records[0]
    # bits: the capacity track's information stored; the per-seed values feed paired bootstraps
    metrics = [m for m in ("accuracy", "loss", "bits") if f"test_{m}" in first]
    return {"label": first["label"], "adapter": first["run"]["adapter"], "lr": first["run"]["lr"],
            "seeds": [r["run"]["seed"] for r in records], "solved": first["solved"],
            "adapter_params": first["adapter_params"], "head_params": first["head_params"],
            "adapter_bytes": first["adapter_bytes"], **{m: stats(f"test_{m}") for m in metrics},
            "per_seed": {m: [r[f"test_{m}"] for r in records] for m in metrics},
            "train_seconds": stats("train_seconds"), "diverged": sum(r["diverged"] for r in records)}


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(elapsed_when_finished=True))


def _specs(names: list[str], quick: bool) -> list[TrackSpec]:
    return [SPECS[n].quick() if quick else SPECS[n] for n in names]


def _suite_dir(results_dir: Path, quick: bool) -> Path:
    # quick runs never mix with (or replace) the full suite's numbers
    return results_dir / "quick" if quick else results_dir


def run_quality(quick: bool = False, results_dir: Path = Path("results"),
                tracks: list[str] | tuple[str, ...] = TRACKS,
                workers: int | None = None) -> dict[str, Any]:
    """The quality suite; writes ``quality.json`` (+ ``runs.jsonl``, plots) under ``results_dir``.

    Tracks not run this time keep their section of an existing ``quality.json``."""
    out = _suite_dir(Path(results_dir), quick)
    specs = _specs(list(tracks), quick)
    for spec in specs:
        if spec.bf16 and not fast_bf16():
            print(f"note: the {spec.name} track trains under bf16 autocast, which this machine "
                  "emulates (no AVX512-BF16, AMX or bf16 GPU): expect its runs to take ~14x longer",
                  file=sys.stderr)
    previous = read_json(out / "quality.json") or {}
    result: dict[str, Any] = {"suite": "quality", "quick": quick, "environment": environment(),
                              "tracks": {k: v for k, v in previous.get("tracks", {}).items()
                                         if k not in tracks}}
    with _progress() as progress, _runner(out, progress, workers) as runner:
        plans = []
        for spec in specs:
            plans.append((spec, loaded_track(spec).plans()))
        runner.task_id = progress.add_task("quality", total=sum(_plan_size(s, p) for s, p in plans))
        for spec, tasks in plans:
            track_result = {"spec": asdict(spec), "tasks": {}}
            # swept on the first task only, for the same reason the others run one budget
            rates = learning_rates(spec, spec.tasks[0], tasks[spec.tasks[0]], runner)
            for task, adapters in tasks.items():
                rows = seed_rows(spec, task, adapters, rates, spec.seeds, runner)
                if not spec.head_lr:  # a new head starts at chance: no zero-shot reference then
                    zero_shot = replace(_run_spec(spec, task, Adapter("none", 0), 0.0, 0), steps=0)
                    rows.append(summarize(runner.run_all(spec, [zero_shot])))
                tested = len(loaded_task(task, spec).test[:spec.test_examples])  # party has fewer
                track_result["tasks"][task] = {"learning_rates": rates, "test_examples": tested,
                                               "results": rows}
            # what the track costs from scratch: its distinct runs and their recorded wall times
            seconds = [r.get("seconds", r["train_seconds"]) for r in runner.used.values()
                       if r["run"]["track"] == spec.name]
            track_result.update(runs=len(seconds), run_seconds=sum(seconds),
                                median_run_seconds=statistics.median(seconds))
            result["tracks"][spec.name] = track_result
    write_json(out / "quality.json", result)
    from .plots import plot_quality

    plot_quality(result, out / "quality.png")
    return result


def _runner(out: Path, progress: Progress, workers: int | None) -> Runner:
    return Runner(RunStore(out / "runs.jsonl"), out / ".scratch", progress,
                  default_workers() if workers is None else workers)


ABLATION_TRACK, ABLATION_TASK, ABLATION_BUDGET = "encoder", "sentiment", 4


def run_ablation(quick: bool = False, results_dir: Path = Path("results"),
                 workers: int | None = None) -> dict[str, Any]:
    """MoS full vs each strategy removed vs pure sharing, with LoRA@e and LoRA@8e for scale."""
    out = _suite_dir(Path(results_dir), quick)
    spec = _specs([ABLATION_TRACK], quick)[0]
    seeds = 1 if quick else 3
    with _progress() as progress, _runner(out, progress, workers) as runner:
        track = loaded_track(spec)
        layers = track.layers
        rank = mos_rank(ABLATION_BUDGET, layers, 1, 4 * ABLATION_BUDGET)
        variants = ablations(ABLATION_BUDGET, rank)
        references = [Adapter("lora", ABLATION_BUDGET, rank=ABLATION_BUDGET),
                      Adapter("lora", 8 * ABLATION_BUDGET, rank=8 * ABLATION_BUDGET)]
        sweep = 2 * (len(LR_FACTORS) if spec.sweep else 1)
        runner.task_id = progress.add_task("ablation", total=sweep + (len(variants) + 2) * seeds)
        # the quality suite's learning rates: same probes, same sweep, so the same cache entries
        rates = learning_rates(spec, ABLATION_TASK, suite(spec.budgets, layers, track.dims()),
                               runner, families=("lora", "mos"))
        rows = seed_rows(spec, ABLATION_TASK, variants + references, rates, seeds, runner)
    result = {"suite": "ablation", "quick": quick, "environment": environment(),
              "track": ABLATION_TRACK, "task": ABLATION_TASK, "budget": ABLATION_BUDGET, "rank": rank,
              "spec": asdict(spec), "learning_rates": rates, "results": rows}
    write_json(out / "ablation.json", result)
    from .plots import plot_ablation

    plot_ablation(result, out / "ablation.png")
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a minutes-long smoke run (one seed, few steps)")
    ap.add_argument("--results", type=Path, default=Path("results"),
                    help="where the JSON and PNG go (finished runs are reused)")
    ap.add_argument("--tracks", default=",".join(TRACKS), help="comma-separated: " + ", ".join(TRACKS))
    ap.add_argument("--no-ablation", action="store_true", help="skip the ablation")
    ap.add_argument("--workers", type=_positive, default=None,
                    help="runs trained side by side, each on cores/workers threads [default: 2 on 2+ cores]")
    args = ap.parse_args(argv)
    tracks = [t.strip() for t in args.tracks.split(",") if t.strip()]
    if not tracks or (unknown := set(tracks) - set(TRACKS)):
        ap.error(f"unknown tracks {args.tracks!r}; choose from {', '.join(TRACKS)}")
    run_quality(quick=args.quick, results_dir=args.results, tracks=tracks, workers=args.workers)
    if not args.no_ablation:
        run_ablation(quick=args.quick, results_dir=args.results, workers=args.workers)


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")
    return int(value)


if __name__ == "__main__":
    main()
