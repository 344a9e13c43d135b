"""The one-token decode kernel: a small C++ op (``csrc/decode.cpp``) that adds each row's
low-rank update straight from a kind's stacked shard pools, never forming the layer's factors.

Why: at one token per row, the torch path gathers every layer's ``(G, r, d)`` factors from
the pools into a buffer (~470 MB per step for the ~24 adapters of a 32-row SmolLM2 batch),
then runs batched products over groups of a few rows, far from the CPU's peak. The op reads
only the pool rows each layer uses and writes only its output rows. The pools are shared by
every layer of a kind, so they can stay in a large enough last-level cache across layers; a
layer still reads as many bytes as its dense factors, so when they do not fit (SmolLM2, ~23
adapters, ~56 MB, with the base's weights streaming through the cache) the op is bound by memory.

The op is compiled on first use with ``torch.utils.cpp_extension`` (set-up builds it:
``moslora.serving.kernel.main()``), for this CPU (``-march=native``, so the build is
named after the CPU's flags). Without a C++ compiler or ninja, or when the build fails, ``available()``
is ``False`` and serving uses the torch path: both give the same result (tests check it).
``MOSLORA_DECODE_KERNEL=0`` turns the op off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("moslora.serving")

SOURCE = Path(__file__).with_name("csrc") / "decode.cpp"


def _cpu_tag() -> str:
    """A short name for what ``-march=native`` compiles for: the CPU's feature flags and torch."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    key = f"{platform.machine()} {flags} {torch.__version__}"
    return hashlib.blake2b(key.encode(), digest_size=6).hexdigest()


def can_build() -> bool:
    """Whether this machine has what ``torch.utils.cpp_extension`` builds with: a C++ compiler and ninja."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None and shutil.which("ninja") is not None


@cache
def available() -> bool:
    """Whether the op is built and loaded (building it on the first call, ~15 s)."""
    if os.environ.get("MOSLORA_DECODE_KERNEL", "1") == "0":
        return False
    if not can_build():
        log.warning("decode kernel: no C++ compiler or no ninja, so decoding uses the torch path")
        return False
    from torch.utils.cpp_extension import load

    try:
        load(name=f"moslora_decode_{_cpu_tag()}", sources=[str(SOURCE)], is_python_module=False,
             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except (OSError, RuntimeError, ImportError) as e:  # a failed build: serve anyway, on the torch path
        log.warning("decode kernel: build failed (%s), so decoding uses the torch path", e)
        return False
    return True


def decode_update(x: Tensor, out: Tensor, pool_a: Tensor, pool_b: Tensor, table_a: Tensor, table_b: Tensor,
                  groups: Tensor, scale: Tensor) -> None:
    """Add every row's update into ``out`` in place, one token per row.

    ``x: (B, ..., d_in)`` (any float dtype), ``out: (B, ..., d_out)`` float32 and contiguous,
    on the CPU (one token per row: the leading dimensions are rows); ``pool_a: (N, d_in / l)``,
    ``pool_b: (N, d_out / l)``; ``table_a, table_b: (G, r, l)`` int64, the pool rows of each
    adapter's rank vectors (``StackedPools.indices``); ``groups: (B,)`` int64, each row's
    adapter in ``[0, G)`` or -1 for none; ``scale: (G, r)`` float32, each adapter's scaling
    times its layer scale. Row ``i`` of adapter ``g`` gets ``B_g diag(scale_g) A_g x_i``.
    """
    if not available():
        raise RuntimeError("the decode kernel is not built here (see the log): use the torch path")
    torch.ops.moslora.decode_update(x, out, pool_a, pool_b, table_a, table_b, groups, scale)


def main() -> None:
    """Build the op now (set-up calls this), and say whether serving will use it."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if available():
        print(f"decode kernel: built for this CPU ({_cpu_tag()})")
    else:
        print("decode kernel: unavailable, serving decodes on the torch path (same results, slower)")
