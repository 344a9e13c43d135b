"""Serving many adapters on one base: MoS mixed batches vs PEFT mixed batches vs a merged model.

Two bases ("tracks"), each with N MoS adapters (random non-zero weights):

- ``llama-small``: a small Llama from a config (hidden 512, 4 layers, all 7 linear kinds; the
  random Llama of the speed benchmark), r = 16 at the budget of LoRA rank e = 8;
- ``smollm2``: the default pretrained SmolLM2-135M-Instruct (30 layers, hidden 576, all 7
  kinds), r = 16 at e = 2 (the demo's adapter; there LoRA at 8e is LoRA at r).

For each N and repetition, a batch of 32 rows with a random adapter per row (distinct seeds),
in three phases: *prefill*, the forward pass over 32 x 64 tokens with the logits of the last
position (``logits_to_keep=1``, as ``generate`` does); *generate*, greedy decoding of 16 new
tokens after a 16-token prompt; and *decode*, that generate's 15 one-token steps alone (from
its first new token to its last, timed by a streamer); each timed interleaved across

- ``mos``: ``MultiAdapterModel`` (a decoding step's updates by the C++ op straight from the
  stacked pools, a prefill's from factors gathered from them at every forward);
- ``mos_torch`` (generate and decode, when the op is built): the same model with
  ``decode_kernel = False``, every step on the torch path (the gathered factors);
- ``peft``: ``PeftModel`` with the same adapters exported by ``export_peft_lora`` and
  ``adapter_names=[...]`` (PEFT's mixed-batch inference);
- ``merged``: one adapter merged into the base (the ceiling: no adapter work at all).

Memory: resident adapter bytes of MoS (``memory_report``) for N adapters of distinct seeds and
for N adapters of one seed (identical routing indices, held once), vs LoRA at rank 8e (the
paper's equal-quality setting), LoRA at rank e, and PEFT's actual resident bytes (rank r).
Writes results/serving.json and results/serving.png (``--quick``: runs/serving-quick.*).

    python -m benchmarks.serving [--quick] [--tracks llama-small smollm2] [--reps 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from peft import PeftModel
from torch import nn

from moslora import MoSConfig, MoSModel, ParameterReport, export_peft_lora, get_mos_model
from moslora.config import default_targets
from moslora.serving import MultiAdapterModel
from moslora.serving.kernel import available as decode_kernel_available

from . import random_llama

Forward = Callable[[torch.Tensor, list[str | None]], torch.Tensor]
COLORS = {"mos": "C0", "mos_torch": "C1", "peft": "C2", "merged": "C3"}  # one color per system in every panel
BASELINES = ("merged", "peft", "mos_torch")  # what our speedups are over, where a phase has them


@dataclass
class Track:
    """One base and its adapters' config, with what this machine can afford on it."""

    name: str
    description: str
    base: nn.Module
    config: MoSConfig
    threads: list[int]
    reps: int
    peft_max: int  # largest N served by PEFT (each PEFT adapter is a dense rank-r LoRA)
    left_out: str = ""  # what was not measured, and why
    vocab: int = field(init=False)

    def __post_init__(self) -> None:
        self.vocab = self.base.config.vocab_size


def llama_small(args: argparse.Namespace) -> Track:
    return Track(
        "llama-small", "Llama from a config: hidden 512, 4 layers, 8 heads, vocab 8192",
        random_llama(512, 4).eval(),
        MoSConfig(target_modules=default_targets("llama"), rank=16, budget_rank=8, private_rank=1, shards_per_vector=2),
        threads=args.threads, reps=args.reps, peft_max=max(args.adapters))


def smollm2(args: argparse.Namespace) -> Track:
    from moslora.base import load_base

    peft_max = min(args.smollm2_peft_max, max(args.adapters))
    left_out = ""
    if peft_max < max(args.adapters):
        left_out += (f"PEFT at N > {peft_max} (each PEFT adapter is a dense rank-16 LoRA of 19.6 MB to "
                     "export and load, and its forward takes seconds on 2 shared CPU cores: beyond the "
                     "~15 min budget of this track)")
    return Track(
        "smollm2", "SmolLM2-135M-Instruct (pretrained, fp32): 30 layers, hidden 576, vocab 49152",
        load_base(None)[0].eval(),
        MoSConfig(target_modules=default_targets("llama"), rank=16, budget_rank=2, private_rank=1, shards_per_vector=2),
        threads=args.smollm2_threads, reps=args.smollm2_reps, peft_max=peft_max, left_out=left_out)


