"""MultiAdapterModel: many MoS adapters resident on one frozen base, one adapter per batch row.

Each adapter stays in its compact form (pools, private segments, routing indices). A call

1. groups its rows by adapter (``Rows``: a slice when an adapter's rows are contiguous, else
   an index);
2. lays each kind's pools of the adapters present end to end (``StackedPools``: about
   ``e / r`` of their dense factors' bytes) and gives every wrapped layer a ``Route``: one
   ``Update`` per adapter that targets it, and the indices that assemble their factors;
3. runs the base once. Each ``MultiAdapterLinear`` computes ``base(x)`` for the whole batch,
   gathers its adapters' factors ``A: (G, r, d_in)``, ``B: (G, d_out, r)`` from the stacked
   pools just in time (the pools stay in cache across layers; no dense factors are kept
   between decoding steps) and adds each adapter's ``scale · B (A x)`` on that adapter's rows
   (Punica/S-LoRA's segmented form, through ``layer.low_rank_update``), never copying factors
   per row. A decoding step (one token per row) skips the factors: the C++ op of
   ``serving.kernel`` reads each row's shards straight from the stacked pools (the torch
   path when the op is not built, or with ``decode_kernel = False``). Base rows are in no
   update, so they get the bare base exactly.

Steps 1-2 happen once per call, so ``generate`` pays them once, not at every new token.

Routing indices are a deterministic function of (seed, config, kind), so adapters trained
with the same seed carry identical ones: the registry keeps one copy of each distinct index
tensor (``_IndexStore``), and ``memory_report`` counts it once.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import CheckpointError, read_adapter
from ..config import MoSConfig
from ..pools import ShardPools
from ..layer import MoSLinear, add_to_weight, dense_update, linear_shape, low_rank_update
from ..targeting import Kind, UnwrappedView, build_pools, swap_module
from .kernel import available as decode_kernel_available, decode_update
from .stacked import StackedPools
from .root import NAME, AdapterRoot

Factors = dict[str, tuple[Tensor, Tensor]]  # module name -> (A: (r, d_in), B: (d_out, r)), unscaled

BASE = "__base__"
"""The name that selects the bare base model for a row (``None`` does too)."""

log = logging.getLogger("moslora.serving")


class UnknownAdapterError(LookupError):
    """A batch or a call names an adapter that is neither loaded nor servable from the root."""


@dataclass
class ResidencyStats:
    """What the registry did to keep adapters resident within the byte budget."""

    loads: int = 0  # adapters loaded from the root on first use
    evictions: int = 0  # least recently used adapters unloaded to make room
    over_budget: int = 0  # calls whose own adapters alone exceeded the budget (served anyway)


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


class Rows:
    """The rows of one call that one adapter serves, as each layer indexes them.

    Built once per call and shared by every layer (the grouping is the same in all of them).
    HF ``generate`` repeats each row ``k`` times in place (``repeat_interleave``) for
    ``num_beams`` / ``num_return_sequences``, so a layer may see ``k`` times the call's rows;
    the copies keep their row's adapter.

    Args:
        rows: positions of this adapter's rows in the call's batch, ascending.
        batch: rows in the call's batch.
        device: where the layers' inputs live.
    """

    def __init__(self, rows: list[int], batch: int, device: torch.device) -> None:
        self.rows, self.batch, self.device = rows, batch, device
        self._positions: dict[int, list[int]] = {}
        self._index: dict[int, Tensor | slice | None] = {}

    def positions(self, batch: int) -> list[int]:
        """These rows' positions in a layer input of ``batch`` rows, ascending."""
        if batch not in self._positions:
            if batch % self.batch:
                raise RuntimeError(f"a layer got {batch} rows for {self.batch} adapter_names")
            k = batch // self.batch
            self._positions[batch] = [i * k + j for i in self.rows for j in range(k)]
        return self._positions[batch]

    def index(self, batch: int) -> Tensor | slice | None:
        """These rows of a layer input of ``batch`` rows, as ``low_rank_update`` takes them:
        ``None`` (all of them), a slice (contiguous) or a ``(k,)`` int64 index."""
        if batch not in self._index:
            rows = self.positions(batch)
            if len(rows) == batch:
                self._index[batch] = None
            elif rows[-1] - rows[0] + 1 == len(rows):
                self._index[batch] = slice(rows[0], rows[-1] + 1)
            else:
                self._index[batch] = torch.tensor(rows, device=self.device)
        return self._index[batch]


