"""benchmarks.servers through its users: the load test's server, started, driven and stopped."""

from __future__ import annotations

import json
import sys
import time

import psutil
import pytest

from benchmarks import loadtest
from benchmarks.servers import started


def test_load_test_end_to_end(tmp_path):
    out = tmp_path / "load.json"
    loadtest.main(["--requests", "24", "--clients", "4", "--adapters", "2", "--max-tokens", "2",
                   "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["sent"] == result["ok"] == 24 and result["errors"] == 0
    assert result["latency_p50_s"] > 0


def test_started_reports_an_early_exit_and_a_server_never_healthy_and_stops_it(tmp_path):
    with pytest.raises(RuntimeError, match="exited with code 2"):
        with started("bad", [sys.executable, "-c", "import sys; sys.exit(2)"], {}, "__base__", tmp_path / "bad.log",
                     timeout=30):
            pass
    marker = f"never-healthy-{tmp_path.name}"
    command = [sys.executable, "-c", f"import time; time.sleep(60)  # {marker}"]  # alive, never serving
    with pytest.raises(TimeoutError, match="not healthy within 2"):
        with started("silent", command, {}, "__base__", tmp_path / "silent.log", timeout=2):
            pass
    time.sleep(0.5)
    assert not [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
