"""Training under `accelerate launch` with 2 CPU processes (DDP, gloo) matches one process."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
import pytest

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') skips this file


SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def write_task(path: Path) -> None:
    # every completion is one word of the same token length, so per-rank token means
    # average to the global one
    rows = [{"prompt": f"Is {n} even?", "completion": "yes" if n % 2 == 0 else "no"} for n in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_process_ddp_matches_single_process(tmp_path):
    data = tmp_path / "task.jsonl"
    write_task(data)
    run([sys.executable, str(SCRIPT), str(data), str(tmp_path / "single"), "4"])
    # accelerate's multi-process launcher is torchrun; with no GPU the Trainer picks gloo on CPU
    # (accelerate's own --cpu multi-process mode needs mpirun)
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()),
         str(SCRIPT), str(data), str(tmp_path / "ddp"), "2"])
    single = load_file(tmp_path / "single" / "rank0.safetensors")
    rank0 = load_file(tmp_path / "ddp" / "rank0.safetensors")
    rank1 = load_file(tmp_path / "ddp" / "rank1.safetensors")
    assert single.keys() == rank0.keys() == rank1.keys()
    moved = False
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key].float(), single[key].float(), atol=1e-5, rtol=0, msg=key)
        moved |= "pool_B" in key and bool(single[key].abs().sum() > 0)
    assert moved
