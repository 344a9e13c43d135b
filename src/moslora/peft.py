"""MoS as a registered PEFT method: ``get_peft_model(base, MoSPeftConfig(...))``.

After ``import moslora.peft`` (extra ``moslora[peft]``), PEFT's own machinery runs MoS::

    from peft import PeftModel, get_peft_model
    from moslora.peft import MoSPeftConfig

    model = get_peft_model(base, MoSPeftConfig(target_modules="all-linear", rank=16, budget_rank=2))
    model.print_trainable_parameters()            # pools counted once
    model.save_pretrained(d)                      # pools, private segments, indices: once per kind
    model = PeftModel.from_pretrained(base2, d)   # needs `import moslora.peft` first

Named adapters (``add_adapter``, ``load_adapter``, ``set_adapter``, ``delete_adapter``),
``disable_adapter()``, ``merge_adapter``/``unmerge_adapter`` and ``merge_and_unload`` are
PEFT's; so is training with ``transformers.Trainer`` or TRL (``SFTTrainer(peft_config=...)``).

There is one copy of the math: the pools of each layer kind are ``moslora.pools.ShardPools``
built by ``moslora.targeting.build_pools`` (budget solver, seeded routing and init), targets are
resolved by ``moslora.targeting.find_targets``/``group_kinds``, and the forward and merge use
``moslora.layer``'s ``low_rank_update``, ``dense_update`` and ``add_to_weight``. With the same
config and seed, an adapter made here equals ``get_mos_model``'s exactly.

Layout: the tuner (``PeftModel.base_model``) owns ``mos_pools[adapter][kind]``, registered once,
so saves hold ``base_model.mos_pools.<kind>.{pool_A, pool_B, private_A, private_B, index_A,
index_B}`` and nothing per layer. Each wrapped layer keeps an unregistered reference to its
kind's pools and its index within the kind.

What rests on PEFT internals (tested on the versions in ``SUPPORTED_PEFT``; other versions are
refused at import with a message saying so):

1. ``PeftType`` is a closed enum and ``register_peft_method`` accepts only its members;
   ``add_peft_type`` enters a ``MOS`` member into the enum's lookup tables (``_member_map_``,
   ``_value2member_map_``, ``_member_names_``).
2. Underscore hooks of ``BaseTuner``: ``inject_adapter`` is extended to build the pools before
   PEFT matches modules (every new adapter passes through it, also ``add_adapter`` and
   ``load_adapter``), ``_create_and_replace`` wraps one layer, ``_pre_injection_hook`` creates
   the pool container, and the classmethod ``_remove_adapter_name_from_key`` that
   ``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` use to name saved keys.
3. ``BaseTunerLayer``'s convention that the attributes listed in ``adapter_layer_names`` and
   ``other_param_names`` map adapter names to state: PEFT toggles ``requires_grad`` and deletes
   adapters through them. Our layers list a plain dict of pools there, so PEFT does both
   without the pools being registered (and saved) once per layer.
4. PEFT selects what to save structurally: parameters of tuner layers except ``base_layer``,
   and children of the ``BaseTuner`` except ``model`` (which is how VB-LoRA saves its shared
   vector bank once).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import peft
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import PeftType, register_peft_method
from torch import Tensor, nn

from .config import MoSConfig
from .layer import (
    add_to_weight,
    check_pools_fit,
    dense_update,
    keep_4bit_layout_stable,
    linear_shape,
    low_rank_update,
)
from .targeting import UnwrappedView, build_pools, find_targets, group_kinds
from .pools import ShardPools

# The PEFT versions this module's use of PEFT internals is tested with (0.21.0 and 0.21.2);
# keep equal to the `peft` extra in pyproject.toml (tests/test_peft_plugin.py checks that they
# agree). 0.21 is the first release whose save and load ask the tuner class how to name its
# keys; up to 0.20 they branch on each built-in PeftType and would save our pools per layer.
SUPPORTED_PEFT = SpecifierSet(">=0.21.0,<0.22")
METHOD_NAME = "mos"
PREFIX = "mos_"


def check_peft_version() -> None:
    """Raise ``ImportError`` unless the installed peft is in ``SUPPORTED_PEFT`` (dev builds count)."""
    version = peft.__version__
    if not SUPPORTED_PEFT.contains(Version(version), prereleases=True):
        raise ImportError(
            f"moslora.peft supports peft{SUPPORTED_PEFT}, but peft {version} is installed: it "
            f"extends PEFT internals that change between releases. Install a supported version "
            f"(pip install 'peft{SUPPORTED_PEFT}'), or use moslora's own API (get_mos_model)."
        )


def add_peft_type(name: str) -> PeftType:
    """The compatibility shim: add member ``name`` to PEFT's closed ``PeftType`` enum.

    ``register_peft_method`` accepts only names that are ``PeftType`` members, and an enum with
    members can be neither subclassed nor extended through ``enum``'s API. So the member is
    built as ``enum`` builds those of a ``str`` enum and entered in the three tables that
    ``PeftType.NAME``, ``PeftType("NAME")`` and ``list(PeftType)`` read. Idempotent.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses to add members
    return member


