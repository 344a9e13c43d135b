"""The benchmarks of moslora, and what they share: the run cache, the environment stamp, JSON out
and the random Llama they measure on.

    python -m benchmarks.quality [--quick]   quality at matched budgets, ablations (make bench)
    python -m benchmarks.speed [--quick]     training step time and memory (make bench-speed)
    python -m benchmarks.serving [--quick]   many adapters on one base (make bench-serving)
    python -m benchmarks.loadtest            the HTTP server under load (make load-test)
    python -m benchmarks.serving_vllm        moslora serve vs vLLM serve (make bench-vllm)
    python benchmarks/many_adapters.py       1,000 adapters from disk (make bench-adapters)
    python benchmarks/interop/run.py         the exports in vLLM and llama.cpp (make interop)
    python -m benchmarks.report              plots and the README's Results section
    python -m benchmarks.capacity_pilot      the pilot that chose the capacity track's regime
    python -m benchmarks.capacity_model      bits per parameter on a frozen random Llama (make bench-capacity-model)

Each writes JSON and PNG under results/. They run from a checkout (the package is not
installed with moslora) and import the library as any user would.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moslora.atomic import atomic_file


class RunStore:
    """Finished runs, one JSON record per line, keyed by ``record["key"]``.

    Appending a line is the commit: a run killed mid-way leaves at most a torn last line,
    which is ignored on reading (and that run is simply done again).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "key" in record:
                    self.records[record["key"]] = record

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def add(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, default=float) + "\n"
        with self.path.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records[record["key"]] = json.loads(line)  # as a later reader sees it (tuples as lists)


def environment() -> dict[str, Any]:
    """Date, machine and library versions, stored with every result file."""
    versions = {}
    for name in ("moslora", "torch", "transformers", "peft"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "versions": versions}


def read_json(path: Path) -> dict[str, Any] | None:
    """A result file's content, or None if there is none yet."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2, default=float) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader sees the old file or the new one)."""
    with atomic_file(path) as staging:  # it creates the parent folder
        staging.write_text(text)


def random_llama(hidden: int, layers: int, vocab: int = 8192, seed: int = 0) -> LlamaForCausalLM:
    """A random Llama from a config: MLP width 11/4 of hidden (as Llama's 2816 for 1024), heads of 64."""
    torch.manual_seed(seed)
    heads = max(1, hidden // 64)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab))
