"""MoSConfig: every knob of Mixture of Shards, validated at construction, and the budget solver.

The solver answers one question per layer kind: given the LoRA budget rank `e`, the per-layer
rank `r`, shards per vector `l`, private ranks `p` and private shards `k`, how many shards must
each pool hold so that MoS costs no more trainable parameters than LoRA at rank `e`?
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

INIT_SCHEMES = ("kaiming", "gaussian")
MAX_SEED = 2**32 - 1  # numpy's limit, which the Trainer's set_seed inherits


# The layers adapted by default, per architecture (``config.model_type``): every linear layer of
# the decoder blocks of a Llama (SmolLM2: the demo, training and the benchmarks), and of BERT's
# encoder blocks (not the pooler, not the classifier; the encoder benchmark track).
DEFAULT_TARGETS: dict[str, tuple[str, ...] | str] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "bert": (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|"
             r"attention\.output\.dense|intermediate\.dense|output\.dense)"),
}


def default_targets(model_type: str) -> list[str] | str:
    """``DEFAULT_TARGETS[model_type]`` as ``MoSConfig.target_modules`` takes it (a fresh list)."""
    targets = DEFAULT_TARGETS[model_type]
    return targets if isinstance(targets, str) else list(targets)


class ConfigError(ValueError):
    """A configuration value out of its allowed range; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # pickled across processes (the benchmarks' workers) with its field
        return type(self), (self.field, str(self))


