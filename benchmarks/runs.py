"""What every benchmark shares: the cache of finished runs, the environment stamp, JSON out."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_file


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
        self.records[record["key"]] = record


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
