"""SIGKILL a process mid-write, many times: the target is always adapter A or B, complete.

A helper process (the "zygote") imports torch once and loads the two reference adapters;
for every kill it forks a fresh writer that re-saves A and B over the target in a tight
loop, and the test SIGKILLs that writer after a random 5-150 ms. Forking keeps each kill
cheap (no torch import per writer) while every kill still hits a real process mid-write.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapter, replayable_rng, tiny_llama
from safetensors.torch import load_file

from moslora import MoSConfig, MoSModel, export_peft_lora, get_mos_model
from moslora.atomic import atomic_file
from moslora.checkpoint import CONFIG_NAME, WEIGHTS_NAME

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') skips this file


KILLS = int(os.environ.get("MOSLORA_KILLS", "60"))
CFG = MoSConfig(target_modules=["q_proj", "v_proj"], rank=4, budget_rank=2, private_rank=1, shards_per_vector=2)
TESTS = Path(__file__).resolve().parent

ZYGOTE = r"""
import os, sys, copy, itertools, torch
torch.set_num_threads(1)  # no thread pools alive across fork()
sys.path.insert(0, sys.argv[1])
from conftest import tiny_llama
from moslora import MoSModel, export_peft_lora

models = [MoSModel.from_pretrained(tiny_llama(), p) for p in sys.argv[2:4]]
for line in sys.stdin:
    mode, first, target = line.split()
    pid = os.fork()
    if pid == 0:  # the writer: save A, B, A, B ... until killed
        order = models if first == "A" else models[::-1]
        for m in itertools.cycle(order):
            m.save_pretrained(target) if mode == "save" else export_peft_lora(m, target, overwrite=True)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Adapters A and B (same config, different weights) saved and exported."""
    root = tmp_path_factory.mktemp("refs")
    for name, seed in (("A", 1), ("B", 2)):
        model = get_mos_model(tiny_llama(), CFG)
        randomize_adapter(model, seed=seed)
        model.save_pretrained(root / f"mos_{name}")
        export_peft_lora(model, root / f"peft_{name}")
    return root


@pytest.fixture(scope="module")
def zygote(references):
    proc = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE, str(TESTS), str(references / "mos_A"), str(references / "mos_B")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    yield proc
    proc.stdin.close()
    proc.wait(timeout=30)


def _kill_writer_midway(zygote, mode: str, first: str, target: Path, delay: float) -> None:
    zygote.stdin.write(f"{mode} {first} {target}\n")
    zygote.stdin.flush()
    pid = int(zygote.stdout.readline())
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    assert zygote.stdout.readline().strip() == "reaped"


def _mos_state(path: Path) -> dict[str, torch.Tensor]:
    return MoSModel.from_pretrained(tiny_llama(), path).mos_pools.state_dict()


def _peft_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((path / CONFIG_NAME).read_text()), load_file(path / WEIGHTS_NAME)


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("mode", ["save", "export"])
def test_sigkill_leaves_a_complete_old_or_new_directory(mode, references, zygote, tmp_path):
    read = _mos_state if mode == "save" else _peft_state
    prefix = "mos" if mode == "save" else "peft"
    expected = {name: read(references / f"{prefix}_{name}") for name in "AB"}
    target = tmp_path / "adapter"
    _copy_dir(references / f"{prefix}_A", target)  # an existing checkpoint to write over
    rng = replayable_rng(f"sigkill-{mode}")
    seen = {"A": 0, "B": 0}
    staging_left = 0
    for kill in range(KILLS):
        _kill_writer_midway(zygote, mode, rng.choice("AB"), target, rng.uniform(0.005, 0.150))
        state = read(target)  # any error here (missing file, bad checksum) fails the test
        match = [name for name, ref in expected.items() if _same(state, ref)]
        assert match, f"kill {kill}: {target} is neither adapter A nor B"
        seen[match[0]] += 1
        staging_left += _remove_staging(tmp_path)
    print(f"\n{mode}: {KILLS} kills survived; states seen {seen}; staging dirs left by kills: {staging_left}")
    # Both states must show up, or the writer never got to write and the test proved nothing.
    assert seen["A"] and seen["B"]


def _copy_dir(src: Path, dst: Path) -> None:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def _remove_staging(parent: Path) -> int:
    """Count and remove ``.adapter.tmp-*`` / ``.adapter.old-*`` left behind by a kill (the next
    save would remove the first kind itself: see the test below)."""
    leftovers = [p for p in parent.iterdir() if p.name.startswith(".adapter.")]
    for p in leftovers:
        shutil.rmtree(p)
    return len(leftovers)


def test_the_next_save_removes_staging_left_by_killed_writers_only(references, zygote, tmp_path):
    target = tmp_path / "adapter"
    _copy_dir(references / "mos_A", target)
    rng = random.Random(0)
    for _ in range(20):  # most kills leave one; stop at the first that does
        _kill_writer_midway(zygote, "save", "B", target, rng.uniform(0.005, 0.150))
        dead = [p for p in tmp_path.iterdir() if p.name.startswith(".adapter.tmp-")]
        if dead:
            break
    assert dead, "20 kills left no staging directory"
    host = socket.gethostname()
    kept = [tmp_path / f".adapter.tmp-{zygote.pid}@{host}-00ff",  # a live writer (the zygote)
            tmp_path / f".adapter.tmp-{os.getpid()}@{host}-0aff",  # this process: maybe another thread
            tmp_path / ".adapter.tmp-1@some-other-host-0bff",  # pid 1 elsewhere: can't tell
            tmp_path / ".adapter.tmp-q8x2k1"]  # unknown origin (no owner in the name)
    for path in kept:
        path.mkdir()
    MoSModel.from_pretrained(tiny_llama(), references / "mos_A").save_pretrained(target)
    assert not any(p.exists() for p in dead)
    assert all(p.is_dir() for p in kept)
    assert _same(_mos_state(target), _mos_state(references / "mos_A"))


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
