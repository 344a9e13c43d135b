"""The Makefile's set-up: an optional asset never fails it, and check-setup names a dead pin."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args],
                          capture_output=True, text=True, timeout=120)


def test_an_unserved_optional_asset_is_one_line_of_warning(tmp_path):
    done = make("optional-assets", "BIGBENCH=bigbench==999.0.0", f"VENV={tmp_path}", f"PY={sys.executable}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        f"set-up: optional bigbench==999.0.0 could not be downloaded (see {tmp_path}/share/moslora/"
        "bigbench-download.log), so the wikidata task is unavailable; everything else is installed"]
    assert "bigbench==999.0.0" in (tmp_path / "share/moslora/bigbench-download.log").read_text()


def test_check_setup_fails_on_an_unserved_required_pin_and_warns_on_an_optional_one():
    dead = "moslora-no-such-package==9.9.9"
    done = make("check-setup", f"PYTHON={sys.executable}", f"REQUIRED_PINS={dead}", "OPTIONAL_PINS=")
    assert done.returncode != 0
    assert f"the registry does not serve {dead}, a required pin" in done.stdout
    done = make("check-setup", f"PYTHON={sys.executable}", "REQUIRED_PINS=", f"OPTIONAL_PINS={dead}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"warning: the registry does not serve {dead}, an optional pin" in done.stdout
    assert "0 required and 1 optional pins looked up" in done.stdout
