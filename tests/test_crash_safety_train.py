"""SIGKILL training runs, many times, and resume: the result equals an uninterrupted run.

A helper process (the "zygote") imports torch and transformers once; for every run it forks a
child that trains a tiny random Llama on a tiny JSONL task (8 steps, a checkpoint every 2, at
most 2 kept, so saves and rotations happen throughout). Each run is killed with SIGKILL in one
of two ways, taken in turn:

- at a random time within the length of a whole run;
- just before the n-th call (n random) of a file-system primitive the checkpoint code uses:
  ``torch.save`` (optimizer, scheduler, RNG states: always mid-checkpoint), ``os.fsync``,
  ``os.rename`` (the step that publishes a checkpoint), ``os.unlink`` (rotation, clean-up).

After every kill, every ``checkpoint-N`` on disk must be complete and loadable; the next run
resumes from the last one. A chain of kills ends with a run to completion, whose adapter must
equal the uninterrupted run's within 1e-6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from moslora import MoSConfig, get_mos_model
from moslora.assets import default_model_path
from moslora.checkpoint import load_adapter_weights
from moslora.train import last_checkpoint

from conftest import replayable_rng

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') skips this file


KILLS = int(os.environ.get("MOSLORA_TRAIN_KILLS", "12"))
KILLS_PER_CHAIN = 4
TESTS = Path(__file__).resolve().parent
POINTS = ["time", "torch.save", "os.fsync", "os.rename", "os.unlink"]
CHECKPOINT_FILES = {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json"}

ZYGOTE = r"""
import gc, itertools, json, os, signal, sys, threading, time, traceback
import torch
torch.set_num_threads(1)  # no thread pools alive across fork()
import matplotlib.pyplot  # imported by every run's loss plot: pay for it once
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from moslora import MoSConfig
from moslora.assets import default_model_path
from moslora.train import TrainConfig, train


tokenizer = AutoTokenizer.from_pretrained(default_model_path())
TARGETS = {"torch.save": (torch, "save"), "os.fsync": (os, "fsync"), "os.rename": (os, "rename"),
           "os.unlink": (os, "unlink")}


def run(out, resume):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        vocab_size=len(tokenizer)))
    cfg = TrainConfig(task=sys.argv[1], output_dir=out, max_steps=8, batch_size=2, eval_steps=2,
                      eval_examples=2, test_examples=2, max_length=32, learning_rate=1e-2,
                      warmup_ratio=0.0, progress=False, resume=resume,
                      mos=MoSConfig(target_modules=["q_proj", "v_proj"], rank=3, budget_rank=2,
                                    private_rank=1))
    train(cfg, base=base, tokenizer=tokenizer)


def instrument(point, n, counts):
    module, name = TARGETS[point]
    original, calls = getattr(module, name), itertools.count(1)

    def wrapper(*args, **kwargs):
        counts[point] += 1
        if next(calls) == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def child(job):
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the Trainer's log lines are not our protocol
    counts = dict.fromkeys(TARGETS, 0)
    for point in TARGETS:  # count every primitive; kill at the n-th call of the chosen one
        instrument(point, job["n"] if point == job["point"] else 0, counts)
    if job["point"] == "time":
        threading.Timer(job["delay"], os.kill, (os.getpid(), signal.SIGKILL)).start()
    run(job["out"], job["resume"])
    with open(job["out"] + "/calls.json", "w") as f:
        json.dump(counts, f)


gc.freeze()  # the imports' objects: a child's gc (the Trainer collects) skips them, no copy-on-write
for line in sys.stdin:
    job = json.loads(line)
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            child(job)
            code = 0
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    outcome = "killed" if killed else ("ok" if os.waitstatus_to_exitcode(status) == 0 else "error")
    print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - started}), flush=True)
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("task") / "parity.jsonl"
    rows = [{"prompt": f"Is {n} even?", "completion": "yes" if n % 2 == 0 else "no"} for n in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def zygote(task):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(task)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def mos_model():
    """The zygote's model with a fresh adapter, to load checkpoints into in this process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=len(AutoTokenizer.from_pretrained(default_model_path()))))
    return get_mos_model(base, MoSConfig(target_modules=["q_proj", "v_proj"], rank=3, budget_rank=2,
                                         private_rank=1))


def _run(zygote, out: Path, point: str = "none", n: int = 0, delay: float = 0.0) -> dict:
    resume = last_checkpoint(out / "checkpoints") is not None
    job = {"out": str(out), "resume": resume, "point": point, "n": n, "delay": delay}
    zygote.stdin.write(json.dumps(job) + "\n")
    zygote.stdin.flush()
    result = json.loads(zygote.stdout.readline())
    assert result["outcome"] != "error", f"run {job} raised (traceback on stderr)"
    return result


def _check_checkpoints(checkpoints: Path, model) -> list[int]:
    """Every ``checkpoint-N`` is complete and loads; return the steps present."""
    steps = []
    for ckpt in sorted(checkpoints.glob("checkpoint-*")):
        assert {p.name for p in ckpt.iterdir()} == CHECKPOINT_FILES, f"{ckpt} is incomplete"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert ckpt.name == f"checkpoint-{state['global_step']}"
        for name in ("optimizer.pt", "scheduler.pt"):
            torch.load(ckpt / name, weights_only=True)
        load_adapter_weights(model, ckpt)  # checksum, shapes, indices, finiteness
        steps.append(state["global_step"])
    return steps


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_killed_training_resumes_to_the_uninterrupted_result(zygote, mos_model, tmp_path):
    reference = _run(zygote, tmp_path / "reference")
    assert reference["outcome"] == "ok"
    calls = json.loads((tmp_path / "reference" / "calls.json").read_text())
    expected = _adapter(tmp_path / "reference")
    assert any("pool_B" in k and v.abs().sum() > 0 for k, v in expected.items())  # training moved B

    rng = replayable_rng("killed-training")
    kills, mid_checkpoint, chains, resumed_from = 0, 0, 0, set()
    while kills < KILLS:
        out = tmp_path / f"chain{chains}"
        chains += 1
        for attempt in range(KILLS_PER_CHAIN):
            point = POINTS[kills % len(POINTS)]
            last = last_checkpoint(out / "checkpoints")
            result = _run(zygote, out, point, n=rng.randint(1, max(1, calls.get(point, 1))),
                          delay=rng.uniform(0, reference["seconds"]))
            if result["outcome"] == "ok":
                break  # the kill point lay beyond the end of this (resumed) run
            kills += 1
            resumed_from.add(Path(last).name if last else "scratch")
            mid_checkpoint += bool(list((out / "checkpoints").glob(".checkpoint-*")))
            steps = _check_checkpoints(out / "checkpoints", mos_model)
            last = last_checkpoint(out / "checkpoints")
            assert (last is None) == (not steps) and (not steps or last.endswith(f"-{max(steps)}"))
        else:
            assert _run(zygote, out)["outcome"] == "ok"
        got = _adapter(out)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key].float(), expected[key].float(), atol=1e-6, rtol=0, msg=key)
    print(f"\ntraining: {kills} kills in {chains} chains ({mid_checkpoint} left a checkpoint staging "
          f"directory), resumed from {sorted(resumed_from)}; every chain's final adapter matched "
          "the uninterrupted run")
    assert mid_checkpoint, "no kill landed inside a checkpoint write: the test proved nothing"
