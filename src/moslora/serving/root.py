"""AdapterRoot: the MoS adapter directories under one root, addressed by their names.

A server may hold thousands of adapters on disk and only a few in memory: it lists them from
the root and loads one when a request first names it (``MultiAdapterModel``). Listing is a scan
of the root's entries (one ``stat`` each), reused for ``ttl`` seconds, so a directory added or
removed while the server runs is seen within ``ttl`` without a restart, and a burst of requests
does not rescan the disk per request.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""What an adapter name may be: also what a directory must be called to be served."""

SCAN_TTL = 1.0  # seconds a listing is reused


class AdapterRoot:
    """Every directory ``root/NAME`` holding an ``adapter_config.json`` is adapter ``NAME``.

    An adapter that failed to load (``mark_broken``) is left out of the listing until its
    config file changes, so one bad directory costs one failed load, not one per request.

    Args:
        path: the root directory.
        ttl: seconds a scan is reused (0: every listing scans).
    """

    def __init__(self, path: str | Path, ttl: float = SCAN_TTL) -> None:
        self.path = Path(path).resolve()
        if not self.path.is_dir():
            raise FileNotFoundError(f"adapter root {self.path} is not a directory")
        self.ttl = ttl
        self._names: frozenset[str] = frozenset()
        self._scanned = float("-inf")
        self._broken: dict[str, float] = {}  # name -> mtime of its config when it failed
        self._lock = threading.Lock()  # listings come from request threads and the model's

    def names(self) -> frozenset[str]:
        """The adapters on disk now (at most ``ttl`` seconds old)."""
        with self._lock:
            if time.monotonic() - self._scanned >= self.ttl:
                self._names = frozenset(self._scan())
                self._scanned = time.monotonic()
            return self._names

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def inside(self, relative: str | Path) -> Path:
        """``root/relative`` resolved (``..``, absolute paths and symlinks), with the adapter's
        files; raises ``CheckpointError`` if any of them lies outside the root."""
        path = (self.path / relative).resolve()
        files = [(path / name).resolve() for name in (CONFIG_NAME, WEIGHTS_NAME)]
        if not all(p.is_relative_to(self.path) for p in (path, *files)):
            raise CheckpointError(f"adapter path {str(relative)!r} is outside the adapter root")
        return path

    def mark_broken(self, name: str) -> None:
        """Leave ``name`` out of listings until its config file changes (it failed to load)."""
        with self._lock:
            self._broken[name] = _mtime(self.path / name / CONFIG_NAME)
            self._names = self._names - {name}

    def _scan(self) -> list[str]:
        names = []
        for entry in self.path.iterdir():
            if not NAME.fullmatch(entry.name) or not (entry / CONFIG_NAME).is_file():
                continue
            if entry.name in self._broken:
                if self._broken[entry.name] == _mtime(entry / CONFIG_NAME):
                    continue
                del self._broken[entry.name]  # changed since it failed: worth another try
            names.append(entry.name)
        return names


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("nan")
