"""Training speed and peak memory of MoS vs PEFT LoRA, and where MoS time goes.

``python -m benchmarks.speed`` (``run_speed``; ``make bench-speed``) measures, for each base model and batch shape, one
training step (forward + backward + AdamW) of

- ``mos``: MoS at the project default (r = 16, budget e = 2, l = 2 shards per vector, p = 1),
- ``lora_r``: PEFT LoRA at the same per-layer rank r,
- ``lora_e``: PEFT LoRA at the budget rank e (MoS's parameter count),

all seven linear kinds adapted, on deep copies of one base in one process. Steps are
interleaved (mos, lora_r, lora_e, mos, ...), so load from other processes hits every method
alike; a ratio is the median of the per-round ratios, each taken between steps seconds apart.

On CPU the benchmark runs torch on one thread and times steps in process CPU time. On a
shared machine, two threads spin-wait for each other whenever another process holds a core:
we measured steps stretched 3-8x and very unevenly, worst for many small ops (MoS's gathers,
the low-rank matmuls), so ratios would measure the neighbours. One thread's CPU time is the
work itself (stable to ~2 % under a load of 8 on 2 cores). On a GPU, steps are timed in wall
time after a synchronize.

Peak memory: each (model, shape, method) runs ``memory_steps`` steps in a fresh process
(a process's allocator keeps what it freed, so sharing one would hide later peaks), and we
report the peak's growth over the loaded base: the kernel's RSS high-water mark, reset after
loading through ``/proc/self/clear_refs``, on CPU; ``torch.cuda.max_memory_allocated`` on a GPU.

Where MoS time goes, as tokens per step grow (one model, one sequence length, growing batch):
``base`` is the frozen model's step alone (forward + backward to the input embeddings, no
adapter); ``assembly`` replays exactly what a step does to build A and B from the pools (each
layer's ``ShardPools.factors`` gather and its backward into the pools), timed alone; the rest
of the MoS step is the adapter's arithmetic (the low-rank matmuls forward and backward, the
scaled add, AdamW on the pools). Assembly does not depend on the token count, so its share
shrinks as batches grow.

Writes ``speed.json`` and ``speed.png`` (``quick/`` under the results directory for
``--quick``); a finished result with the same plan is reused.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from torch import nn

from moslora.config import MoSConfig, default_targets
from moslora.model import MoSModel
from moslora.sizes import trainable_parameters
from . import environment, random_llama, write_json

METHODS = ("mos", "lora_r", "lora_e")
RATIOS = (("mos", "lora_r"), ("mos", "lora_e"))
TARGET = 1.10  # DESIGN.md §5: MoS / PEFT LoRA step time at the same per-layer rank
SEED = 0

Timer = Callable[[], float]


@dataclass(frozen=True)
class ModelSpec:
    """A base model to benchmark: the embedded default, or a random Llama built from a config.

    ``llama`` is ``(hidden, layers, vocab)``; ``None`` loads the embedded SmolLM2-135M-Instruct.
    """

    name: str
    llama: tuple[int, int, int] | None = None

    def build(self) -> nn.Module:
        # load_base draws no loading bar (noise.no_loading_bars), which would tear rich's display
        if self.llama is None:
            from moslora.base import load_base

            return load_base(None)[0]
        return random_llama(*self.llama).to(_device())


@dataclass(frozen=True)
class Plan:
    """What one benchmark run measures (stored in the JSON; a changed plan is measured anew)."""

    models: tuple[ModelSpec, ...]
    shapes: tuple[tuple[int, int], ...]  # (batch, seq) of the timed and memory steps
    steps: int  # timed rounds per model and shape, after the warm-up rounds
    warmup: int
    memory_steps: int  # steps per memory probe: the second one holds AdamW's state too
    sweep_model: str  # the model whose time split is measured as tokens grow
    sweep_seq: int
    sweep_batches: tuple[int, ...]
    sweep_steps: int
    mos: MoSConfig


DEFAULT_MOS = MoSConfig(target_modules=default_targets("llama"), rank=16, budget_rank=2, shards_per_vector=2,
                        private_rank=1, seed=SEED)
SMOLLM2 = "SmolLM2-135M-Instruct"
# Subset selection needs (e - p) · L >= r - p, i.e. L >= 15 layers at r = 16, e = 2, p = 1: the
# larger Llama has 16. Both shapes hold 1,024 tokens, so the sequence length changes only the
# attention's share (and activation memory), not the work of the linear layers; 1,024 tokens
# (not 2,048 at 4 x 512) and 4 timed rounds keep the full run near 20 minutes on one core.
FULL = Plan(models=(ModelSpec(SMOLLM2), ModelSpec("Llama-1024x16", (1024, 16, 8192))),
            shapes=((8, 128), (2, 512)), steps=4, warmup=1, memory_steps=2,
            sweep_model=SMOLLM2, sweep_seq=128, sweep_batches=(1, 4, 16), sweep_steps=3,
            mos=DEFAULT_MOS)
QUICK = Plan(models=(ModelSpec("Llama-512x16", (512, 16, 8192)),), shapes=((4, 128),), steps=2,
             warmup=1, memory_steps=2, sweep_model="Llama-512x16", sweep_seq=128,
             sweep_batches=(1, 4), sweep_steps=2, mos=DEFAULT_MOS)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    # CUDA kernels run asynchronously: a wall-clock reading needs them finished
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _clock() -> float:
    """Seconds for timing: wall time on a GPU, this process's CPU time on CPU (see above)."""
    return time.perf_counter() if torch.cuda.is_available() else time.process_time()


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block (see the module docstring), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- one step


