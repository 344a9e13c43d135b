"""Model injection: wrap the targeted layers of a base in ``MoSLinear``, one pool per kind.

``get_mos_model(base, cfg)`` returns a ``MoSModel``: the frozen base with each targeted linear
layer replaced by a ``MoSLinear``, and one ``ShardPools`` per layer kind registered in
``mos_pools``. Everything else (forward, generate, config, ...) passes through to the base.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from torch import nn

from .checkpoint import read_adapter, save_adapter
from .config import MoSConfig, PoolPlan
from .layer import MoSLinear, keep_4bit_layout_stable
from .noise import peft_calls
from .pools import ShardPools
from .sizes import stored_parameters, trainable_parameters
from .targeting import build_pools, find_targets, fingerprint, group_kinds, swap_module


# ---------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ParameterReport:
    """Trainable parameters per kind, next to LoRA at the budget rank and at MoS's rank."""

    kinds: dict[str, PoolPlan]

    @property
    def total(self) -> int:
        return sum(p.total_params for p in self.kinds.values())

    @property
    def lora_budget_total(self) -> int:
        """LoRA at rank ``e`` on the same layers: MoS's ceiling."""
        return sum(p.lora_params(p.budget_rank) for p in self.kinds.values())

    @property
    def lora_same_rank_total(self) -> int:
        """LoRA at MoS's per-layer rank ``r`` on the same layers."""
        return sum(p.lora_params(p.rank) for p in self.kinds.values())

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "kind": key.split("@")[0].replace("/", "."),
                "L": p.num_layers,
                "d_in": p.d_in,
                "d_out": p.d_out,
                "pool_shards": p.shards,
                "private": p.private_params,
                "public": p.public_params,
                "total": p.total_params,
                "lora_e": p.lora_params(p.budget_rank),
                "note": p.note,
            }
            for key, p in self.kinds.items()
        ]

    def __str__(self) -> str:
        rows = self.rows()
        cols = ["kind", "L", "d_in", "d_out", "pool_shards", "private", "public", "total", "lora_e"]
        table = [cols] + [[str(r[c]) for c in cols] for r in rows]
        table.append(["TOTAL", "", "", "", "", "", "", str(self.total), str(self.lora_budget_total)])
        widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
        notes = sorted({r["note"] for r in rows if r["note"]})
        return "\n".join(lines + [f"note: {n}" for n in notes])


# ---------------------------------------------------------------------------- model