check_peft_version()
PEFT_TYPE = add_peft_type(METHOD_NAME.upper())


@dataclass
class MoSPeftConfig(PeftConfig, MoSConfig):
    """An ``MoSConfig`` that PEFT accepts: every ``MoSConfig`` field plus ``PeftConfig``'s
    (``task_type``, ``inference_mode``, ``base_model_name_or_path``, ``revision``).

    ``target_modules`` is resolved against the model when the adapter is created and replaced
    by the list of adapted module names (as PEFT does with ``"all-linear"``), so a saved config
    names exactly the layers its pools were sized for.
    """

    def __post_init__(self) -> None:
        PeftConfig.__post_init__(self)
        MoSConfig.__post_init__(self)
        self.peft_type = PEFT_TYPE


class MoSPeftLayer(nn.Module, BaseTunerLayer):
    """A frozen linear layer plus one MoS update per adapter: ``y = W x + Σ_active (α/r) B A x``.

    Per adapter it holds a reference to its kind's ``ShardPools`` (owned and registered by the
    tuner), its index within the kind, the scaling and the dropout.

    Args:
        base_layer: ``nn.Linear``, transformers ``Conv1D`` or bitsandbytes ``Linear4bit``.
        adapter_name: the first adapter's name.
        pools: that adapter's pools for this layer's kind.
        layer_idx: this layer's position within its kind.
        config: that adapter's config (scaling and dropout).
    """

    # dicts keyed by adapter name: PEFT toggles requires_grad on and deletes through these
    adapter_layer_names = ("mos_pools",)
    other_param_names = ("mos_layer_idx", "mos_scaling", "mos_dropout")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, pools: ShardPools, layer_idx: int,
        config: MoSPeftConfig,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        keep_4bit_layout_stable(base_layer)
        # a plain dict, not a ModuleDict: the tuner registers (and saves) each kind's pools once
        self.mos_pools: dict[str, ShardPools] = {}
        self.mos_layer_idx: dict[str, int] = {}
        self.mos_scaling: dict[str, float] = {}
        self.mos_dropout = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, pools, layer_idx, config)

    def update_layer(
        self, adapter_name: str, pools: ShardPools, layer_idx: int, config: MoSPeftConfig
    ) -> None:
        """Attach adapter ``adapter_name`` (its pools for this kind and this layer's index)."""
        check_pools_fit(pools, self.in_features, self.out_features)
        self.mos_pools[adapter_name] = pools
        self.mos_layer_idx[adapter_name] = layer_idx
        self.mos_scaling[adapter_name] = config.scaling
        self.mos_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.set_adapter(self.active_adapters)

    def _get_available_adapters(self) -> set[str]:
        return set(self.mos_pools)

    def factors(self, adapter_name: str) -> tuple[Tensor, Tensor]:
        """``A: (r, d_in)`` and ``B: (d_out, r)`` of this layer for ``adapter_name``."""
        return self.mos_pools[adapter_name].factors(self.mos_layer_idx[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> Tensor:
        """The dense update ``(α/r) · B A``: ``(d_out, d_in)``."""
        return dense_update(*self.factors(adapter_name), self.mos_scaling[adapter_name])

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``x: (..., d_in) -> (..., d_out)``."""
        if self.disable_adapters:
            if self.merged:  # PEFT's convention: disabling serves the base, so undo a merge
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return y
        for name in self.active_adapters:
            if name in self.mos_pools:
                a, b = self.factors(name)
                update = low_rank_update(x, a, b, self.mos_scaling[name], self.mos_dropout[name])
                y = y + update.to(y.dtype)
        return y

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or the named) adapters into the base weight: ``W += (α/r) B A``.

        ``safe_merge`` refuses an update holding NaN or Inf before touching the weight. A 4-bit
        base is requantized (lossy), as PEFT does for LoRA.
        """
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.mos_pools:
                continue
            delta = self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(delta).all():
                raise ValueError(f"adapter {name!r} has NaN or Inf in its update; nothing merged for it")
            add_to_weight(self.get_base_layer(), delta)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged updates again, last merged first (exact up to float rounding)."""
        if not self.merged:
            warnings.warn("MoSPeftLayer.unmerge(): not merged; nothing done", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            add_to_weight(self.get_base_layer(), -self.get_delta_weight(name))

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.mos_pools)}, layer_idx={self.mos_layer_idx}"


class MoSPeftModel(BaseTuner):
    """PEFT's tuner for MoS: ``PeftModel.base_model`` when the config is a ``MoSPeftConfig``.

    Owns ``mos_pools``: ``ModuleDict[adapter -> ModuleDict[kind key -> ShardPools]]``.
    """

    prefix = PREFIX
    tuner_layer_cls = MoSPeftLayer
    target_module_mapping: dict[str, list[str]] = {}  # MoSConfig always names its targets
    uses_shared_state = True  # the pools live here, not on the layers

    def _pre_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        self.mos_pools = nn.ModuleDict()
        self._mos_slots: dict[str, dict[str, tuple[str, int]]] = {}  # adapter -> layer -> (kind, idx)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Build ``adapter_name``'s pools (all kinds at once, as the budget needs every layer of a
        kind), then let PEFT wrap the layers they were built for."""
        self._add_pools(model, adapter_name, self.peft_config[adapter_name])
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception:
            del self.mos_pools[adapter_name], self._mos_slots[adapter_name]
            raise

    def _add_pools(self, model: nn.Module, adapter_name: str, config: MoSPeftConfig) -> None:
        # layers wrapped for earlier adapters are seen as the linear layers they wrap
        view = UnwrappedView(model, MoSPeftLayer)
        kinds = group_kinds(view, find_targets(view, config.target_modules))
        modules = dict(view.named_modules())
        pools = nn.ModuleDict()
        for kind in kinds:
            device = modules[kind.layers[0]].weight.device
            pools[kind.key] = build_pools(config, kind).to(device)
        self.mos_pools[adapter_name] = pools
        self._mos_slots[adapter_name] = {
            name: (kind.key, idx) for kind in kinds for idx, name in enumerate(kind.layers)
        }
        # PEFT matches exactly the layers the pools were sized for, and saves their names
        config.target_modules = [name for kind in kinds for name in kind.layers]

    def _create_and_replace(
        self, peft_config: MoSPeftConfig, adapter_name: str, target: nn.Module, target_name: str,
        parent: nn.Module, current_key: str, **kwargs: Any,
    ) -> None:
        slot = self._mos_slots[adapter_name].get(current_key)
        if slot is None:
            raise ValueError(
                f"PEFT asked MoS to adapt {current_key!r}, which adapter {adapter_name!r} has no pools "
                f"for; its layers are {sorted(self._mos_slots[adapter_name])[:4]}..."
            )
        kind_key, idx = slot
        pools = self.mos_pools[adapter_name][kind_key]
        if isinstance(target, MoSPeftLayer):
            target.update_layer(adapter_name, pools, idx, peft_config)
        else:
            layer = MoSPeftLayer(target, adapter_name, pools, idx, peft_config)
            self._replace_module(parent, target_name, layer, target)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete ``adapter_name`` from every layer, and its pools."""
        super().delete_adapter(adapter_name)
        del self.mos_pools[adapter_name], self._mos_slots[adapter_name]

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # pools are keyed adapter -> kind, so the name sits inside the key rather than at its end:
        # base_model.mos_pools.<adapter>.<kind>.pool_A -> base_model.mos_pools.<kind>.pool_A
        head, found, tail = key.partition(f".mos_pools.{adapter_name}.")
        if found:
            return f"{head}.mos_pools.{tail}"
        return super()._remove_adapter_name_from_key(key, adapter_name)


register_peft_method(name=METHOD_NAME, config_cls=MoSPeftConfig, model_cls=MoSPeftModel, prefix=PREFIX)
