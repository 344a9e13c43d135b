"""Logits and greedy continuations from llama.cpp, with and without a GGUF LoRA adapter.

    .venv-interop/bin/python benchmarks/interop/llamacpp_check.py REQUEST.json OUT_DIR

Run by the interop venv (llama-cpp-python). REQUEST.json (written by ``run.py``):
``gguf_base`` (the GGUF base model), ``gguf_adapter`` (an ``moslora export-gguf`` file),
``prompts`` (token ids) and ``max_tokens``. Writes to OUT_DIR, per side (``base``,
``adapter``), ``logits-SIDE-I.npy`` (the logits at every position of prompt I) and
``llamacpp.json`` (the greedy continuations as token ids, the version and the times).
Nothing is compared here: that is ``run.py``'s job, in the main venv.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama


def run_prompt(llm: Llama, prompt: list[int], max_tokens: int) -> tuple[np.ndarray, list[int]]:
    """The logits at every prompt position and the greedy continuation (argmax, EOS not
    stopping, as on the other sides)."""
    llm.reset()
    llm.eval(prompt)
    logits = np.array(llm.scores[:len(prompt)])
    tokens: list[int] = []
    for _ in range(max_tokens):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(tokens[-1:])
    return logits, tokens


def run_side(request: dict, adapter: str | None, side: str, out_dir: Path) -> list[list[int]]:
    """Load the base (with ``adapter`` if given), run every prompt, save its logits."""
    # logits_all: keep every position's logits, not only the last; one sequence, no batching
    llm = Llama(model_path=request["gguf_base"], lora_path=adapter, logits_all=True,
                n_ctx=1024, n_threads=2, seed=0, verbose=False)
    continuations = []
    for i, prompt in enumerate(request["prompts"]):
        logits, tokens = run_prompt(llm, prompt, request["max_tokens"])
        np.save(out_dir / f"logits-{side}-{i}.npy", logits)
        continuations.append(tokens)
    llm.close()
    return continuations


def main(request_path: str, out_dir: str) -> None:
    request = json.loads(Path(request_path).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = {"version": llama_cpp.__version__,
              "base": run_side(request, None, "base", out),
              "adapter": run_side(request, request["gguf_adapter"], "adapter", out)}
    result["seconds"] = {"total": time.perf_counter() - start}
    (out / "llamacpp.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
