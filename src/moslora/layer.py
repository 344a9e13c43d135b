"""MoSLinear: a frozen linear layer plus its MoS update ``(alpha/r) · B A``.

Wraps ``nn.Linear``, transformers' ``Conv1D`` (GPT-2; weight stored ``(d_in, d_out)``) and
bitsandbytes' ``Linear4bit`` (NF4/FP4; merge = dequantize, add, requantize).
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .pools import ShardPools

SUPPORTED_LAYERS: tuple[type, ...] = (nn.Linear, Conv1D)


def is_supported(module: nn.Module) -> bool:
    """Whether MoS can wrap this module (Linear4bit subclasses nn.Linear)."""
    return isinstance(module, SUPPORTED_LAYERS)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a supported layer."""
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise TypeError(
        f"MoS adapts nn.Linear, transformers Conv1D and bitsandbytes Linear4bit; "
        f"got {type(module).__name__}"
    )


def _is_4bit(module: nn.Module) -> bool:
    # a 4-bit layer can only exist if bitsandbytes was imported, so never import it here
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def dense_weight(module: nn.Module) -> Tensor:
    """The layer's weight as a dense ``(d_out, d_in)`` tensor (dequantized for 4-bit)."""
    if _is_4bit(module):
        w = module.weight
        return sys.modules["bitsandbytes"].functional.dequantize_4bit(w.data, w.quant_state)
    w = module.weight.data
    return w.T if isinstance(module, Conv1D) else w


def set_dense_weight(module: nn.Module, weight: Tensor) -> float:
    """Write a dense ``(d_out, d_in)`` weight back; returns the max abs storage error."""
    if _is_4bit(module):
        old = module.weight
        new = sys.modules["bitsandbytes"].nn.Params4bit(
            weight.to("cpu", old.quant_state.dtype),
            requires_grad=False,
            quant_type=old.quant_type,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_storage=old.quant_storage,
        ).to(old.device)
        module.weight = new
        return (dense_weight(module).float() - weight.float()).abs().max().item()
    target = module.weight.data
    target.copy_(weight.T if isinstance(module, Conv1D) else weight)
    return (dense_weight(module).float() - weight.float()).abs().max().item()


def keep_4bit_layout_stable(module: nn.Module) -> None:
    """Stop bitsandbytes from repacking a CPU 4-bit weight for bf16 inference.

    On CPUs with AVX512-BF16, the first eval forward repacks the weight into a private layout
    and computes in bf16 from then on: eval and training numerics differ, a later training
    forward fails, and the weight no longer dequantizes. A layer that was already repacked is
    unpacked (bitsandbytes' own inverse; it rounds the block scales once).
    """
    if not _is_4bit(module) or not hasattr(module, "support_avx512bf16_for_cpu"):
        return
    module.support_avx512bf16_for_cpu = False
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        unpack = sys.modules["bitsandbytes"].functional._convert_weight_packed_for_cpu_inverse
        module.weight.data, module.weight.quant_state = unpack(module.weight.data, state)


def low_rank_update(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    scaling: float | Tensor,
    dropout: nn.Module | None = None,
    *,
    out: Tensor | None = None,
    rows: Tensor | slice | None = None,
) -> Tensor:
    """The adapter's share of the output, ``scaling · B (A dropout(x))``.

    ``x: (batch, ..., d_in)``, ``a: (r, d_in)``, ``b: (d_out, r)`` -> ``(batch, ..., d_out)`` in
    the factors' dtype (the caller casts it to the base output's). Never forms the dense ``B A``.

    Serving many adapters (``serving.multi``) adds each adapter into the base output in place:
    ``out: (batch, ..., d_out)`` (in the factors' dtype) gets ``out[rows] += update(x[rows])``
    and is returned. ``rows`` are the batch rows this adapter serves: ``None`` every row, a
    slice for contiguous rows (views: nothing is copied) or a ``(k,)`` int64 index (those rows
    are gathered, and their updates added back in one scatter). ``G`` adapters at once:
    ``a: (G, r, d_in)``, ``b: (G, d_out, r)``, ``rows: (G·m,)`` (``m`` rows each) and a
    per-row ``scaling: (G·m, 1, ...)`` (0 for padding rows).
    """
    target = out
    if isinstance(rows, slice):
        x, target, rows = x[rows], None if out is None else out[rows], None
    if rows is not None:
        x = x.index_select(0, rows)
    h = (x if dropout is None else dropout(x)).to(a.dtype)
    if a.dim() == 3:  # G adapters: group g's rows are rows g·m .. g·m + m - 1
        h = h.reshape(a.shape[0], -1, h.shape[-1])
    h = h @ a.mT
    if isinstance(scaling, Tensor):  # per row, applied on the small rank-r side
        h, scaling = (h.view(*x.shape[:-1], -1) * scaling).view(h.shape), 1.0
    update = (h @ b.mT).reshape(*x.shape[:-1], b.shape[-2])
    if target is None:
        return update * scaling
    if rows is None:
        target.add_(update, alpha=scaling)
    else:
        target.index_add_(0, rows, update, alpha=scaling)
    return out


