"""MultiAdapterModel: many MoS adapters resident on one frozen base, one adapter per batch row.

Each adapter stays in its compact form (pools, private segments, routing indices). A call

1. assembles the factors of each adapter present in the batch (``ShardPools.factors``, one
   gather per kind, or from the ``FactorCache``);
2. gives every wrapped layer its per-row factors ``A: (rows, r_max, d_in)`` and
   ``B: (rows, d_out, r_max)``: row ``i`` holds its adapter's factors for that layer,
   zero-padded to the largest rank, or zeros (base rows; adapters that skip the layer); when
   every row names the same adapter, that adapter's factors alone;
3. runs the base once. Each ``MultiAdapterLinear`` computes ``base(x)`` for the whole batch and
   adds every row's ``scale · B (A x)`` into it with two batched matmuls (Punica's BGMV: each
   row's factors, then ``bmm``), or two plain matmuls for a one-adapter batch, with no Python
   loop over adapters.

Step 2 happens once per call, so ``generate`` pays it once, not at every new token; it holds
``rows`` dense factor sets for the call's duration. Zero padding and zero rows are exact:
they add products with 0.

Routing indices are a deterministic function of (seed, config, kind), so adapters trained
with the same seed carry identical ones: the registry keeps one copy of each distinct index
tensor (``_IndexStore``), and ``memory_report`` counts it once.
"""

from __future__ import annotations

import hashlib
import re
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import read_adapter
from ..config import MoSConfig
from ..layer import MoSLinear, dense_weight, linear_shape, set_dense_weight
from ..targeting import Kind, UnwrappedView, build_pools
from .cache import FactorCache, Factors

BASE = "__base__"
"""The name that selects the bare base model for a row (``None`` does too)."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class UnknownAdapterError(LookupError):
    """A batch or a call names an adapter that is not loaded."""


@dataclass(frozen=True)
class _AdapterInfo:
    """What the registry keeps about a loaded adapter besides its pools."""

    config: MoSConfig
    kinds: tuple[Kind, ...]


class _IndexStore:
    """One resident copy of each distinct routing-index tensor, shared by the adapters that use it.

    Keyed by a digest of dtype, shape and content, and a hit is confirmed with ``torch.equal``
    before it is shared (a digest collision keeps the adapter's own copy). Entries are weak:
    the tensor lives as long as some loaded adapter holds it, so unloading its last user
    frees it with no bookkeeping here.
    """

    def __init__(self) -> None:
        self._tensors: weakref.WeakValueDictionary[str, Tensor] = weakref.WeakValueDictionary()

    def intern(self, index: Tensor) -> Tensor:
        """The resident tensor equal to ``index`` (which becomes it, if there is none yet)."""
        key = _digest(index)
        resident = self._tensors.get(key)
        if resident is None:
            self._tensors[key] = index
            return index
        same = resident.dtype == index.dtype and resident.shape == index.shape and torch.equal(resident, index)
        return resident if same else index


def _digest(t: Tensor) -> str:
    """A lookup key for ``t``'s dtype, shape and contents (hashing the few kB of an index)."""
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=16)
    h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- layer


class Route(NamedTuple):
    """One layer's adapter factors for the rows of one call.

    Mixed rows: ``a: (rows, r_max, d_in)``, ``b: (rows, d_out, r_max)`` (zero-padded to the
    largest rank; zeros for rows without an update here) and ``scale: (rows, 1, 1)``. One
    adapter for every row: ``a: (r, d_in)``, ``b: (d_out, r)`` and a float ``scale``.
    """

    a: Tensor
    b: Tensor
    scale: Tensor | float


