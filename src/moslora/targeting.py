"""Targeting: which layers of a base an adapter wraps, their kinds, and the base's fingerprint.

Below both ``model.py`` (injection) and ``checkpoint.py`` (save/load), which both ask the same
questions of a base: which modules do ``target_modules`` select, how do they group into kinds
(one set of pools per kind), and does a saved adapter fit this base. Also the one place that
swaps a module in a model's tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

from torch import nn

from .config import MoSConfig, solve_pools
from .layer import MoSLinear, is_supported, linear_shape
from .pools import ShardPools, kind_generator

def swap_module(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at the dotted path ``name`` of ``root``; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


# ---------------------------------------------------------------------------- targeting


def kind_pattern(name: str) -> str:
    """A module path with its layer indices replaced by ``*``: ``layers.3.q`` -> ``layers.*.q``."""
    return re.sub(r"(?:(?<=\.)|^)\d+(?=\.|$)", "*", name)


def kind_key(pattern: str, d_in: int, d_out: int) -> str:
    """A kind's key in ``mos_pools`` and in checkpoints (module keys cannot contain dots)."""
    return f"{pattern.replace('.', '/')}@{d_in}x{d_out}"


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and is_supported(m)]


def find_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the modules to adapt, in model order.

    Raises ``ValueError`` if a suffix matches nothing, a regex matches nothing, or a match is
    not a linear layer MoS can wrap.
    """
    modules = dict(model.named_modules())
    if target_modules == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n in _linear_names(model) if modules[n] is not head]
        if not names:
            raise ValueError("target_modules='all-linear' found no linear layer in this model")
        return names
    if isinstance(target_modules, str):
        names = [n for n in modules if n and re.fullmatch(target_modules, n)]
        if not names:
            raise ValueError(
                f"target_modules regex {target_modules!r} matched no module; "
                f"linear layers look like {_linear_names(model)[:4]}"
            )
    else:
        names, unmatched = [], []
        for target in target_modules:
            hits = [n for n in modules if n == target or n.endswith("." + target)]
            names += hits
            if not hits:
                unmatched.append(target)
        if unmatched:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in _linear_names(model)})
            raise ValueError(
                f"target_modules {unmatched} matched no module in {type(model).__name__}; "
                f"its linear layers end in {suffixes}"
            )
        order = {n: i for i, n in enumerate(modules)}
        names = sorted(set(names), key=order.__getitem__)
    wrapped = [n for n in names if isinstance(modules[n], MoSLinear)]
    if wrapped:
        raise ValueError(
            f"{wrapped[0]} (and {len(wrapped) - 1} more) already carries an MoS adapter: "
            "get_mos_model and MoSModel.from_pretrained wrap the base model in place. Attach to a "
            "fresh copy of the base (load it again, or copy.deepcopy it before get_mos_model)"
        )
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not is_supported(modules[n])]
    if wrong:
        raise ValueError(
            f"target_modules matched modules that are not linear layers: {wrong[:4]}; MoS adapts "
            "nn.Linear, transformers Conv1D and bitsandbytes Linear4bit"
        )
    return names


class UnwrappedView:
    """A model's module tree with each ``wrapper`` module replaced by its ``base_layer``.

    ``find_targets`` and ``group_kinds`` only call ``named_modules()`` and
    ``get_output_embeddings()``; on a model whose targets are already wrapped (serving, a second
    PEFT adapter) they would see the wrappers instead of the linear layers that adapters are
    built and saved against. Nothing is copied or modified.

    Args:
        model: the live model.
        wrapper: the wrapper class (or tuple of classes); each has a ``base_layer`` attribute.
    """

    def __init__(self, model: nn.Module, wrapper: type | tuple[type, ...]) -> None:
        self.model = model
        self.wrapper = wrapper

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        inside = None  # prefix of a wrapper's children, which are skipped
        for name, module in self.model.named_modules():
            if inside is not None and name.startswith(inside):
                continue
            if isinstance(module, self.wrapper):
                inside, module = name + ".", module.base_layer
            yield name, module

    def get_output_embeddings(self) -> nn.Module | None:
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return head.base_layer if isinstance(head, self.wrapper) else head


@dataclass(frozen=True)
class Kind:
    """One kind of linear layer: same path pattern and shape; its layers share pools."""

    key: str
    pattern: str
    d_in: int
    d_out: int
    layers: tuple[str, ...]


def group_kinds(model: nn.Module, names: list[str]) -> list[Kind]:
    """Group target layers into kinds, in model order."""
    modules = dict(model.named_modules())
    groups: dict[tuple[str, int, int], list[str]] = {}
    for name in names:
        d_in, d_out = linear_shape(modules[name])
        groups.setdefault((kind_pattern(name), d_in, d_out), []).append(name)
    return [
        Kind(kind_key(pattern, d_in, d_out), pattern, d_in, d_out, tuple(layers))
        for (pattern, d_in, d_out), layers in groups.items()
    ]


def build_pools(config: MoSConfig, kind: Kind) -> ShardPools:
    """The freshly initialised pools of one kind (sized by ``solve_pools``, seeded per kind)."""
    plan = solve_pools(config, len(kind.layers), kind.d_in, kind.d_out, kind.pattern)
    return ShardPools(plan, config, kind_generator(config.seed, kind.key))


def fingerprint(model: nn.Module, kinds: list[Kind]) -> dict[str, Any]:
    """What an adapter needs of its base: architecture and the targeted layers' shapes."""
    return {
        "architecture": type(model).__name__,
        "layers": {n: [k.d_in, k.d_out] for k in kinds for n in k.layers},
    }
