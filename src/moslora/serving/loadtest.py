"""Load test: start the server on 127.0.0.1, drive it with bounded concurrency, report latency.

    python -m moslora.serving.loadtest [--clients 64] [--requests 2000] [--time-limit 120]

Builds a small random Llama with a word-level tokenizer and ``--adapters`` MoS adapters in a
temporary directory, starts ``python -m moslora.cli serve`` on a free port as a child
process, and waits for ``/health``. Then ``--clients`` concurrent clients share
``--requests`` completions, each for a random adapter (or the base). It stops by itself at
the time limit and always stops the server it started. Reports p50/p99 latency, throughput
and errors; a request sent but never answered counts as lost. Writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..config import MoSConfig
from ..model import get_mos_model
from .multi import BASE

WORDS = 124  # w0 .. w123, after 4 special tokens: 128 ids


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w0 .. w123`` plus ``<pad> <s> </s> <unk>`` (128 ids)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_assets(root: Path, adapters: int) -> tuple[Path, Path]:
    """A small random Llama + tokenizer in ``root/base`` and MoS adapters in ``root/adapters``."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=4 + WORDS, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    word_tokenizer().save_pretrained(root / "base")
    for i in range(adapters):
        model = get_mos_model(copy.deepcopy(base), MoSConfig(target_modules="all-linear", rank=4, budget_rank=2, seed=i))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.mos_pools.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        model.save_pretrained(root / "adapters" / f"a{i}")
    return root / "base", root / "adapters"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def drive(url: str, names: list[str], args: argparse.Namespace) -> dict:
    """``args.clients`` clients take requests from one shared counter until ``args.requests``
    are sent or the time limit passes; every sent request is answered or counted as lost."""
    rng = random.Random(0)
    jobs = iter(range(args.requests))
    latencies: list[float] = []
    status: Counter[str] = Counter()
    deadline = time.monotonic() + args.time_limit
    async with httpx.AsyncClient(base_url=url, timeout=args.time_limit) as client:

        async def client_loop() -> None:
            for _ in jobs:
                if time.monotonic() > deadline:
                    return
                body = {"model": rng.choice(names), "max_tokens": args.max_tokens,
                        "prompt": " ".join(f"w{rng.randrange(WORDS)}" for _ in range(rng.randint(2, 12)))}
                start = time.monotonic()
                try:
                    r = await client.post("/v1/completions", json=body)
                    status[str(r.status_code)] += 1
                    if r.status_code == 200:
                        latencies.append(time.monotonic() - start)
                except httpx.HTTPError as err:
                    status[f"lost: {type(err).__name__}"] += 1

        start = time.monotonic()
        await asyncio.gather(*(client_loop() for _ in range(args.clients)))
        elapsed = time.monotonic() - start
        metrics = (await client.get("/metrics")).json()
    ok = status["200"]
    return {
        "sent": sum(status.values()), "ok": ok, "errors": sum(status.values()) - ok, "status": dict(status),
        "seconds": elapsed, "requests_per_s": ok / elapsed,
        "completion_tokens_per_s": metrics.get("completion_tokens", 0) / elapsed,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 2 else None,
        "server_metrics": {k: v for k, v in metrics.items() if k != "memory_bytes"},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--adapters", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--out", default="results/serving.load.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = build_assets(Path(tmp), args.adapters)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "moslora.cli", "serve", "--base", str(base),
                                   "--adapters", str(adapters), "--port", str(port)])
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, server, timeout=120)
            result = asyncio.run(drive(url, [BASE] + [f"a{i}" for i in range(args.adapters)], args))
        finally:
            server.terminate()
            server.wait(timeout=30)
    result["config"] = vars(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("server_metrics", "config")}, indent=2))


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
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


if __name__ == "__main__":
    main()