class MultiAdapterLinear(nn.Module):
    """A frozen linear layer plus, per batch row, the update of that row's adapter.

    ``route`` is set by ``MultiAdapterModel`` for the duration of one call and is ``None``
    otherwise (the layer is then exactly its base layer).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.d_in, self.d_out = linear_shape(base_layer)
        self.route: Route | None = None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``x: (rows, ..., d_in) -> (rows, ..., d_out)``: ``base(x) + scale · B (A x)`` per row."""
        y = self.base_layer(x, *args, **kwargs)
        if self.route is None:
            return y
        a, b, scale = self.route
        # the update is added into base(x)'s fresh output in place (a copy only if the base
        # computes in another dtype): one pass over y instead of a delta tensor plus an add
        if a.dim() == 2:  # one adapter for every row: one plain matmul over all tokens
            out = y.reshape(-1, self.d_out).to(b.dtype)
            h = (x.reshape(-1, self.d_in).to(a.dtype) @ a.T).mul_(scale)  # (tokens, r)
            out.addmm_(h, b.T)
        else:  # Punica's BGMV: each row its own factors, batched; the transposes are free views
            rows = x.shape[0]
            a, b, scale = (_expand(t, rows) for t in (a, b, scale))
            out = y.reshape(rows, -1, self.d_out).to(b.dtype)
            h = torch.bmm(x.reshape(rows, -1, self.d_in).to(a.dtype), a.transpose(1, 2)).mul_(scale)
            out.baddbmm_(h, b.transpose(1, 2))
        return out.view(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}"


def _expand(per_row: Tensor, rows: int) -> Tensor:
    """Per-row values for ``rows`` rows. HF generate repeats each row ``k`` times in place
    (``repeat_interleave``) for ``num_beams`` / ``num_return_sequences``; copies keep the
    row's adapter."""
    if rows == per_row.shape[0]:
        return per_row
    if rows % per_row.shape[0]:
        raise RuntimeError(f"a layer got {rows} rows for {per_row.shape[0]} adapter_names")
    return per_row.repeat_interleave(rows // per_row.shape[0], dim=0)


def _route(factors: list[tuple[Tensor, Tensor] | None], scales: list[float]) -> Route | None:
    """One layer's route from each row's ``(A: (r, d_in), B: (d_out, r))`` (``None``: base row,
    or its adapter skips the layer) and adapter scaling; ``None`` if no row has an update here."""
    present = [f for f in factors if f is not None]
    if not present:
        return None
    first = present[0]
    if all(f is first for f in factors):  # every row, one adapter: no per-row copies at all
        return Route(*first, scales[0])
    rank = max(a.shape[0] for a, _ in present)
    zero = (first[0].new_zeros(rank, first[0].shape[1]), first[1].new_zeros(first[1].shape[0], rank))

    def padded(pair: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        if pair is None:
            return zero
        missing = rank - pair[0].shape[0]
        return (F.pad(pair[0], (0, 0, 0, missing)), F.pad(pair[1], (0, missing))) if missing else pair

    pairs = [padded(pair) for pair in factors]
    scale = torch.tensor(scales, dtype=first[0].dtype, device=first[0].device).view(-1, 1, 1)
    return Route(torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs]), scale)


# ---------------------------------------------------------------------------- model