# ---------------------------------------------------------------------------- adapters


def randomize(model: MoSModel, seed: int) -> None:
    """Non-zero pools, so that every check below has teeth."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.mos_pools.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def distinct_seed_adapters(track: Track, count: int, root: Path) -> tuple[list[Path], ParameterReport]:
    """``count`` adapters with seed ``i`` each (so distinct routing), saved as ``root/mos{i}``;
    the first ``track.peft_max`` also exported to PEFT as ``root/peft{i}``."""
    dirs = []
    for i in range(count):
        model = get_mos_model(copy.deepcopy(track.base), MoSConfig(**{**track.config.to_dict(), "seed": i}))
        randomize(model, seed=i)
        model.save_pretrained(root / f"mos{i}")
        if i < track.peft_max:
            export_peft_lora(model, root / f"peft{i}")
        dirs.append(root / f"mos{i}")
    return dirs, model.parameter_report()


def same_seed_adapters(track: Track, count: int, root: Path) -> list[Path]:
    """``count`` adapters of one seed (identical routing indices), other weights each."""
    model = get_mos_model(copy.deepcopy(track.base), track.config)
    dirs = []
    for i in range(count):
        randomize(model, seed=10_000 + i)
        model.save_pretrained(root / f"same{i}")
        dirs.append(root / f"same{i}")
    return dirs


# ---------------------------------------------------------------------------- contenders


class Contenders:
    """The four systems over the first ``n`` adapters, grown in place as N increases (so the
    adapters of a smaller N are not loaded again), plus the same-seed registry for memory."""

    def __init__(self, track: Track, dirs: list[Path], same: list[Path]) -> None:
        self.track, self.dirs, self.same = track, dirs, same
        self.mos = MultiAdapterModel(copy.deepcopy(track.base))
        self.same_seed = MultiAdapterModel(copy.deepcopy(track.base))
        self.peft: PeftModel | None = None
        self.merged = MoSModel.from_pretrained(copy.deepcopy(track.base), dirs[0]).merge_and_unload()
        self.n = 0

    def grow(self, n: int) -> None:
        for i in range(self.n, n):
            name = f"a{i}"
            self.mos.load_adapter(name, self.dirs[i])
            self.same_seed.load_adapter(name, self.same[i])
            if i < self.track.peft_max:
                peft_dir = self.dirs[i].with_name(f"peft{i}")
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(copy.deepcopy(self.track.base), peft_dir, adapter_name=name)
                else:
                    self.peft.load_adapter(peft_dir, adapter_name=name)
        self.n = n

    def prefill(self) -> dict[str, Forward]:
        """Prefill of each system: logits of the last position only."""
        systems: dict[str, Forward] = {
            "mos": lambda ids, rows: self.mos(ids, adapter_names=rows, logits_to_keep=1).logits,
            "merged": lambda ids, rows: self.merged(input_ids=ids, logits_to_keep=1).logits,
        }
        if self.n <= self.track.peft_max:
            systems["peft"] = lambda ids, rows: self.peft(input_ids=ids, adapter_names=rows, logits_to_keep=1).logits
        return systems

    def generators(self, new_tokens: int, clock: StepClock | None = None) -> dict[str, Forward]:
        """Greedy ``generate`` of exactly ``new_tokens`` tokens per row (``clock``: timestamps
        of its steps, for the decode phase)."""
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  streamer=clock)
        systems: dict[str, Forward] = {
            "mos": lambda ids, rows: self.mos.generate(ids, adapter_names=rows, **kw),
            "merged": lambda ids, rows: self.merged.generate(input_ids=ids, **kw),
        }
        if decode_kernel_available():
            systems["mos_torch"] = lambda ids, rows: self.torch_path(lambda: self.mos.generate(ids, adapter_names=rows, **kw))
        if self.n <= self.track.peft_max:
            systems["peft"] = lambda ids, rows: self.peft.generate(input_ids=ids, adapter_names=rows, **kw)
        return systems

    def torch_path(self, call: Callable[[], Any]) -> Any:
        """``call`` with MoS decoding on the torch path (the factors gathered from the pools)
        instead of the C++ op: the op's own speedup, on the same batches."""
        self.mos.decode_kernel = False
        try:
            return call()
        finally:
            self.mos.decode_kernel = True

    def peft_bytes(self) -> int | None:
        if self.n > self.track.peft_max:
            return None
        return sum(p.numel() * p.element_size() for n, p in self.peft.named_parameters() if "lora_" in n)