class Update(NamedTuple):
    """One adapter's share of one layer for one call: its rank, scaling and rows."""

    rank: int
    scale: float
    rows: Rows


class Route:
    """One layer's updates for one call, one per adapter of the call that targets the layer,
    with where their factors come from: ``factors()`` gathers them from the kind's
    ``StackedPools`` at every forward (just in time: pools stay in cache, no dense factors
    are kept between decoding steps).

    A decoding step has one token per row, so one adapter's share is a few matrix-vector
    products and the cost is the number of operations, not their size. With ``kernel``,
    ``decode_inputs`` gives what the C++ op reads instead of factors; on the torch path
    ``stacked_rows`` gives the rows for one batched product over every adapter (each
    adapter's rows padded to the most any adapter has, padding rows scaled by 0).
    """

    def __init__(self, stack: StackedPools, members: list[tuple[int, int]], updates: tuple[Update, ...],
                 kernel: bool = False) -> None:
        self.stack, self.updates = stack, updates
        self.kernel = kernel and stack.pool_a.dtype == torch.float32  # the op's one dtype
        self.index = stack.indices(members)
        self._rows: dict[int, tuple[Tensor, Tensor]] = {}
        self._decode: dict[int, tuple[Tensor, ...]] = {}

    def factors(self) -> tuple[Tensor, Tensor]:
        """``a: (G, r_max, d_in)``, ``b: (G, d_out, r_max)`` of this layer's ``G`` adapters."""
        return self.stack.factors(*self.index)

    def decode_inputs(self, batch: int) -> tuple[Tensor, ...]:
        """For ``kernel.decode_update`` on a layer input of ``batch`` rows: ``table_a, table_b:
        (G, r_max, l)``, ``groups: (batch,)`` (each row's update, -1 for none) and
        ``scale: (G, r_max)`` (the adapter's scaling times its layer scale)."""
        if batch not in self._decode:
            index_a, index_b, layer_scale = self.index
            device = self.stack.pool_a.device
            groups = torch.full((batch,), -1, dtype=torch.long, device=device)
            for g, u in enumerate(self.updates):
                groups[u.rows.positions(batch)] = g
            scale = torch.tensor([u.scale for u in self.updates], device=device).view(-1, 1)
            scale = scale.expand(-1, index_a.shape[1]) if layer_scale is None else scale * layer_scale.squeeze(-1)
            self._decode[batch] = (index_a.contiguous(), index_b.contiguous(), groups,
                                   scale.to(torch.float32).contiguous())
        return self._decode[batch]

    def stacked_rows(self, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """For a layer input of ``batch`` rows: ``scale: (G·m, 1, 1)`` and ``rows: (G·m,)``."""
        if batch not in self._rows:
            per_update = [u.rows.positions(batch) for u in self.updates]
            m = max(len(p) for p in per_update)
            rows = [p + [0] * (m - len(p)) for p in per_update]
            scale = [[u.scale] * len(p) + [0.0] * (m - len(p)) for u, p in zip(self.updates, per_update)]
            device = self.stack.pool_a.device
            self._rows[batch] = (torch.tensor(scale, dtype=dtype, device=device).view(-1, 1, 1),
                                 torch.tensor(rows, device=device).view(-1))
        return self._rows[batch]


class MultiAdapterLinear(nn.Module):
    """A frozen linear layer plus, per batch row, the update of that row's adapter.

    ``route`` is set by ``MultiAdapterModel`` for the duration of one call, and is ``None``
    otherwise (the layer is then exactly its base layer); base rows are in no update, so they
    get the base output exactly.
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
        # each adapter's compact factors on its rows' slice (Punica/S-LoRA's segmented form),
        # added into base(x)'s fresh output in place (a copy only if the base computes in
        # another dtype): no per-row copies of the factors, no delta tensor for the whole batch
        one_token = x.numel() == x.shape[0] * self.d_in  # a decoding step: one token per row
        if self.route.kernel and one_token:  # the C++ op, no factors formed
            out = y if y.dtype == torch.float32 else y.float()
            decode_update(x, out, self.route.stack.pool_a, self.route.stack.pool_b, *self.route.decode_inputs(x.shape[0]))
            return out if out is y else out.to(y.dtype)
        updates = self.route.updates
        a, b = self.route.factors()
        out = y.to(a.dtype)
        if len(updates) > 1 and one_token:  # one batched product over the adapters
            scale, rows = self.route.stacked_rows(x.shape[0], a.dtype)
            low_rank_update(x, a, b, scale, out=out, rows=rows)
        else:
            for i, (rank, scale, rows) in enumerate(updates):
                low_rank_update(x, a[i, :rank], b[i, :, :rank], scale, out=out, rows=rows.index(x.shape[0]))
        return out.to(y.dtype)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}"


# ---------------------------------------------------------------------------- model


class MultiAdapterModel(nn.Module):
    """A frozen base serving many MoS adapters at once, one adapter per batch row.

    Args:
        base_model: a plain base model (a transformers ``PreTrainedModel`` or any module with
            the linear layers the adapters target). It is frozen, and its targeted linear
            layers are wrapped in ``MultiAdapterLinear`` while an adapter targets them.
        adapter_root: a directory of adapters, one per subdirectory named after it
            (``AdapterRoot``): each is servable by name and loaded on the first call that
            names it. ``None``: only adapters loaded with ``load_adapter``.
        max_resident_bytes: budget of the adapters loaded from the root (``memory_report``'s
            ``adapters_total``): past it, the least recently used ones are unloaded, never one
            the current call uses (a call that alone needs more is served, logged and counted
            in ``stats.over_budget``). ``None``: no limit. Adapters loaded with
            ``load_adapter`` count towards it but are never evicted.

    Loaded adapters are read-only: their routing indices may be
    shared with other adapters, and each call reads them.

    Example::

        mm = MultiAdapterModel(base)
        mm.load_adapter("a", "adapters/a"); mm.load_adapter("b", "adapters/b")
        logits = mm(input_ids, adapter_names=["a", "b", None]).logits

        mm = MultiAdapterModel(base, adapter_root="adapters", max_resident_bytes=2**30)
        mm.available()  # ["a", "b", ...]: every adapter on disk, loaded when first used
    """

    def __init__(self, base_model: nn.Module, adapter_root: str | Path | None = None,
                 max_resident_bytes: int | None = None) -> None:
        super().__init__()
        if any(isinstance(m, MoSLinear) for m in base_model.modules()):
            raise ValueError(
                "base_model already carries an MoS adapter (MoSLinear layers), which every row "
                "would get: pass the plain base model and load the adapter with load_adapter()"
            )
        self.base_model = base_model.requires_grad_(False)
        self.adapter_pools = nn.ModuleDict()  # name -> ModuleDict(kind key -> ShardPools)
        self.merged: str | None = None
        self.merge_error = 0.0  # largest storage error of the last merge/unmerge (4-bit: requantized)
        self._indices = _IndexStore()
        self._info: dict[str, _AdapterInfo] = {}
        self._layers: dict[str, MultiAdapterLinear] = {}
        if max_resident_bytes is not None and max_resident_bytes < 0:
            raise ValueError(f"max_resident_bytes must be >= 0, got {max_resident_bytes}")
        self.root = None if adapter_root is None else AdapterRoot(adapter_root)
        self.max_resident_bytes = max_resident_bytes
        self.stats = ResidencyStats()
        self.decode_kernel = True  # decoding steps use the C++ op when it is built (False: the torch path)
        self._from_root: OrderedDict[str, None] = OrderedDict()  # loaded on use, least recently used first
        # one call at a time: a call sets per-row routes on shared layers (and load, unload and
        # merge rewrite them), so concurrent callers, e.g. server threads, must take turns
        self._lock = threading.Lock()

    # ---- registry
    def adapters(self) -> list[str]:
        """Names of the resident adapters, in load order."""
        return list(self._info)

    def available(self) -> list[str]:
        """Every adapter a call may name, sorted: the resident ones and those on disk under the
        root (not yet loaded, or evicted). One removed from the root is no longer listed (and
        is unloaded at the next call)."""
        on_disk = self.root.names() if self.root is not None else frozenset()
        resident = list(self._info)  # one C-level copy: safe while a call loads or evicts (no lock)
        return sorted(on_disk | {n for n in resident if n not in self._from_root})

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Validate the MoS adapter at ``path`` against the base and keep it resident as pools
        until ``unload_adapter`` (it is never evicted).

        Raises ``ValueError`` for a bad or duplicate name, ``FileNotFoundError`` and
        ``CheckpointError`` (e.g. saved for a different base) for bad files; the model is
        unchanged on any error.
        """
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(
                f"adapter name {name!r} is invalid: use 1-64 letters, digits, '_' or '-', "
                "starting with a letter or digit"
            )
        with self._lock:
            if name in self._info:
                raise ValueError(f"an adapter named {name!r} is already loaded; unload it first")
            self._load(name, Path(path))

    def unload_adapter(self, name: str) -> None:
        """Drop adapter ``name``: its pools and the wrappers no adapter needs.
        One on disk under the root stays available (and is loaded again when next named)."""
        with self._lock:
            self._require(name)
            if self.merged == name:
                raise RuntimeError(f"adapter {name!r} is merged into the base: unmerge() first")
            self._unload(name)

    def memory_report(self) -> dict[str, Any]:
        """Resident bytes, each tensor counted once: ``base``; ``adapters``, per name, what that
        adapter alone holds (compact form); ``shared``, tensors held by several adapters (routing
        indices of same-seed adapters); ``adapters_total`` = their sum; ``total``; and
        ``budget``, ``max_resident_bytes``. No dense factors stay resident: a call gathers them
        layer by layer from the pools."""
        adapters, shared = self._adapter_bytes()
        report = {
            "base": sum(t.numel() * t.element_size() for t in _tensors(self.base_model)),
            "adapters": adapters,
            "shared": shared,
            "adapters_total": sum(adapters.values()) + shared,
            "budget": self.max_resident_bytes,
        }
        report["total"] = report["base"] + report["adapters_total"]
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

    def _load(self, name: str, path: Path) -> None:
        """Read and validate the adapter at ``path`` and make it resident as ``name``."""
        config, kinds, state = read_adapter(self.base_model, path,
                                            view=UnwrappedView(self.base_model, MultiAdapterLinear))
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

    def _unload(self, name: str) -> None:
        del self.adapter_pools[name], self._info[name]
        self._from_root.pop(name, None)
        needed = {n for info in self._info.values() for k in info.kinds for n in k.layers}
        for module_name in [n for n in self._layers if n not in needed]:
            self._unwrap(module_name)

    def _adapter_bytes(self) -> tuple[dict[str, int], int]:
        """The one byte counter of resident adapters, each tensor once: per name, the bytes of
        the tensors that adapter alone holds (pools, private segments, routing indices), and
        the bytes of the tensors several hold (same-seed routing indices)."""
        users: dict[int, set[str]] = {}
        size: dict[int, int] = {}
        for name in self._info:
            for t in _tensors(self.adapter_pools[name]):
                users.setdefault(id(t), set()).add(name)
                size[id(t)] = t.numel() * t.element_size()
        alone = {name: sum(size[i] for i, u in users.items() if u == {name}) for name in self._info}
        return alone, sum(size[i] for i, u in users.items() if len(u) > 1)

    def _make_resident(self, needed: list[str]) -> None:
        """Load the adapters of a call that are on disk but not resident, each followed by
        evictions down to the budget (never one of ``needed``); mark them as just used."""
        on_disk = self.root.names()
        for name in [n for n in self._from_root if n not in on_disk and n != self.merged]:
            self._unload(name)  # its directory was removed: no longer servable
        unknown = [n for n in needed if n not in self._info and n not in on_disk]
        if unknown:
            raise UnknownAdapterError(
                f"unknown adapter(s) {unknown} in adapter_names: neither loaded nor under the adapter root "
                f"{self.root.path} (None or {BASE!r} selects the base model)"
            )
        for name in needed:
            if name not in self._info:
                try:
                    self._load(name, self.root.inside(name))
                except (CheckpointError, FileNotFoundError) as err:
                    self.root.mark_broken(name)
                    raise UnknownAdapterError(f"adapter {name!r} under the adapter root cannot be served: {err}") from err
                self.stats.loads += 1
                self._from_root[name] = None
                self._evict(keep=set(needed))
            if name in self._from_root:
                self._from_root.move_to_end(name)

    def _evict(self, keep: set[str]) -> None:
        """Unload least recently used adapters from the root until the resident ones fit
        ``max_resident_bytes``; never one in ``keep`` (the current call's) or the merged one."""
        if self.max_resident_bytes is None:
            return
        def resident() -> int:
            alone, shared = self._adapter_bytes()
            return sum(alone.values()) + shared

        for name in [n for n in self._from_root if n not in keep and n != self.merged]:
            if resident() <= self.max_resident_bytes:
                return
            self._unload(name)
            self.stats.evictions += 1
        if resident() > self.max_resident_bytes:
            self.stats.over_budget += 1
            log.warning("resident adapters take %d bytes, over the budget of %d: this call's %d adapter(s) "
                        "alone need more; served anyway", resident(), self.max_resident_bytes, len(keep))

    def _factors(self, name: str) -> Factors:
        """Every layer of adapter ``name``: ``A: (r, d_in)`` and ``B: (d_out, r)``, unscaled
        (for merging)."""
        pools, factors = self.adapter_pools[name], {}
        for kind in self._info[name].kinds:
            a, b = pools[kind.key].factors()  # all layers of the kind in one gather
            factors.update({n: (a[i], b[i]) for i, n in enumerate(kind.layers)})
        return factors

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
        device = next(self.base_model.parameters()).device
        groups = {name: Rows([i for i, n in enumerate(names) if n == name], len(names), device)
                  for name in dict.fromkeys(n for n in names if n is not None)}
        routes = self._stacks(list(groups))
        kernel = self.decode_kernel and device.type == "cpu" and decode_kernel_available()
        try:
            for module_name, layer in self._layers.items():
                if module_name not in routes:
                    layer.route = None
                    continue
                stack, here = routes[module_name]
                updates = tuple(Update(self._info[name].config.rank, self._info[name].config.scaling, groups[name])
                                for name, _, _ in here)
                layer.route = Route(stack, [(g, k) for _, g, k in here], updates, kernel=kernel)
            yield
        finally:
            for layer in self._layers.values():
                layer.route = None

    def _stacks(self, names: list[str]) -> dict[str, tuple[StackedPools, list[tuple[str, int, int]]]]:
        """Per wrapped module that some adapter in ``names`` targets: its kind's ``StackedPools``
        over those adapters, and its adapters as ``(name, position in the stack, position of
        the module among that adapter's layers of the kind)``."""
        parts: dict[str, list[ShardPools]] = {}
        members: dict[str, tuple[str, list[tuple[str, int, int]]]] = {}
        for name in names:
            for kind in self._info[name].kinds:
                stack = parts.setdefault(kind.key, [])
                for k, module_name in enumerate(kind.layers):
                    members.setdefault(module_name, (kind.key, []))[1].append((name, len(stack), k))
                stack.append(self.adapter_pools[name][kind.key])
        stacks = {key: StackedPools(p) for key, p in parts.items()}
        return {module: (stacks[key], here) for module, (key, here) in members.items()}

    def _row_names(self, adapter_names: Sequence[str | None] | None, rows: int) -> list[str | None]:
        """Check ``adapter_names`` against the batch; base rows become ``None``."""
        if adapter_names is None:
            return [None] * rows
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list with one name per row, not the string {adapter_names!r}")
        names = [None if n == BASE else n for n in adapter_names]
        if len(names) != rows:
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {rows} rows")
        if self.root is not None:
            self._make_resident([n for n in dict.fromkeys(names) if n is not None])
        elif unknown := sorted({n for n in names if n is not None and n not in self._info}, key=str):
            raise UnknownAdapterError(
                f"unknown adapter(s) {unknown} in adapter_names; loaded: {self.adapters()} "
                f"(None or {BASE!r} selects the base model)"
            )
        return names

    def _add_to_base(self, name: str, sign: float) -> None:
        """``W += sign · (alpha/r) B A`` in every layer of adapter ``name``, through the layer's
        own merge (``layer.add_to_weight``): a 4-bit base is requantized, and the largest
        storage error this costs is kept in ``merge_error``."""
        scaling = self._info[name].config.scaling
        errors = [add_to_weight(self._layers[module_name].base_layer, sign * dense_update(a, b, scaling))
                  for module_name, (a, b) in self._factors(name).items()]
        self.merge_error = max(errors, default=0.0)

    def _wrap(self, module_name: str) -> None:
        layer = MultiAdapterLinear(self.base_model.get_submodule(module_name))
        swap_module(self.base_model, module_name, layer)
        self._layers[module_name] = layer

    def _unwrap(self, module_name: str) -> None:
        swap_module(self.base_model, module_name, self._layers.pop(module_name).base_layer)


def _tensors(module: nn.Module) -> list[Tensor]:
    """Parameters and buffers of ``module``, each object once."""
    return [*module.parameters(), *module.buffers()]
