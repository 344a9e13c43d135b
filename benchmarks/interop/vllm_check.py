"""Greedy continuations from vLLM, with and without a PEFT LoRA adapter (run by the interop venv).

    .venv-interop/bin/python benchmarks/interop/vllm_check.py REQUEST.json OUT.json

REQUEST.json (written by ``run.py``): ``base_dir`` (a Hugging Face folder), ``peft_dir`` (an
``moslora export-peft`` adapter), ``rank``, ``prompts`` (token ids) and ``max_tokens``. The
prompts go in as token ids, so both sides see the same tokens whatever their tokenizers do;
decoding ignores EOS, so every continuation has ``max_tokens`` tokens to compare. OUT.json
holds the token ids of both continuations, vLLM's version and the times. Nothing is compared
here: that is ``run.py``'s job, in the main venv.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import get_args

# vLLM reserves its CPU KV cache up front (GiB); its default is sized for a server, not 8 prompts
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import vllm  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.config.lora import MaxLoRARanks  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402


def max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts (a closed list: 8, 16, 32, ...) that fits ``rank``."""
    return min(r for r in get_args(MaxLoRARanks) if r >= rank)


def continuations(llm: LLM, prompts: list[list[int]], max_tokens: int,
                  lora: LoRARequest | None) -> list[list[int]]:
    """The greedy continuation of every prompt (``max_tokens`` tokens, EOS not stopping)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params,
                           lora_request=lora, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def main(request_path: str, out_path: str) -> None:
    request = json.loads(open(request_path).read())
    start = time.perf_counter()
    # fp32 like the reference; eager mode: compiling graphs costs minutes and changes nothing here
    llm = LLM(model=request["base_dir"], enable_lora=True, max_lora_rank=max_lora_rank(request["rank"]),
              max_loras=1, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0)
    loaded = time.perf_counter()
    adapter = LoRARequest("mos", 1, request["peft_dir"])
    result = {
        "version": vllm.__version__,
        "base": continuations(llm, request["prompts"], request["max_tokens"], None),
        "adapter": continuations(llm, request["prompts"], request["max_tokens"], adapter),
    }
    result["seconds"] = {"load": loaded - start, "generate": time.perf_counter() - loaded}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # the guard vLLM needs: it starts worker processes
    main(*sys.argv[1:])