def adapt(base: nn.Module, method: str, cfg: MoSConfig) -> nn.Module:
    """``base`` with the method's adapter (``mos``, ``lora_r``, ``lora_e``), or ``base`` alone
    with gradients flowing back to its input embeddings (the frozen model's share of a step)."""
    from moslora.model import wrap

    if method == "base":
        base.requires_grad_(False)  # as under an adapter: no weight gradients, no optimizer
        base.enable_input_require_grads()
        return base
    if method == "lora_e":
        return wrap(base, "lora", replace(cfg, rank=cfg.budget_rank))
    return wrap(base, "mos" if method == "mos" else "lora", cfg)


def token_batch(model: nn.Module, batch: int, seq: int) -> torch.Tensor:
    """Random token ids (seeded) on the model's device: speed does not depend on their values."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(SEED))
    return ids.to(next(model.parameters()).device)


def step_timer(model: nn.Module, ids: torch.Tensor) -> Timer:
    """A function that runs one training step on ``ids`` (as labels too) and returns its seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    # the bare base has no adapter to update: its step is forward + backward only
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()

    def step() -> float:
        _sync()
        start = _clock()
        model(input_ids=ids, labels=ids).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync()
        return _clock() - start

    return step


def assembly_timer(model: MoSModel) -> Timer:
    """A function that replays one step's assembly (every layer's ``factors`` gather, forward
    and backward into the pools, as the layers call it) and returns its seconds."""
    pools = list(model.mos_pools.values())

    def assemble() -> list[torch.Tensor]:
        return [t for p in pools for k in range(p.plan.num_layers) for t in p.factors(k)]

    grads = [torch.ones_like(t) for t in assemble()]  # made once: not part of the timing

    def replay() -> float:
        _sync()
        start = _clock()
        torch.autograd.backward(assemble(), grads)
        _sync()
        elapsed = _clock() - start
        model.zero_grad(set_to_none=True)  # the replay must not leave gradients for a real step
        return elapsed

    return replay


def interleave(timers: dict[str, Timer], steps: int, warmup: int,
               tick: Callable[[], None]) -> dict[str, list[float]]:
    """Round-robin over ``timers`` for ``warmup + steps`` rounds; the timed rounds' seconds."""
    seconds: dict[str, list[float]] = {name: [] for name in timers}
    for i in range(warmup + steps):
        for name, timer in timers.items():
            elapsed = timer()
            if i >= warmup:
                seconds[name].append(elapsed)
        tick()
    return seconds