def dense_update(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """The dense update ``scaling · B A``: ``(d_out, d_in)`` from ``a: (r, d_in)``, ``b: (d_out, r)``."""
    return (b @ a) * scaling


@torch.no_grad()
def add_to_weight(module: nn.Module, delta: Tensor) -> float:
    """``W += delta`` for a supported layer (``delta: (d_out, d_in)``), summed in float32.

    Returns the max abs storage error (non-zero for a 4-bit weight, which is requantized).
    """
    weight = dense_weight(module)
    updated = weight.float() + delta.float().to(weight.device)
    return set_dense_weight(module, updated.to(weight.dtype))


def check_pools_fit(pools: ShardPools, d_in: int, d_out: int) -> None:
    """Raise ``ValueError`` unless ``pools`` were sized for a ``d_in -> d_out`` layer."""
    if (pools.plan.d_in, pools.plan.d_out) != (d_in, d_out):
        raise ValueError(f"pools are for {pools.plan.d_in}->{pools.plan.d_out}, layer is {d_in}->{d_out}")


def _dense_copy(module: nn.Module) -> nn.Linear:
    """A dense ``nn.Linear`` with a quantized layer's dequantized weight and its bias."""
    weight = dense_weight(module)
    dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                      device=weight.device, dtype=weight.dtype)
    dense.weight.data.copy_(weight)
    if module.bias is not None:
        dense.bias.data.copy_(module.bias.data)
    return dense.requires_grad_(False)


class MoSLinear(nn.Module):
    """``y = base(x) + (alpha/r) · B (A dropout(x))`` with ``A, B`` assembled from shard pools.

    The pools are shared by every layer of a kind and registered once, on the ``MoSModel``;
    this layer only keeps a reference and its ``layer_idx`` within the kind.

    Args:
        base_layer: the frozen layer being adapted.
        pools: the ``ShardPools`` of this layer's kind.
        layer_idx: position of this layer within its kind.
        scaling: ``alpha / r``.
        dropout: dropout probability on the adapter's input.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        pools: ShardPools,
        layer_idx: int,
        scaling: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.d_in, self.d_out = linear_shape(base_layer)
        keep_4bit_layout_stable(base_layer)
        check_pools_fit(pools, self.d_in, self.d_out)
        self._pools = (pools,)  # a tuple, so nn.Module does not register it a second time
        self.layer_idx = layer_idx
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.merge_error = 0.0
        self._quantized_base: tuple[nn.Module] | None = None  # the 4-bit layer, merged densely

    @property
    def pools(self) -> ShardPools:
        return self._pools[0]

    def factors(self) -> tuple[Tensor, Tensor]:
        """This layer's ``A: (r, d_in)`` and ``B: (d_out, r)``."""
        return self.pools.factors(self.layer_idx)

    def delta_weight(self) -> Tensor:
        """The dense update ``(alpha/r) · B A``: ``(d_out, d_in)``."""
        return dense_update(*self.factors(), self.scaling)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """``x: (..., d_in) -> (..., d_out)``."""
        y = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return y
        return y + low_rank_update(x, *self.factors(), self.scaling, self.dropout).to(y.dtype)

    @torch.no_grad()
    def merge(self, requantize: bool = False) -> None:
        """Fold the update into the base weight: ``W += (alpha/r) B A``.

        A 4-bit base cannot hold the small update exactly: by default it is dequantized into a
        dense ``nn.Linear`` (exact, at the dense layer's memory), and ``unmerge()`` puts the
        original 4-bit layer back. With ``requantize=True`` the sum is quantized again; the
        max abs error this costs is kept in ``merge_error``.
        """
        if self.merged:
            warnings.warn("MoSLinear.merge(): already merged; nothing done", stacklevel=2)
            return
        if _is_4bit(self.base_layer) and not requantize:
            self._quantized_base = (self.base_layer,)  # a tuple: kept out of the state dict
            self.base_layer = _dense_copy(self.base_layer)
        self._add_delta(sign=1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()``: ``W -= (alpha/r) B A`` (exact up to float rounding, or the original
        4-bit layer restored; after a requantized merge, lossy)."""
        if not self.merged:
            warnings.warn("MoSLinear.unmerge(): not merged; nothing done", stacklevel=2)
            return
        if self._quantized_base is not None:
            self.base_layer, self._quantized_base = self._quantized_base[0], None
            self.merge_error = 0.0
        else:
            self._add_delta(sign=-1.0)
        self.merged = False

    def _add_delta(self, sign: float) -> None:
        self.merge_error = add_to_weight(self.base_layer, sign * self.delta_weight())

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, scaling={self.scaling:g}, merged={self.merged}"