@dataclass
class MoSConfig:
    """Configuration of a Mixture-of-Shards adapter (DESIGN.md §1).

    Args:
        target_modules: which linear layers to adapt: a list of module-name suffixes
            (``["q_proj", "v_proj"]``), a regex string matched against full module names, or
            ``"all-linear"`` (every linear layer but the output head).
        rank: per-layer rank ``r`` of the assembled ``A: (r, d_in)`` and ``B: (d_out, r)``.
        budget_rank: LoRA rank ``e`` whose parameter count the adapter must not exceed.
        shards_per_vector: ``l``; each rank vector is the concatenation of ``l`` shards
            (vector sharding; 1 = off).
        private_rank: ``p`` ranks per layer that are private to it (shard privatization; 0 = off).
        subset_selection: each layer routes to its own random subset of the pool
            (off = every layer uses the whole pool in the same order: pure sharing).
        pair_dissociation: A and B shards are routed by independent indices
            (off = one index routes both sides).
        alpha: scaling numerator; the update is ``(alpha / rank) · B A``.
        dropout: dropout on the adapter's input.
        init: ``"kaiming"`` (LoRA's default for A) or ``"gaussian"`` (std 1/r).
        seed: seeds routing indices and initialisation.

    Variants beyond the paper (off by default; ``benchmarks/capacity_model.py`` measures them):
        layer_scale: a trainable scale per rank and layer (``r`` numbers per layer, init 1)
            multiplying the assembled ``A``'s rows, so layers that share shards can weigh them
            differently; its ``L · r`` parameters are paid for with public shards.
        pool_lr_scale: ``c``; the public pools train at ``c`` times the learning rate of the
            private segments (stored divided by ``c``, used multiplied: under Adam a stored
            entry moves by about the learning rate, so the used one moves ``c`` times that).
        pool_init_scale: multiplies the initial public ``A`` pool (the private ``A`` keeps
            LoRA's init).
        private_shards: ``k`` shards per side private to each layer, on top of the
            ``private_rank`` whole ranks: privatization by ``k / l`` of a rank, so that e.g.
            ``budget_rank=1`` (where ``private_rank`` must be 0) can still privatize part of a
            rank. They are the last ``L · k`` rows of the pools (layer ``i`` owns rows
            ``n_pub + i·k + j``, ``j < k``) and fill the first ``k`` of a layer's
            ``(r - p) · l`` routed slots, on both sides; the pools' variants above
            (``pool_lr_scale``, ``pool_init_scale``) treat these rows as pool rows. Needs
            ``subset_selection`` (pure sharing has no per-layer routing to privatize).
    """

    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    rank: int = 16
    budget_rank: int = 2
    shards_per_vector: int = 1
    private_rank: int = 0
    subset_selection: bool = True
    pair_dissociation: bool = True
    alpha: float = 16.0
    dropout: float = 0.0
    init: Literal["kaiming", "gaussian"] = "kaiming"
    seed: int = 0
    layer_scale: bool = False
    pool_lr_scale: float = 1.0
    pool_init_scale: float = 1.0
    private_shards: int = 0

    def __post_init__(self) -> None:
        self._validate_targets()
        for name in ("rank", "budget_rank", "shards_per_vector"):
            require_int(name, getattr(self, name), minimum=1)
        require_int("private_rank", self.private_rank, minimum=0)
        require_int("private_shards", self.private_shards, minimum=0)
        require_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        if self.private_rank > self.rank:
            raise ConfigError("private_rank",
                              f"private_rank={self.private_rank} exceeds rank={self.rank}: "
                              "set private_rank <= rank")
        if self.private_rank > self.budget_rank:
            raise ConfigError(
                "private_rank",
                f"private_rank={self.private_rank} exceeds budget_rank={self.budget_rank}: the "
                "private segments alone would cost more than LoRA at the budget rank; "
                "set private_rank <= budget_rank")
        if self.private_rank == self.budget_rank and self.rank > self.private_rank:
            raise ConfigError(
                "private_rank",
                f"private_rank={self.private_rank} uses the whole budget_rank={self.budget_rank}, "
                f"leaving no budget for the public pools that rank={self.rank} needs: lower "
                "private_rank, raise budget_rank, or set rank = private_rank")
        for name in ("subset_selection", "pair_dissociation", "layer_scale"):
            require_bool(name, getattr(self, name))
        for name in ("pool_lr_scale", "pool_init_scale"):
            require_float(name, getattr(self, name), low=0.0, low_open=True)
        require_float("alpha", self.alpha, low=0.0, low_open=True)
        require_float("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        require_choice("init", self.init, INIT_SCHEMES)
        self._validate_private_shards()

    def _validate_private_shards(self) -> None:
        """The layer-independent bounds of ``private_shards`` (``solve_pools`` checks the rest)."""
        k, l = self.private_shards, self.shards_per_vector
        if not k:
            return
        if not self.subset_selection:
            raise ConfigError(
                "private_shards",
                f"private_shards={k} needs subset_selection: without it every layer routes the "
                "whole pool in the same order, so no slot is a layer's own; turn subset_selection "
                "on or set private_shards=0")
        slots = self.public_rank * l
        if k > slots:
            raise ConfigError(
                "private_shards",
                f"private_shards={k} exceeds the {slots} routed slots of a layer "
                f"((rank - private_rank) · shards_per_vector): set private_shards <= {slots} or "
                "raise rank")
        spare = (self.budget_rank - self.private_rank) * l
        if k > spare:
            raise ConfigError(
                "private_shards",
                f"private_shards={k} exceeds (budget_rank - private_rank) · shards_per_vector = "
                f"{spare}: the private shards alone would cost more than LoRA at the budget rank; "
                f"set private_shards <= {spare} or raise budget_rank")

    def _validate_targets(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            if targets == "all-linear":
                return
            try:
                re.compile(targets)
            except re.error as err:
                raise ConfigError(
                    "target_modules",
                    f"target_modules={targets!r} is neither 'all-linear' nor a valid regex: {err}",
                ) from None
            return
        if isinstance(targets, tuple):
            self.target_modules = targets = list(targets)
        if (
            not isinstance(targets, list)
            or not targets
            or not all(isinstance(t, str) and t for t in targets)
        ):
            raise ConfigError(
                "target_modules",
                "target_modules must be a non-empty list of module-name suffixes, a regex string, "
                f"or 'all-linear'; got {targets!r}",
            )

    @property
    def scaling(self) -> float:
        """The factor ``alpha / rank`` applied to ``B A``."""
        return self.alpha / self.rank

    @property
    def public_rank(self) -> int:
        """Ranks per layer that are routed from the public pools: ``r - p``."""
        return self.rank - self.private_rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoSConfig":
        """Build a config from a dict, rejecting unknown keys by name."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown MoSConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def lora_equivalent(cls, rank: int, **kwargs: Any) -> "MoSConfig":
        """The setting that reproduces plain LoRA at ``rank``: every rank private, no pools."""
        return cls(rank=rank, budget_rank=rank, private_rank=rank, shards_per_vector=1, **kwargs)


def require_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    """Raise ``ConfigError`` naming ``name`` unless ``value`` is an integer in range."""
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum)):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(name, f"{name} must be an integer {allowed}, got {value!r}")


def require_float(name: str, value: Any, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ConfigError`` naming ``name`` unless ``value`` is a finite number in range.

    ``low``/``high`` bound the range (None: unbounded), ``*_open`` excludes the bound.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ConfigError(name, f"{name} must be a finite number in {lo}, {hi}, got {value!r}")


def require_bool(name: str, value: Any) -> None:
    """Raise ``ConfigError`` naming ``name`` unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise ConfigError(name, f"{name} must be True or False, got {value!r}")


def require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ``ConfigError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(name, f"{name} must be one of {' | '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class PoolPlan:
    """Solved sizes for one layer kind: ``L`` layers of shape ``d_in -> d_out``.

    ``shards`` is the number of rows in each pool (``n_A = n_B``); each shard of the A pool has
    ``d_in / l`` entries and each of the B pool ``d_out / l``. Rows ``[0, public_shards)`` are
    public; with ``private_shards = k`` the last ``L · k`` rows are private, ``k`` per layer.
    """

    num_layers: int
    d_in: int
    d_out: int
    rank: int
    private_rank: int
    shards_per_vector: int
    budget_rank: int
    shards: int
    note: str = ""
    layer_scale: bool = False
    private_shards: int = 0

    @property
    def shard_dims(self) -> tuple[int, int]:
        return self.d_in // self.shards_per_vector, self.d_out // self.shards_per_vector

    @property
    def public_shards(self) -> int:
        """Pool rows routed from by every layer: ``shards`` less the layers' private shards."""
        return self.shards - self.num_layers * self.private_shards

    @property
    def private_params(self) -> int:
        """The private segments' parameters and the layers' private shards'."""
        a, b = self.shard_dims
        return (self.num_layers * self.private_rank * (self.d_in + self.d_out)
                + self.num_layers * self.private_shards * (a + b))

    @property
    def public_params(self) -> int:
        a, b = self.shard_dims
        return self.public_shards * (a + b)

    @property
    def scale_params(self) -> int:
        """The per-layer rank scales' parameters (``MoSConfig.layer_scale``), else 0."""
        return self.num_layers * self.rank if self.layer_scale else 0

    @property
    def total_params(self) -> int:
        return self.private_params + self.public_params + self.scale_params

    def lora_params(self, rank: int) -> int:
        """Parameters of plain LoRA at ``rank`` on this kind."""
        return self.num_layers * rank * (self.d_in + self.d_out)


def solve_pools(cfg: MoSConfig, num_layers: int, d_in: int, d_out: int, kind: str = "") -> PoolPlan:
    """Size the pools of one layer kind so MoS costs at most LoRA at ``budget_rank``.

    With subset selection, the pools get exactly the budget left after the private segments:
    ``n = (e - p) · L · l`` shards per side, of which ``L · k`` are the layers' private shards
    and the rest public (less the shards that pay for the layer scales, if on). Without it
    every layer uses the whole pool in the same order, so the pool holds just one layer's
    ``(r - p) · l`` shards per side.
    Raises ``ConfigError`` (a ``ValueError``) naming the knob to change when the budget cannot
    be met.
    """
    e, r, p, l = cfg.budget_rank, cfg.rank, cfg.private_rank, cfg.shards_per_vector
    k = cfg.private_shards
    where = f" for {kind}" if kind else ""
    for side, dim in (("d_in", d_in), ("d_out", d_out)):
        if dim % l:
            raise ConfigError("shards_per_vector",
                f"shards_per_vector={l} does not divide {side}={dim}{where}: "
                f"choose a shards_per_vector that divides both d_in={d_in} and d_out={d_out}"
            )
    # a layer draws (r - p)·l - k distinct public shards from the (e - p)·L·l - L·k public rows
    routed, public = (r - p) * l - k, (e - p) * num_layers * l - num_layers * k
    if routed > public:
        _refuse_unroutable(cfg, num_layers, routed, public, where)
    if cfg.subset_selection:
        shard_size = (d_in + d_out) // l
        scales = num_layers * r if cfg.layer_scale else 0
        public -= math.ceil(scales / shard_size)
        shards, note = public + num_layers * k, ""
        if public < routed:
            raise ConfigError("layer_scale",
                f"layer_scale's {scales} parameters{where} leave {public} public shards, fewer than "
                f"the {routed} a layer routes to: lower rank, raise budget_rank, or turn "
                "layer_scale off")
    else:
        shards = (r - p) * l
        note = (
            "subset selection off: all layers share one pool of (r - p)·l shards"
            if shards < (e - p) * num_layers * l
            else ""
        )
    plan = PoolPlan(num_layers, d_in, d_out, r, p, l, e, shards, note, cfg.layer_scale, k)
    if plan.total_params > plan.lora_params(e):
        raise ConfigError("layer_scale",
            f"layer_scale's {plan.scale_params} parameters{where} put MoS at {plan.total_params:,} "
            f"parameters, over LoRA's {plan.lora_params(e):,} at budget_rank={e}: turn layer_scale "
            "off or turn subset_selection on (its pools pay for the scales)")
    return plan


def _refuse_unroutable(cfg: MoSConfig, layers: int, routed: int, public: int, where: str) -> None:
    """Raise the ``ConfigError`` for a layer that draws ``routed`` distinct public shards from
    fewer, ``public``: naming ``private_shards`` when fewer of them would let the rank fit,
    else ``rank`` with the largest that fits."""
    e, r, p, l, k = (cfg.budget_rank, cfg.rank, cfg.private_rank, cfg.shards_per_vector,
                     cfg.private_shards)
    max_rank = p + (public + k) // l  # from (r' - p)·l - k <= public
    if k and r - p <= (e - p) * layers:  # the rank fits once the private shards are fewer
        # (r - p)·l - k' <= (e - p)·L·l - L·k'; L > 1 here, as with one layer k cancels out
        fits = ((e - p) * layers - (r - p)) * l // (layers - 1)
        raise ConfigError("private_shards",
            f"private_shards={k}{where} take {layers * k} of the pools' {public + layers * k} "
            f"shards, leaving {public} public ones, fewer than the {routed} a layer draws: set "
            f"private_shards <= {fits}, lower rank (at most {max_rank} fits), or raise budget_rank")
    left = (f"private_rank={p} and private_shards={k} leave {public} public shard(s) in the pool, "
            f"and a layer draws (rank - private_rank) · shards_per_vector - private_shards = "
            f"{routed} distinct ones" if k else
            f"private_rank={p} leave {(e - p) * layers} public rank(s) in the pool, and a layer "
            f"needs rank - private_rank = {r - p} distinct ones")
    raise ConfigError("rank",
        f"rank={r} cannot be met{where}: {layers} layer(s) at budget_rank={e} with {left}; the "
        f"largest rank that fits is {max_rank} (or raise budget_rank)")