class MultiAdapterModel(nn.Module):
    """A frozen base serving many MoS adapters at once, one adapter per batch row.

    Args:
        base_model: a plain base model (a transformers ``PreTrainedModel`` or any module with
            the linear layers the adapters target). It is frozen, and its targeted linear
            layers are wrapped in ``MultiAdapterLinear`` while an adapter targets them.
        cache_bytes: budget of the ``FactorCache`` of materialized factors (0 = off).

    Loaded adapters are read-only: their factors may be cached, their routing indices may be
    shared with other adapters, and each call reads them.

    Example::

        mm = MultiAdapterModel(base)
        mm.load_adapter("a", "adapters/a"); mm.load_adapter("b", "adapters/b")
        logits = mm(input_ids, adapter_names=["a", "b", None]).logits
    """

    def __init__(self, base_model: nn.Module, cache_bytes: int = 0) -> None:
        super().__init__()
        if any(isinstance(m, MoSLinear) for m in base_model.modules()):
            raise ValueError(
                "base_model already carries an MoS adapter (MoSLinear layers), which every row "
                "would get: pass the plain base model and load the adapter with load_adapter()"
            )
        self.base_model = base_model.requires_grad_(False)
        self.adapter_pools = nn.ModuleDict()  # name -> ModuleDict(kind key -> ShardPools)
        self.cache = FactorCache(cache_bytes)
        self.merged: str | None = None
        self._indices = _IndexStore()
        self._info: dict[str, _AdapterInfo] = {}
        self._layers: dict[str, MultiAdapterLinear] = {}
        # one call at a time: a call sets per-row routes on shared layers (and load, unload and
        # merge rewrite them), so concurrent callers, e.g. server threads, must take turns
        self._lock = threading.Lock()

    # ---- registry
    def adapters(self) -> list[str]:
        """Names of the loaded adapters, in load order."""
        return list(self._info)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Validate the MoS adapter at ``path`` against the base and keep it resident as pools.

        Raises ``ValueError`` for a bad or duplicate name, ``FileNotFoundError`` and
        ``CheckpointError`` (e.g. saved for a different base) for bad files; the model is
        unchanged on any error.
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(
                f"adapter name {name!r} is invalid: use 1-64 letters, digits, '_' or '-', "
                "starting with a letter or digit"
            )
        with self._lock:
            if name in self._info:
                raise ValueError(f"an adapter named {name!r} is already loaded; unload it first")
            config, kinds, state = self._read(Path(path))
            pools = nn.ModuleDict({k.key: build_pools(config, k) for k in kinds})
            pools.load_state_dict(state, strict=True)
            device = next(self.base_model.parameters()).device
            pools = pools.requires_grad_(False).to(device)
            for kind_pools in pools.values():
                for buffer in ("index_A", "index_B"):
                    setattr(kind_pools, buffer, self._indices.intern(getattr(kind_pools, buffer)))
            self.adapter_pools[name] = pools
            self._info[name] = _AdapterInfo(config, tuple(kinds))
            for module_name in (n for k in kinds for n in k.layers):
                if module_name not in self._layers:
                    self._wrap(module_name)

    def unload_adapter(self, name: str) -> None:
        """Drop adapter ``name``: its pools, cached factors, and the wrappers no adapter needs."""
        with self._lock:
            self._require(name)
            if self.merged == name:
                raise RuntimeError(f"adapter {name!r} is merged into the base: unmerge() first")
            del self.adapter_pools[name], self._info[name]
            self.cache.drop(name)
            needed = {n for info in self._info.values() for k in info.kinds for n in k.layers}
            for module_name in [n for n in self._layers if n not in needed]:
                self._unwrap(module_name)

    def memory_report(self) -> dict[str, Any]:
        """Resident bytes, each tensor counted once: ``base``; ``adapters``, per name, what that
        adapter alone holds (compact form); ``shared``, tensors held by several adapters (routing
        indices of same-seed adapters); ``adapters_total`` = their sum; ``cache``
        (materialized factors); ``total``."""
        users: dict[int, set[str]] = {}
        size: dict[int, int] = {}
        for name in self._info:
            for t in _tensors(self.adapter_pools[name]):
                users.setdefault(id(t), set()).add(name)
                size[id(t)] = t.numel() * t.element_size()
        adapters = {name: sum(size[i] for i, u in users.items() if u == {name}) for name in self._info}
        shared = sum(size[i] for i, u in users.items() if len(u) > 1)
        report = {
            "base": sum(t.numel() * t.element_size() for t in _tensors(self.base_model)),
            "adapters": adapters,
            "shared": shared,
            "adapters_total": sum(adapters.values()) + shared,
            "cache": self.cache.bytes,
        }
        report["total"] = report["base"] + report["adapters_total"] + report["cache"]
        return report

    # ---- inference
    @torch.no_grad()
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        adapter_names: Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the base on ``input_ids: (rows, tokens)`` with row ``i`` adapted by
        ``adapter_names[i]`` (``None`` or ``"__base__"``: the bare base; ``adapter_names=None``:
        every row). Returns what the base returns (e.g. ``logits: (rows, tokens, vocab)``)."""
        with self._lock, self._routed(adapter_names, input_ids.shape[0]):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        adapter_names: Sequence[str | None] | None = None,
        **gen_kwargs: Any,
    ) -> Any:
        """HF ``generate`` with one adapter per row of ``input_ids: (rows, tokens)`` (left-pad
        with an ``attention_mask``). The routes stay set for all of generate's internal calls;
        beams and extra sequences of a row keep the row's adapter."""
        with self._lock, self._routed(adapter_names, input_ids.shape[0]):
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)

    # ---- merge
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights (``W += (alpha/r) B A``): the fast path
        when all traffic goes to one adapter. Until ``unmerge()``, only batches whose rows
        all name this adapter are accepted."""
        with self._lock:
            self._require(name)
            if self.merged is not None:
                raise RuntimeError(f"adapter {self.merged!r} is already merged: unmerge() first")
            self._add_to_base(name, sign=1.0)
            self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()`` (exact up to float rounding)."""
        with self._lock:
            if self.merged is None:
                raise RuntimeError("no adapter is merged")
            self._add_to_base(self.merged, sign=-1.0)
            self.merged = None

    # ---- internals
    def _require(self, name: str) -> None:
        if name not in self._info:
            raise UnknownAdapterError(f"no adapter named {name!r} is loaded; loaded: {self.adapters()}")

    def _read(self, path: Path) -> tuple[MoSConfig, list[Kind], dict[str, Tensor]]:
        """``checkpoint.read_adapter`` against the base as it was before we wrapped it."""
        return read_adapter(self.base_model, path, view=UnwrappedView(self.base_model, MultiAdapterLinear))

    def _factors(self, name: str) -> Factors:
        """Every layer of adapter ``name``: ``A: (r, d_in)`` and ``B: (d_out, r)``, unscaled."""

        def build() -> Factors:
            pools, kinds = self.adapter_pools[name], self._info[name].kinds
            factors: Factors = {}
            for kind in kinds:
                a, b = pools[kind.key].factors()  # all layers of the kind in one gather
                factors.update({n: (a[i], b[i]) for i, n in enumerate(kind.layers)})
            return factors

        return self.cache.get(name, build)

    @contextmanager
    def _routed(self, adapter_names: Sequence[str | None] | None, rows: int) -> Iterator[None]:
        """Set every wrapped layer's per-row route for one call, and clear it afterwards."""
        names = self._row_names(adapter_names, rows)
        if self.merged is not None:
            if any(n != self.merged for n in names):
                raise RuntimeError(
                    f"adapter {self.merged!r} is merged into the base weights, so every row gets "
                    f"it; this batch also asks for {sorted({n or BASE for n in names} - {self.merged})}: call "
                    "unmerge() before serving mixed batches"
                )
            yield
            return
        factors = {name: self._factors(name) for name in dict.fromkeys(n for n in names if n is not None)}
        scales = [0.0 if n is None else self._info[n].config.scaling for n in names]
        try:
            for module_name, layer in self._layers.items():
                layer.route = _route([None if n is None else factors[n].get(module_name) for n in names], scales)
            yield
        finally:
            for layer in self._layers.values():
                layer.route = None

    def _row_names(self, adapter_names: Sequence[str | None] | None, rows: int) -> list[str | None]:
        """Check ``adapter_names`` against the batch; base rows become ``None``."""
        if adapter_names is None:
            return [None] * rows
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list with one name per row, not the string {adapter_names!r}")
        names = [None if n == BASE else n for n in adapter_names]
        if len(names) != rows:
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {rows} rows")
        unknown = sorted({n for n in names if n is not None and n not in self._info}, key=str)
        if unknown:
            raise UnknownAdapterError(
                f"unknown adapter(s) {unknown} in adapter_names; loaded: {self.adapters()} "
                f"(None or {BASE!r} selects the base model)"
            )
        return names

    def _add_to_base(self, name: str, sign: float) -> None:
        scaling = self._info[name].config.scaling
        for module_name, (a, b) in self._factors(name).items():
            layer = self._layers[module_name].base_layer
            weight = dense_weight(layer)
            delta = scaling * (b @ a)  # (d_out, d_in)
            set_dense_weight(layer, (weight.float() + sign * delta.float()).to(weight.dtype))

    def _wrap(self, module_name: str) -> None:
        owner, child = _owner(self.base_model, module_name)
        layer = MultiAdapterLinear(getattr(owner, child))
        setattr(owner, child, layer)
        self._layers[module_name] = layer

    def _unwrap(self, module_name: str) -> None:
        owner, child = _owner(self.base_model, module_name)
        setattr(owner, child, self._layers.pop(module_name).base_layer)


def _owner(model: nn.Module, module_name: str) -> tuple[nn.Module, str]:
    parent, _, child = module_name.rpartition(".")
    return model.get_submodule(parent), child


def _tensors(module: nn.Module) -> list[Tensor]:
    """Parameters and buffers of ``module``, each object once."""
    return [*module.parameters(), *module.buffers()]