def paired_ratio(seconds: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``num / den``: each pair ran back to back under the same load."""
    return statistics.median(a / b for a, b in zip(seconds[num], seconds[den]))


def _medians(seconds: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in seconds.items()}


# ----------------------------------------------------------------------------- timing


def measure_model(spec: ModelSpec, plan: Plan, rows: list[dict[str, Any]],
                  tick: Callable[[int], None]) -> dict[str, Any]:
    """Add step times of every method to this model's ``rows`` (one per batch shape); return
    the model's sizes, and the time split vs tokens if this is the plan's sweep model.
    ``tick(tokens)`` reports each finished round."""
    base = spec.build()
    methods = METHODS + (("base",) if spec.name == plan.sweep_model else ())
    models = {m: adapt(copy.deepcopy(base), m, plan.mos) for m in methods}
    result: dict[str, Any] = {
        "model": {"name": spec.name, "llama": spec.llama, "layers": base.config.num_hidden_layers,
                  "hidden": base.config.hidden_size, "params": sum(p.numel() for p in base.parameters()),
                  "trainable": {m: trainable_parameters(models[m]) for m in METHODS}},
        "sweep": None}
    del base
    assembly = assembly_timer(models["mos"])
    for row in rows:
        ids = token_batch(models["mos"], row["batch"], row["seq"])
        timers = {m: step_timer(models[m], ids) for m in METHODS} | {"assembly": assembly}
        seconds = interleave(timers, plan.steps, plan.warmup, lambda: tick(row["tokens"] * len(METHODS)))
        row.update({"seconds": seconds, "median_seconds": _medians(seconds),
                    "ratio": {f"{a}/{b}": paired_ratio(seconds, a, b) for a, b in RATIOS},
                    "assembly_share": paired_ratio(seconds, "assembly", "mos")})
    if "base" in models:
        result["sweep"] = sweep(models, plan, tick)
    return result


def sweep(models: dict[str, nn.Module], plan: Plan, tick: Callable[[int], None]) -> dict[str, Any]:
    """The MoS step split into base, assembly and adapter arithmetic at growing token counts."""
    points = []
    assembly = assembly_timer(models["mos"])
    for batch in plan.sweep_batches:
        tokens = batch * plan.sweep_seq
        ids = token_batch(models["mos"], batch, plan.sweep_seq)
        timers = {m: step_timer(models[m], ids) for m in ("mos", "base")} | {"assembly": assembly}
        seconds = interleave(timers, plan.sweep_steps, plan.warmup, lambda: tick(2 * tokens))
        base, asm = paired_ratio(seconds, "base", "mos"), paired_ratio(seconds, "assembly", "mos")
        points.append({"batch": batch, "tokens": tokens, "seconds": seconds,
                       "median_seconds": _medians(seconds),
                       "share": {"base": base, "assembly": asm, "adapter": 1.0 - base - asm}})
    return {"model": plan.sweep_model, "seq": plan.sweep_seq, "points": points}


# ----------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory growth from now on: CUDA allocations on a GPU, else the process's RSS."""

    def __init__(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            # resets the kernel's high-water mark (VmHWM) to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.baseline = _proc_status("VmRSS")

    def growth(self) -> int:
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _proc_status("VmHWM")
        return peak - self.baseline


def _proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(spec: ModelSpec, method: str, cfg: MoSConfig, batch: int, seq: int, steps: int) -> int:
    """Bytes of peak memory that ``steps`` training steps of ``method`` add to the loaded base
    (adapter, its gradients and AdamW state, activations). Run it in a fresh process."""
    with _one_thread():
        base = spec.build()
        ids = token_batch(base, batch, seq)
        meter = PeakMemory()
        step = step_timer(adapt(base, method, cfg), ids)
        for _ in range(steps):
            step()
        return meter.growth()


def measure_memory(plan: Plan, rows: list[dict[str, Any]], tick: Callable[[int], None]) -> None:
    """Add ``peak_bytes`` and memory ratios to each row, one fresh process per method."""
    specs = {spec.name: spec for spec in plan.models}
    # a fork server imports torch and moslora once, then forks a clean child per probe: seconds
    # of import saved per probe, and the server never ran torch's thread pools (unsafe to fork)
    context = get_context("forkserver")
    context.set_forkserver_preload([__name__])
    # one at a time: two probes of the larger model plus other jobs' memory ran a 24 GB machine
    # out of memory
    with ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
        jobs = {pool.submit(peak_memory, specs[row["model"]], method, plan.mos, row["batch"], row["seq"],
                            plan.memory_steps): (row, method)
                for row in rows for method in METHODS}
        for job in as_completed(jobs):
            row, method = jobs[job]
            row.setdefault("peak_bytes", {})[method] = job.result()
            tick(plan.memory_steps * row["tokens"])
    for row in rows:
        peak = row["peak_bytes"]
        row["memory_ratio"] = {f"{a}/{b}": peak[a] / peak[b] for a, b in RATIOS}


# ----------------------------------------------------------------------------- the run


def plan_work(plan: Plan) -> int:
    """Tokens the plan pushes through training steps: the progress bar's total."""
    per_model = sum(b * s for b, s in plan.shapes)
    timing = len(plan.models) * (plan.warmup + plan.steps) * len(METHODS) * per_model
    sweep_tokens = (plan.warmup + plan.sweep_steps) * 2 * sum(plan.sweep_batches) * plan.sweep_seq
    memory = len(plan.models) * len(METHODS) * plan.memory_steps * per_model
    return timing + sweep_tokens + memory


def measure(plan: Plan, progress: Progress | None = None) -> dict[str, Any]:
    """Run the plan: step times, peak memory and the time split; the result as a JSON-able dict."""
    task = progress.add_task("speed", total=plan_work(plan)) if progress else None

    def tick(tokens: int) -> None:
        if progress is not None:
            progress.advance(task, tokens)

    start, load_before = time.perf_counter(), os.getloadavg()
    rows = [{"model": spec.name, "batch": batch, "seq": seq, "tokens": batch * seq}
            for spec in plan.models for batch, seq in plan.shapes]
    models, sweep_result = {}, None
    cuda = torch.cuda.is_available()
    # the memory probes run in their own processes on the other core while this one times
    # steps on one thread (its CPU time is its own work, see the module docstring); on a GPU
    # they would share the device, so there they run first
    with ThreadPoolExecutor(1) as background:
        memory = background.submit(measure_memory, plan, rows, tick)
        if cuda:
            memory.result()
        with nullcontext() if cuda else _one_thread():
            env = environment()  # inside the block: it records the one thread
            for spec in plan.models:
                if progress is not None:
                    progress.update(task, description=f"speed: {spec.name}")
                measured = measure_model(spec, plan, [r for r in rows if r["model"] == spec.name], tick)
                models[spec.name] = measured["model"]
                sweep_result = measured["sweep"] or sweep_result
                gc.collect()  # the previous model's copies go before the next one loads
        memory.result()
    return {"benchmark": "speed", "plan": json.loads(json.dumps(asdict(plan))), "seed": SEED,
            "environment": env, "clock": "wall" if cuda else "process_cpu_time",
            "memory_measure": "cuda_max_allocated" if cuda else "rss_high_water_mark",
            # the machine's 1-minute load average around the run: how shared the cores were
            "load_average": {"before": load_before[0], "after": os.getloadavg()[0]},
            "models": models, "rows": rows, "sweep": sweep_result, "target": TARGET,
            "seconds_total": time.perf_counter() - start}


def run_speed(quick: bool = False, results_dir: Path = Path("results")) -> dict[str, Any]:
    """The speed benchmark; writes ``speed.json`` and ``speed.png`` (under ``quick/`` if quick)."""
    out = Path(results_dir) / "quick" if quick else Path(results_dir)  # quick never replaces full
    plan = QUICK if quick else FULL
    console = Console()
    path = out / "speed.json"
    cached = json.loads(path.read_text()) if path.is_file() else None
    if cached and cached.get("plan") == json.loads(json.dumps(asdict(plan))):
        console.print(f"reusing {path} (same plan; delete it to measure again)")
        result = cached
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                      TimeRemainingColumn(elapsed_when_finished=True), console=console) as progress:
            result = measure(plan, progress)
        write_json(path, result)
    plot_speed(result, out / "speed.png")
    console.print(Markdown(speed_markdown(result)))
    return result


# ----------------------------------------------------------------------------- report


def _label(row: dict[str, Any]) -> str:
    return f"{row['model']}\n{row['batch']}×{row['seq']}"


def plot_speed(result: dict[str, Any], path: Path) -> None:
    """Step-time and peak-memory ratios per model × shape, and the MoS step's split vs tokens."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, key, title in ((axes[0], "ratio", "training step time"), (axes[1], "memory_ratio", "peak memory growth")):
        width = 0.38
        for j, (a, b) in enumerate(RATIOS):
            name = f"{a}/{b}"
            xs = [i + (j - 0.5) * width for i in range(len(rows))]
            bars = ax.bar(xs, [row[key][name] for row in rows], width, label=f"MoS / LoRA@{b[-1]}")
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(1.0, color="black", lw=0.8)
        if key == "ratio":
            ax.axhline(result["target"], color="tab:red", ls="--", lw=1, label=f"target ≤ {result['target']}")
        ax.set_xticks(range(len(rows)), [_label(r) for r in rows], fontsize=8)
        top = max([result["target"]] + [v for row in rows for v in row[key].values()])
        ax.set_ylim(0, top * 1.25)  # headroom for the legend above the bars
        ax.set_ylabel("MoS / PEFT LoRA")
        ax.set_title(f"{title} (r = {result['plan']['mos']['rank']}, e = {result['plan']['mos']['budget_rank']})")
        ax.legend(fontsize=8, loc="upper center", ncol=3)
    points = result["sweep"]["points"]
    tokens = [p["tokens"] for p in points]
    ax = axes[2]
    for part, label in (("base", "frozen base"), ("adapter", "low-rank matmuls + AdamW"),
                        ("assembly", "assembly of A, B (gather)")):
        ax.plot(tokens, [100 * max(p["share"][part], 1e-4) for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"tokens per step (batch × {result['sweep']['seq']})")
    ax.set_ylabel("% of the MoS step")
    ax.set_title(f"where MoS time goes ({result['sweep']['model']})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speed_markdown(result: dict[str, Any]) -> str:
    """Markdown tables of the ratios and the time split, from a ``speed.json`` result."""
    lines = ["| model | batch × seq | MoS s | LoRA@r s | LoRA@e s | time MoS/LoRA@r | time MoS/LoRA@e "
             "| memory MoS/LoRA@r | memory MoS/LoRA@e | assembly share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        med, ratio, mem = row["median_seconds"], row["ratio"], row["memory_ratio"]
        lines.append(f"| {row['model']} | {row['batch']} × {row['seq']} | {med['mos']:.2f} | {med['lora_r']:.2f} "
                     f"| {med['lora_e']:.2f} | {ratio['mos/lora_r']:.3f} | {ratio['mos/lora_e']:.3f} "
                     f"| {mem['mos/lora_r']:.3f} | {mem['mos/lora_e']:.3f} | {100 * row['assembly_share']:.2f} % |")
    sweep_result = result["sweep"]
    lines += ["", f"Split of the MoS step on {sweep_result['model']} (seq {sweep_result['seq']}):", "",
              "| tokens | MoS step s | frozen base | low-rank matmuls + AdamW | assembly of A, B |",
              "|---|---|---|---|---|"]
    for p in sweep_result["points"]:
        share = p["share"]
        lines.append(f"| {p['tokens']} | {p['median_seconds']['mos']:.3f} | {100 * share['base']:.1f} % "
                     f"| {100 * share['adapter']:.1f} % | {100 * share['assembly']:.2f} % |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a minutes-long smoke run (one small model)")
    ap.add_argument("--results", type=Path, default=Path("results"), help="where the JSON and PNG go")
    args = ap.parse_args()
    run_speed(quick=args.quick, results_dir=args.results)


if __name__ == "__main__":  # the memory probes' worker processes import this module again
    main()