# ---------------------------------------------------------------------------- measurements


def memory_row(c: Contenders, report: ParameterReport) -> dict[str, Any]:
    """Resident adapter bytes at N = ``c.n``, and the ratios to LoRA at rank 8e."""
    n, cfg = c.n, c.track.config
    lora = {rank: n * 4 * sum(p.lora_params(rank) for p in report.kinds.values())
            for rank in (cfg.budget_rank, 8 * cfg.budget_rank, cfg.rank)}
    distinct, same = c.mos.memory_report(), c.same_seed.memory_report()
    peft = c.peft_bytes()
    # PEFT's measured bytes must match the formula, so the LoRA columns are right too
    assert peft is None or peft == lora[cfg.rank], (peft, lora[cfg.rank])
    return {
        "adapters": n,
        "mos_distinct_seeds": distinct["adapters_total"],
        "mos_same_seed": same["adapters_total"],
        "mos_same_seed_shared": same["shared"],
        "peft_rank_r": peft,
        "lora_8e": lora[8 * cfg.budget_rank],
        "lora_e": lora[cfg.budget_rank],
        "distinct_over_lora_8e": distinct["adapters_total"] / lora[8 * cfg.budget_rank],
        "same_seed_over_lora_8e": same["adapters_total"] / lora[8 * cfg.budget_rank],
    }


class StepClock:
    """A ``generate`` streamer that only takes the time: ``generate`` calls ``put`` with the
    prompt, then once per new token, so the time from the first new token to the last is the
    decoding steps alone (one token per row each), without the prompt's prefill."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.decode: dict[str, list[float]] = {}

    def put(self, value: Any) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def record(self, name: str | None) -> None:
        """File the last call's decoding seconds under ``name`` (``None``: a warm-up, dropped),
        and start afresh."""
        if name is not None:
            self.decode.setdefault(name, []).append(self.stamps[-1] - self.stamps[1])
        self.stamps = []


def timings(systems: dict[str, Forward], c: Contenders, args: argparse.Namespace, seq: int,
            clock: StepClock | None = None) -> dict[str, list[float]]:
    """Interleaved timings: each repetition draws a batch of ``seq`` tokens a row and a random
    adapter per row, then runs every system on it, so that load from other processes hits all
    of them alike. With the ``clock`` the systems were built with, it also keeps their
    decoding steps' seconds (``clock.decode``)."""
    gen = torch.Generator().manual_seed(c.n)
    times: dict[str, list[float]] = {name: [] for name in systems}
    for rep in range(args.warmup + c.track.reps):
        ids = torch.randint(0, c.track.vocab, (args.batch, seq), generator=gen)
        rows = [f"a{int(i)}" for i in torch.randint(0, c.n, (args.batch,), generator=gen)]
        for name, forward in systems.items():
            start = time.perf_counter()
            forward(ids, rows)
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
            if clock is not None:
                clock.record(name if rep >= args.warmup else None)
    return times


