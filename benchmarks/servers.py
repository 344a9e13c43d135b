"""A benchmark's server process: a free port, waiting for ``/health``, and a server started in
its own process group (so that it can be paused, measured and stopped with its children)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before it was healthy")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server at {url} was not healthy within {timeout} s")


@dataclass
class Server:
    """One running server: its URL, the model names it serves, its process group."""

    name: str
    process: subprocess.Popen
    url: str
    base_model: str  # the name that selects the bare base
    startup_seconds: float = 0.0
    paused: bool = field(default=False, init=False)

    def model(self, adapter: int | None) -> str:
        return self.base_model if adapter is None else f"a{adapter}"

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:  # it has exited already
            pass

    def pause(self) -> None:
        if not self.paused:
            self.signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.signal(signal.SIGCONT)
            self.paused = False
            time.sleep(0.5)  # let its threads get going again before a round is timed

    def idle_cpu(self, seconds: float = 3.0) -> float:
        """CPU cores the server's process tree keeps busy while it serves nothing."""
        self.resume()
        procs = self._tree()
        before = sum(sum(p.cpu_times()[:2]) for p in procs)
        time.sleep(seconds)
        used = sum(sum(p.cpu_times()[:2]) for p in procs) - before
        self.pause()
        return used / seconds

    def _tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def rss_bytes(self) -> int:
        """Resident bytes of the server's process tree (shared pages counted per process)."""
        return sum(p.memory_info().rss for p in self._tree())


@contextmanager
def started(name: str, command: list[str], env: dict[str, str], base_model: str, log: Path,
            timeout: float) -> Iterator[Server]:
    """Start ``command`` in a new process group, wait for ``/health``, stop it (group) after."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen([*command, "--port", str(port)], env={**os.environ, **env},
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(name, process, f"http://127.0.0.1:{port}", base_model)
    try:
        wait_healthy(server.url, process, timeout=timeout)
        server.startup_seconds = time.monotonic() - start
        yield server
    finally:
        server.resume()
        server.signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.signal(signal.SIGKILL)
            process.wait()
