"""Load test: start the server on 127.0.0.1, drive it with bounded concurrency, report latency.

    python -m benchmarks.loadtest [--clients 64] [--requests 2000] [--time-limit 120]
    python -m benchmarks.loadtest --mixed [--requests 5000] [--malformed 2500] [--clients 64]

Builds a small random Llama with a word-level tokenizer and ``--adapters`` MoS adapters in a
temporary directory, starts ``python -m moslora.cli serve`` on a free port as a child
process, and waits for ``/health``. Then ``--clients`` concurrent clients share
``--requests`` completions, each for a random adapter (or the base). It stops by itself at
the time limit and always stops the server it started. Reports p50/p99 latency, throughput
and errors; a request sent but never answered counts as lost. Writes ``--out`` (JSON).

``--mixed`` (``run_mixed``) is the robustness test instead: uvicorn runs in a thread of this
process, and ``--requests`` valid completions are shuffled with ``--malformed`` malformed
requests (bad JSON, wrong types, missing fields, unknown or traversal-looking adapter names and
paths, huge ``max_tokens``, oversized prompts and bodies, wrong methods). Every valid answer
is compared with the library's own greedy output for that adapter and prompt, every malformed
one must be a 4xx, and no body may hold a traceback. At the end the server must still be
healthy; the adapters are then unloaded over HTTP, and after a garbage collection the model's
resident adapter bytes must be back to the baseline and every adapter tensor freed.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import weakref
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from moslora.config import MoSConfig
from moslora.model import get_mos_model
from moslora.serving.multi import BASE, MultiAdapterModel

from .servers import free_port, started

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
                body = {"model": rng.choice(names), "max_tokens": args.max_tokens, "temperature": 0,
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
        metrics = (await client.get("/metrics.json")).json()
    ok = status["200"]
    return {
        "sent": sum(status.values()), "ok": ok, "errors": sum(status.values()) - ok, "status": dict(status),
        "seconds": elapsed, "requests_per_s": ok / elapsed,
        "completion_tokens_per_s": metrics.get("completion_tokens", 0) / elapsed,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 2 else None,
        "server_metrics": {k: v for k, v in metrics.items() if k != "memory_bytes"},
    }


# ---------------------------------------------------------------------------- mixed mode


def malformed_requests(limits: Any) -> dict[str, tuple[str, str, dict]]:
    """Requests the server must refuse with a 4xx, by name: (method, path, httpx arguments)."""
    too_long = "w1 " * (limits.max_prompt_chars // 3 + 1)
    completion = "/v1/completions"
    cases = {
        "bad JSON": ("POST", completion, {"content": b'{"model": "a0", "prompt": ',
                                          "headers": {"Content-Type": "application/json"}}),
        "not JSON at all": ("POST", completion, {"content": b"\x00\xff" * 8}),
        "prompt is a number": ("POST", completion, {"json": {"model": "a0", "prompt": 5}}),
        "model is a list": ("POST", completion, {"json": {"model": ["a0"], "prompt": "w1"}}),
        "max_tokens is text": ("POST", completion, {"json": {"model": "a0", "prompt": "w1", "max_tokens": "many"}}),
        "body is a list": ("POST", completion, {"json": [{"model": "a0", "prompt": "w1"}]}),
        "unknown adapter": ("POST", completion, {"json": {"model": "nope", "prompt": "w1"}}),
        "traversal as model": ("POST", completion, {"json": {"model": "../a0", "prompt": "w1"}}),
        "huge max_tokens": ("POST", completion, {"json": {"model": "a0", "prompt": "w1", "max_tokens": 10**12}}),
        "negative max_tokens": ("POST", completion, {"json": {"model": "a0", "prompt": "w1", "max_tokens": -1}}),
        "prompt over the token limit": ("POST", completion, {"json": {
            "model": "a0", "prompt": "w1 " * (limits.max_prompt_tokens + 1)}}),
        "prompt over the char limit": ("POST", completion, {"json": {"model": "a0", "prompt": too_long}}),
        "body over the byte limit": ("POST", completion, {"json": {"model": "a0", "prompt": "w1 " * limits.max_body_bytes}}),
        "missing model": ("POST", completion, {"json": {"prompt": "w1"}}),
        "missing prompt": ("POST", completion, {"json": {"model": "a0"}}),
        "empty body": ("POST", completion, {"json": {}}),
        "several prompts": ("POST", completion, {"json": {"model": "a0", "prompt": ["w1", "w2"]}}),
        "temperature over 2": ("POST", completion, {"json": {"model": "a0", "prompt": "w1", "temperature": 2.5}}),
        "unsupported field": ("POST", completion, {"json": {"model": "a0", "prompt": "w1", "logprobs": 3}}),
        "unknown field": ("POST", completion, {"json": {"model": "a0", "prompt": "w1", "nonsense": 1}}),
        "adapter path traversal": ("POST", "/v1/adapters", {"json": {"name": "x", "path": "../../etc"}}),
        "adapter absolute path": ("POST", "/v1/adapters", {"json": {"name": "x", "path": "/etc"}}),
        "adapter name traversal": ("POST", "/v1/adapters", {"json": {"name": "../x", "path": "a0"}}),
        "adapter already loaded": ("POST", "/v1/adapters", {"json": {"name": "a0", "path": "a0"}}),
        "unload a traversal name": ("DELETE", "/v1/adapters/..%2F..%2Fetc", {}),
        "wrong method": ("GET", completion, {}),
        "unknown endpoint": ("GET", "/v1/../../etc/passwd", {}),
    }
    return cases


def expected_texts(mm: MultiAdapterModel, tokenizer: Any, prompts: list[tuple[str, str]],
                   max_tokens: int) -> dict[tuple[str, str], str]:
    """The library's own greedy completion of each (adapter, prompt), one row at a time."""
    texts = {}
    for name, prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = mm.generate(ids, adapter_names=[name], max_new_tokens=max_tokens, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        row = out[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts[(name, prompt)] = tokenizer.decode(row, skip_special_tokens=True)
    return texts


@contextmanager
def threaded_server(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free 127.0.0.1 port in a thread; yield its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def run_mixed(workdir: Path, adapters: int = 4, valid: int = 240, malformed: int = 120, clients: int = 12,
              max_tokens: int = 4, seed: int = 0) -> dict[str, Any]:
    """Valid and malformed requests mixed against a real server; see the module docstring."""
    from moslora.serving.server import ApiKeys, Limits, create_app

    base_dir, adapter_root = build_assets(Path(workdir), adapters)
    tokenizer = word_tokenizer()
    mm = MultiAdapterModel(LlamaForCausalLM.from_pretrained(base_dir).eval())
    baseline = mm.memory_report()["total"]
    names = [f"a{i}" for i in range(adapters)]
    for name in names:
        mm.load_adapter(name, adapter_root / name)
    rng = random.Random(seed)
    prompts = [(name, " ".join(f"w{rng.randrange(WORDS)}" for _ in range(rng.randint(2, 12))))
               for name in [BASE, *names] for _ in range(6)]
    expected = expected_texts(mm, tokenizer, prompts, max_tokens)
    limits = Limits()
    bad = malformed_requests(limits)
    jobs = [("valid", rng.choice(prompts)) for _ in range(valid)]
    jobs += [("malformed", rng.choice(sorted(bad))) for _ in range(malformed)]
    rng.shuffle(jobs)
    tensors = [weakref.ref(t) for name in names for t in [*mm.adapter_pools[name].parameters(),
                                                           *mm.adapter_pools[name].buffers()]]
    app = create_app(mm, tokenizer, adapter_root, ApiKeys(), limits=limits)
    with threaded_server(app) as url:
        tally = asyncio.run(_drive_mixed(url, jobs, expected, bad, clients, max_tokens))
        with httpx.Client(base_url=url, timeout=30) as client:
            tally["alive_at_end"] = client.get("/health").status_code == 200
            tally["unloaded"] = sum(client.delete(f"/v1/adapters/{n}").status_code == 200 for n in names)
            tally["served_by_server"] = client.get("/metrics.json").json().get("requests", 0)
    del app
    gc.collect()
    report = mm.memory_report()
    tally.update(adapter_bytes_after_unload=report["adapters_total"],
                 total_bytes_baseline=baseline, total_bytes_after_unload=report["total"],
                 adapter_tensors_alive_after_gc=sum(ref() is not None for ref in tensors),
                 adapter_tensors_tracked=len(tensors))
    return tally


async def _drive_mixed(url: str, jobs: list[tuple[str, Any]], expected: dict, bad: dict, clients: int,
                       max_tokens: int) -> dict[str, Any]:
    tally: Counter[str] = Counter()
    failures: Counter[str] = Counter()  # valid requests not answered 200, by status and body
    malformed_status: dict[str, Counter[str]] = {}
    pending = iter(jobs)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def client_loop() -> None:
            for kind, job in pending:
                if kind == "valid":
                    name, prompt = job
                    method, path, kwargs = "POST", "/v1/completions", {
                        "json": {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}}
                else:
                    method, path, kwargs = bad[job]
                tally[f"{kind}_sent"] += 1
                try:
                    r = await client.request(method, path, **kwargs)
                except httpx.HTTPError:
                    tally[f"{kind}_failed"] += 1
                    continue
                tally["responses_with_traceback"] += "Traceback" in r.text or 'File "' in r.text
                if kind == "malformed":
                    malformed_status.setdefault(job, Counter())[str(r.status_code)] += 1
                    tally["malformed_4xx"] += 400 <= r.status_code < 500
                elif r.status_code != 200:
                    tally["valid_failed"] += 1
                    failures[f"{r.status_code}: {r.text[:200]}"] += 1
                elif r.json()["choices"][0]["text"] == expected[job]:
                    tally["valid_ok"] += 1
                else:
                    tally["valid_wrong"] += 1

        await asyncio.gather(*(client_loop() for _ in range(clients)))
    result: dict[str, Any] = {key: tally[key] for key in (
        "valid_sent", "valid_ok", "valid_wrong", "valid_failed", "malformed_sent", "malformed_4xx",
        "malformed_failed", "responses_with_traceback")}
    result["seconds"] = time.monotonic() - started
    result["malformed_status"] = {k: dict(v) for k, v in sorted(malformed_status.items())}
    result["valid_failures"] = dict(failures)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--adapters", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--out", default="results/serving.load.json")
    ap.add_argument("--mixed", action="store_true", help="valid + malformed requests, checked answers")
    ap.add_argument("--malformed", type=int, default=2500, help="malformed requests (--mixed)")
    args = ap.parse_args(argv)
    if args.mixed:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_mixed(Path(tmp), adapters=args.adapters, valid=args.requests, malformed=args.malformed,
                               clients=args.clients, max_tokens=args.max_tokens)
        print(json.dumps(result, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = build_assets(Path(tmp), args.adapters)
        command = [sys.executable, "-m", "moslora.cli", "serve", "--base", str(base), "--adapters", str(adapters)]
        with started("moslora", command, {}, BASE, Path(tmp) / "server.log", timeout=120) as server:
            result = asyncio.run(drive(server.url, [BASE] + [f"a{i}" for i in range(args.adapters)], args))
    result["config"] = vars(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("server_metrics", "config")}, indent=2))


if __name__ == "__main__":
    main()