def max_diffs(c: Contenders) -> dict[str, float | bool]:
    """Sanity: MoS (both) vs PEFT on a mixed batch (logits, and greedy tokens); MoS vs the merged
    model on adapter 0 rows; same-seed registry vs its adapters alone; the decode op vs the
    torch path (greedy tokens, and the largest logit difference over 8 steps, next to the
    largest logit); and how far the adapters move the logits from the base (so the other
    checks have teeth)."""
    ids = torch.randint(0, c.track.vocab, (4, 16), generator=torch.Generator().manual_seed(1))
    rows = [f"a{i % c.n}" for i in range(4)]
    systems = c.prefill()
    out = {name: forward(ids, rows) for name, forward in systems.items()}
    diffs = {
        "mos_vs_base": (out["mos"] - systems["mos"](ids, [None] * 4)).abs().max().item(),
        "mos_a0_vs_merged": (systems["mos"](ids, ["a0"] * 4) - out["merged"]).abs().max().item(),
        "same_seed_a0_vs_alone": (c.same_seed(ids, adapter_names=["a0"] * 4, logits_to_keep=1).logits
                                  - MoSModel.from_pretrained(copy.deepcopy(c.track.base), c.same[0])(
                                      input_ids=ids, logits_to_keep=1).logits).abs().max().item(),
    }
    if "peft" in out:
        diffs["mos_vs_peft"] = (out["mos"] - out["peft"]).abs().max().item()
    if "peft" in out:
        tokens = {name: g(ids, rows) for name, g in c.generators(4).items() if name not in ("merged", "mos_torch")}
        diffs["generate_mos_equals_peft"] = torch.equal(tokens["mos"], tokens["peft"])
    if decode_kernel_available():  # the op against the torch path: same tokens, and how far the steps' logits move
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        fast = c.mos.generate(ids, adapter_names=rows, **kw)
        slow = c.torch_path(lambda: c.mos.generate(ids, adapter_names=rows, **kw))
        diffs["decode_op_equals_torch_path"] = torch.equal(fast.sequences, slow.sequences)
        diffs["decode_op_vs_torch_path"] = max((f - s).abs().max().item() for f, s in zip(fast.scores, slow.scores))
        diffs["decode_logits_max_abs"] = max(s.abs().max().item() for s in slow.scores)
    return diffs


def paired_ratios(times: dict[str, list[float]], ours: str, other: str) -> list[float]:
    """Throughput of ``ours`` over ``other`` per repetition: their time ratio on the same batch,
    run back to back."""
    return [t_other / t_ours for t_ours, t_other in zip(times[ours], times[other])]


def paired_speedup(times: dict[str, list[float]], ours: str, other: str) -> float:
    """The median of ``paired_ratios``, which cancels the slow drifts of a shared machine's load
    that a ratio of two medians keeps."""
    return statistics.median(paired_ratios(times, ours, other))


def phase(times: dict[str, list[float]], tokens: int) -> dict[str, Any]:
    """Medians, tokens/s (``tokens`` per call) and our paired speedups of one phase."""
    med = {name: statistics.median(ts) for name, ts in times.items()}
    out: dict[str, Any] = {"median_seconds": med, "tokens_per_s": {name: tokens / m for name, m in med.items()}}
    for other in BASELINES:
        out[f"mos_over_{other}"] = paired_speedup(times, "mos", other) if other in times else None
    return out