class MoSModel(nn.Module):
    """A frozen base model with MoS adapters on its target layers.

    Args:
        base_model: any ``nn.Module`` (typically a transformers ``PreTrainedModel``).
        config: the ``MoSConfig``; its targets must match linear layers of ``base_model``.
    """

    def __init__(self, base_model: nn.Module, config: MoSConfig) -> None:
        super().__init__()
        self.base_model = base_model
        self.mos_config = config
        self.kinds = group_kinds(base_model, find_targets(base_model, config.target_modules))
        self.base_fingerprint = fingerprint(base_model, self.kinds)
        for param in base_model.parameters():
            param.requires_grad_(False)
        for module in base_model.modules():  # adapted or not: one numeric path for eval and train
            keep_4bit_layout_stable(module)
        self.mos_pools = nn.ModuleDict()
        self.mos_layers: dict[str, MoSLinear] = {}
        for kind in self.kinds:
            pools = build_pools(config, kind)
            self.mos_pools[kind.key] = pools
            for idx, name in enumerate(kind.layers):
                self._wrap(name, pools, idx)
        self._unloaded = False

    def _wrap(self, name: str, pools: ShardPools, idx: int) -> None:
        base_layer = self.base_model.get_submodule(name)
        layer = MoSLinear(base_layer, pools, idx, self.mos_config.scaling, self.mos_config.dropout)
        swap_module(self.base_model, name, layer)
        self.mos_layers[name] = layer

    # transformers' Trainer refuses to train a quantized model unless this says that
    # trainable adapters are attached, which is what an MoSModel is
    _hf_peft_config_loaded = True

    # ---- passthrough
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._check_loaded()
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self._check_loaded()
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def _check_loaded(self) -> None:
        if self._unloaded:
            raise RuntimeError(
                "this MoSModel was unloaded by merge_and_unload(); use the base model it returned"
            )

    # ---- parameters
    def trainable_parameters(self) -> int:
        """Number of trainable parameters (MoS pools and segments, plus anything unfrozen)."""
        return trainable_parameters(self)

    def print_trainable_parameters(self) -> None:
        total = stored_parameters(self)
        trainable = self.trainable_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def parameter_report(self) -> ParameterReport:
        """Per kind: L, d_in, d_out, pool shards, private/public/total params, LoRA@e params."""
        return ParameterReport({key: pools.plan for key, pools in self.mos_pools.items()})

    # ---- merge
    def merge(self, requantize: bool = False) -> None:
        """Fold every update into its base weight (``W += (alpha/r) B A``); see
        ``MoSLinear.merge`` for 4-bit bases and ``requantize``."""
        for layer in self.mos_layers.values():
            layer.merge(requantize=requantize)

    def unmerge(self) -> None:
        """Undo ``merge()``."""
        for layer in self.mos_layers.values():
            layer.unmerge()

    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in self.mos_layers.values())

    def merge_and_unload(self, requantize: bool = False) -> nn.Module:
        """Merge, put the (merged) base layers back, and return the plain base model."""
        self._check_loaded()
        if not self.merged:
            self.merge(requantize=requantize)
        for name, layer in self.mos_layers.items():
            swap_module(self.base_model, name, layer.base_layer)
        self._unloaded = True
        return self.base_model

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the ``with`` block."""
        if self.merged:
            raise RuntimeError("disable_adapter() needs unmerged adapters: call unmerge() first")
        for layer in self.mos_layers.values():
            layer.disabled = True
        try:
            yield
        finally:
            for layer in self.mos_layers.values():
                layer.disabled = False

    # ---- training helpers
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Enable the base's gradient checkpointing (non-reentrant by default, which needs no
        input gradients; with ``use_reentrant=True`` the input embeddings are made to require
        grad so the frozen base still passes gradients to the adapters)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs["use_reentrant"]:
            self.base_model.enable_input_require_grads()

    # ---- checkpoints
    def save_pretrained(self, path: str | Path) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to ``path``, atomically."""
        save_adapter(self, path)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path: str | Path) -> "MoSModel":
        """Attach a saved adapter to ``base_model``; validates the files against the base.

        The base is modified only once every check of ``read_adapter`` has passed."""
        config, _, state = read_adapter(base_model, path)
        model = cls(base_model, config)
        model.mos_pools.load_state_dict(state, strict=True)
        return model


def get_mos_model(base_model: nn.Module, config: MoSConfig) -> MoSModel:
    """Freeze ``base_model`` and add MoS adapters to the layers ``config`` targets.

    The base is wrapped in place: its target layers become ``MoSLinear``. Warns when
    ``budget_rank`` exceeds ``rank``, which is almost always a mistake.
    """
    if config.budget_rank > config.rank:
        warnings.warn(
            f"budget_rank={config.budget_rank} > rank={config.rank}: the adapter trains as many "
            f"parameters as LoRA at rank {config.budget_rank}, more than LoRA at its own per-layer "
            f"rank {config.rank}; MoS is meant for budget_rank well below rank (e.g. rank 16, "
            "budget_rank 2)", UserWarning, stacklevel=2)
    return MoSModel(base_model, config)


def wrap(base: nn.Module, method: Literal["mos", "lora"], cfg: MoSConfig) -> nn.Module:
    """Attach a fresh adapter: MoS, or PEFT LoRA at MoS's per-layer rank with its settings."""
    if method == "mos":
        return get_mos_model(base, cfg)
    from peft import LoraConfig, get_peft_model

    with peft_calls():
        return get_peft_model(base, LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules, task_type="CAUSAL_LM"))