def throughput_row(c: Contenders, threads: int, diffs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Prefill (``batch x seq`` tokens), generate (``new_tokens`` per row after a prompt of
    ``prompt`` tokens) and its decoding steps alone (the ``new_tokens - 1`` one-token steps after
    the first new token) of every system at N = ``c.n``."""
    torch.set_num_threads(threads)
    prefill = timings(c.prefill(), c, args, args.seq)
    clock = StepClock()
    generate = timings(c.generators(args.new_tokens, clock), c, args, args.prompt, clock)
    return {
        "adapters": c.n,
        "prefill": phase(prefill, args.batch * args.seq),
        "generate": phase(generate, args.batch * args.new_tokens),
        "decode": phase(clock.decode, args.batch * (args.new_tokens - 1)),
        "checks": diffs,
        # other processes on the machine skew the timings: keep the evidence
        "load_average": os.getloadavg(),
        "seconds": {"prefill": prefill, "generate": generate, "decode": clock.decode},
    }


def summary(row: dict[str, Any], name: str) -> str:
    """One phase of a row as a line: tokens/s per system, then our speedups."""
    p = row[name]
    ratios = [f"mos/{other} {p[f'mos_over_{other}']:.2f}" for other in BASELINES if p[f"mos_over_{other}"] is not None]
    return (f"{name}: " + "  ".join(f"{k} {v:.0f}" for k, v in p["tokens_per_s"].items())
            + " tok/s | " + "  ".join(ratios))


def run_track(track: Track, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    result: dict[str, Any] = {
        "name": track.name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": track.description, "mos_config": track.config.to_dict(),
        "threads": track.threads, "reps": track.reps, "peft_max_adapters": track.peft_max, "left_out": track.left_out,
        "memory": [], "runs": [{"threads": t, "rows": []} for t in track.threads],
    }
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        dirs, report = distinct_seed_adapters(track, max(args.adapters), Path(tmp))
        same = same_seed_adapters(track, max(args.adapters), Path(tmp))
        c = Contenders(track, dirs, same)
        result["setup_seconds"] = time.perf_counter() - start
        for count in sorted(args.adapters):
            c.grow(count)
            result["memory"].append(memory_row(c, report))
            diffs = max_diffs(c)
            for run in result["runs"]:
                row = throughput_row(c, run["threads"], diffs, args)
                run["rows"].append(row)
                print(f"{track.name} threads={run['threads']} N={count:>3} {summary(row, 'prefill')}\n"
                      f"{' ' * len(track.name)}                 {summary(row, 'generate')}\n"
                      f"{' ' * len(track.name)}                 {summary(row, 'decode')}", flush=True)
    result["seconds"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------- output


def serving_markdown(result: dict[str, Any]) -> str:
    """The README's table of a run: per base and N, resident bytes against LoRA at 8e, and our
    paired speedups over the merged model, PEFT and (decode) the torch path, each the median
    over repetitions with its [min, max]."""
    def ratio(row: dict[str, Any], phase: str, other: str) -> str:
        times = row["seconds"].get(phase, {})
        if other not in times:
            return "–"
        rs = paired_ratios(times, "mos", other)
        return f"{statistics.median(rs):.2f} [{min(rs):.2f}, {max(rs):.2f}]"

    cells = (("prefill", "merged"), ("prefill", "peft"), ("decode", "merged"), ("decode", "peft"),
             ("decode", "mos_torch"), ("generate", "merged"), ("generate", "peft"))
    lines = ["| base | threads | N | MoS / LoRA-8e, distinct seeds | one seed | prefill: vs merged | vs PEFT | "
             "decode: vs merged | vs PEFT | op vs torch path | generate: vs merged | vs PEFT |", "|---" * 12 + "|"]
    for track in result["tracks"]:
        memory = {m["adapters"]: m for m in track["memory"]}
        name = f"{track['name']} ({track.get('date', result['date'])[:10]})"
        for run in track["runs"]:
            for row in run["rows"]:
                m = memory[row["adapters"]]
                lines.append(f"| {name} | {run['threads']} | {row['adapters']} | "
                             f"{m['distinct_over_lora_8e']:.4f} | {m['same_seed_over_lora_8e']:.5f} | "
                             + " | ".join(ratio(row, ph, o) for ph, o in cells) + " |")
    return "\n".join(lines) + "\n"


def label_n(ax: Any, ns: list[int]) -> None:
    """Log x axis labelled at the measured N only."""
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(ns, [str(n) for n in ns])
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracks, cfg = result["tracks"], result["config"]
    phases = ("prefill", "decode", "generate")
    panels = [(run, phase) for run in tracks[0]["runs"] for phase in phases]
    fig, axes = plt.subplots(len(tracks), len(panels) + 1, figsize=(5 * (len(panels) + 1), 4 * len(tracks)),
                             squeeze=False)
    shape = {"prefill": f"batch {cfg['batch']}x{cfg['seq']}",
             "decode": f"batch {cfg['batch']}, {cfg['new_tokens']} - 1 one-token steps",
             "generate": f"batch {cfg['batch']}, {cfg['prompt']}+{cfg['new_tokens']} tokens"}
    for ax_row, track in zip(axes, tracks):
        ns = [row["adapters"] for row in track["memory"]]
        for ax, (run, phase) in zip(ax_row, [(run, ph) for run in track["runs"] for ph in phases]):
            for name, color in COLORS.items():
                points = [(r["adapters"], r[phase]["tokens_per_s"][name]) for r in run["rows"]
                          if phase in r and name in r[phase]["tokens_per_s"]]
                if points:
                    ax.plot(*zip(*points), marker="o", color=color, label=name)
            ax.set(xscale="log", xlabel="adapters resident (N)", ylabel=f"tokens/s ({phase})",
                   title=f"{track['name']} {phase}: {shape[phase]}, {run['threads']} thread(s)")
            ax.set_ylim(bottom=0)
            label_n(ax, ns)
            ax.legend(fontsize=8)
        ax = ax_row[-1]
        mem, e = track["memory"], track["mos_config"]["budget_rank"]
        ax.plot(ns, [row["distinct_over_lora_8e"] for row in mem], "o-", label="MoS, distinct seeds")
        ax.plot(ns, [row["same_seed_over_lora_8e"] for row in mem], "v-", label="MoS, one seed (indices shared)")
        ax.plot(ns, [row["lora_e"] / row["lora_8e"] for row in mem], "x--", label=f"LoRA rank e={e}")
        ax.axhline(1 / 8, color="gray", lw=0.8, ls=":", label="target 1/8")
        ax.set(xscale="log", xlabel="adapters resident (N)", ylabel=f"resident bytes / LoRA rank 8e={8 * e}",
               title=f"{track['name']}: adapter memory vs LoRA at 8e")
        label_n(ax, ns)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N in {1, 10}, 2 repetitions, 1 thread; writes runs/")
    ap.add_argument("--tracks", nargs="+", choices=["llama-small", "smollm2"], default=["llama-small", "smollm2"])
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 10, 50, 200])
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="llama-small thread counts")
    ap.add_argument("--smollm2-threads", type=int, nargs="+", default=[1])
    ap.add_argument("--smollm2-peft-max", type=int, default=50, help="largest N served by PEFT on smollm2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smollm2-reps", type=int, default=3, help="repetitions on smollm2 (seconds per forward)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64, help="prefill tokens per row")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per row for generate")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per row")
    ap.add_argument("--out", default=None, help="default results/serving.json (--quick: runs/serving-quick.json)")
    ap.add_argument("--update", action="store_true",
                    help="keep the tracks of --out that this run does not measure (each track has its date)")
    args = ap.parse_args()
    if args.quick:
        args.adapters, args.threads, args.smollm2_threads, args.reps, args.smollm2_reps = [1, 10], [1], [1], 2, 2
    args.out = Path(args.out or ("runs/serving-quick.json" if args.quick else "results/serving.json"))
    return args


def main() -> None:
    args = parse_args()
    result: dict[str, Any] = {
        "benchmark": "serving",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "phases": {
            "prefill": "forward over batch x seq tokens, logits of the last position only (logits_to_keep=1)",
            "generate": "greedy generate of new_tokens per row after a prompt of prompt tokens; "
                        "tokens/s counts generated tokens",
            "decode": "generate's one-token steps alone: from its first new token to its last (new_tokens - 1 "
                      "steps), timed by a streamer",
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "load_average_at_start": os.getloadavg(),
        "targets": {"mos_over_lora_8e": 1 / 8, "prefill_mos_over_peft": 1.1, "decode_mos_over_peft_at_50": 2.5,
                    "decode_mos_over_merged": 0.85},
        "tracks": [],
    }
    builders = {"llama-small": llama_small, "smollm2": smollm2}
    for name in args.tracks:
        result["tracks"].append(run_track(builders[name](args), args))
    if args.update and args.out.exists():
        old = json.loads(args.out.read_text())
        kept = [t | {"date": t.get("date", old["date"])} for t in old["tracks"] if t["name"] not in args.tracks]
        result["tracks"] = kept + result["tracks"]
    result["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    for track in result["tracks"]:
        for row in track["memory"]:
            print(f"{track['name']} N={row['adapters']:>3}: MoS/LoRA-8e distinct seeds "
                  f"{row['distinct_over_lora_8e']:.5f}, same seed {row['same_seed_over_lora_8e']:.5f} (target <= 0.125)")


if __name__ == "__main__":
    main()
