"""The ``moslora`` command: train, eval, info, export-peft, serve, demo, selfcheck."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Mixture of Shards (MoS) adapters: fine-tune, evaluate, inspect, export.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)


def _targets(value: str) -> list[str] | str:
    """``all-linear``, ``re:<regex>``, or a comma-separated list of module-name suffixes."""
    if value == "all-linear":
        return value
    if value.startswith("re:"):
        return value[3:]
    return [t.strip() for t in value.split(",") if t.strip()]


@app.command()
def train(
    task: str = typer.Option("sentiment", help="sentiment | party | hamlet | chat, or a .jsonl/.csv file"),
    model: Optional[str] = typer.Option(None, help="local HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)"),
    output_dir: str = typer.Option("runs/default", help="run folder"),
    method: str = typer.Option("mos", help="mos, or lora for a PEFT LoRA run with the same settings"),
    targets: str = typer.Option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                help="comma-separated suffixes, all-linear, or re:<regex>"),
    rank: int = typer.Option(16, min=1, help="per-layer rank r"),
    budget_rank: int = typer.Option(2, min=1, help="LoRA rank e whose parameter count MoS matches"),
    shards_per_vector: int = typer.Option(2, min=1, help="l: shards per rank vector (vector sharding)"),
    private_rank: int = typer.Option(1, min=0, help="p: private ranks per layer (shard privatization)"),
    subset_selection: bool = typer.Option(True, help="route each layer to its own subset of the pool"),
    pair_dissociation: bool = typer.Option(True, help="route A and B shards independently"),
    alpha: float = typer.Option(32.0, min=0.0, help="update scale numerator (alpha / rank)"),
    dropout: float = typer.Option(0.0, min=0.0, max=0.99),
    init: str = typer.Option("kaiming", help="kaiming | gaussian"),
    max_steps: int = typer.Option(60, min=1),
    batch_size: int = typer.Option(8, min=1),
    grad_accum: int = typer.Option(1, min=1),
    learning_rate: float = typer.Option(2e-3, min=0.0),
    warmup_ratio: float = typer.Option(0.1, min=0.0, max=0.99),
    eval_steps: int = typer.Option(20, min=1),
    train_examples: Optional[int] = typer.Option(None, min=1),
    eval_examples: int = typer.Option(100, min=1),
    test_examples: int = typer.Option(300, min=1),
    max_length: int = typer.Option(128, min=8),
    seed: int = typer.Option(0, min=0),
    gradient_checkpointing: bool = typer.Option(False),
    load_in_4bit: bool = typer.Option(False, help="NF4 base (bitsandbytes), QLoRA style"),
    resume: bool = typer.Option(False, help="resume from the run folder's last checkpoint"),
) -> None:
    """Fine-tune an adapter on a task; writes adapter, metrics.json, config.json, loss.png."""
    from .config import MoSConfig
    from .train import TrainConfig
    from .train import train as run

    try:
        mos = MoSConfig(target_modules=_targets(targets), rank=rank, budget_rank=budget_rank,
                        shards_per_vector=shards_per_vector, private_rank=private_rank,
                        subset_selection=subset_selection, pair_dissociation=pair_dissociation,
                        alpha=alpha, dropout=dropout, init=init, seed=seed)
        cfg = TrainConfig(model=model, task=task, method=method, mos=mos, output_dir=output_dir,
                          max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                          learning_rate=learning_rate, warmup_ratio=warmup_ratio, eval_steps=eval_steps,
                          train_examples=train_examples, eval_examples=eval_examples,
                          test_examples=test_examples, max_length=max_length, seed=seed,
                          gradient_checkpointing=gradient_checkpointing, load_in_4bit=load_in_4bit,
                          resume=resume)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    result = run(cfg)
    typer.echo(json.dumps(result.metrics, indent=2, default=str))


@app.command("eval")
def evaluate_cmd(
    task: str = typer.Option("sentiment", help="task name or .jsonl/.csv file"),
    model: Optional[str] = typer.Option(None, help="base model (default: embedded SmolLM2)"),
    adapter: Optional[Path] = typer.Option(None, help="an MoS adapter or exported PEFT LoRA directory"),
    examples: int = typer.Option(300, min=1, help="test examples to score"),
    max_length: int = typer.Option(128, min=8),
    batch_size: int = typer.Option(8, min=1),
    seed: int = typer.Option(0, min=0, help="split seed (as in training)"),
) -> None:
    """Evaluate a base model, with or without an adapter, on a task's test split."""
    from .data import Task, evaluate, load_task
    from .train import load_base

    base, tokenizer = load_base(model)
    net = attach_adapter(base, adapter) if adapter else base
    task_data = load_task(task, seed=seed)
    test = Task(task_data.name, [], [], task_data.test[:examples], task_data.label_words)
    typer.echo(json.dumps(evaluate(net, tokenizer, test, "test", max_length, batch_size), indent=2))


def attach_adapter(base, path: Path):
    """An MoS adapter directory, or a PEFT one (told apart by ``peft_type`` in its config)."""
    config = path / "adapter_config.json"
    if config.is_file() and "peft_type" in json.loads(config.read_text()):
        from peft import PeftModel

        return PeftModel.from_pretrained(base, path)
    from .model import MoSModel

    return MoSModel.from_pretrained(base, path)


@app.command()
def info(path: Path = typer.Argument(..., help="an MoS adapter directory")) -> None:
    """What an adapter holds: config, kinds, base fingerprint, size on disk."""
    from .checkpoint import read_adapter_config

    header = read_adapter_config(path)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    typer.echo(json.dumps({"config": header["config"], "kinds": header.get("kinds"),
                           "base_architecture": header["base_fingerprint"].get("architecture"),
                           "bytes_on_disk": size}, indent=2))


@app.command("export-peft")
def export_peft(
    adapter: Path = typer.Argument(..., help="an MoS adapter directory"),
    out_dir: Path = typer.Argument(..., help="where to write the PEFT LoRA directory"),
    model: Optional[str] = typer.Option(None, help="the adapter's base model (default: embedded SmolLM2)"),
) -> None:
    """Materialize an MoS adapter as a standard PEFT LoRA adapter (rank r)."""
    from .checkpoint import export_peft_lora
    from .model import MoSModel
    from .train import load_base

    base, _ = load_base(model)
    export_peft_lora(MoSModel.from_pretrained(base, adapter), out_dir)
    typer.echo(f"wrote {out_dir}")


@app.command()
def serve(
    adapters: Path = typer.Option(..., help="root directory of MoS adapters (each subdirectory is one)"),
    base: Optional[str] = typer.Option(None, help="local HF folder or .gguf file (default: embedded SmolLM2)"),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000, min=1, max=65535),
    api_keys: Optional[Path] = typer.Option(None, help="JSON file of keys (default: $MOSLORA_API_KEYS)"),
    max_batch: int = typer.Option(16, min=1, help="rows per batched forward"),
    batch_window_ms: float = typer.Option(5.0, min=0.0, help="how long to wait for more requests"),
    queue_size: int = typer.Option(256, min=1, help="pending requests before answering 503"),
) -> None:
    """Serve every adapter under --adapters over HTTP (OpenAI-style /v1/completions)."""
    import uvicorn

    from .serving.server import ApiKeys, load_server

    server = load_server(base, adapters, ApiKeys.load(api_keys), max_batch=max_batch,
                         batch_window=batch_window_ms / 1000, queue_size=queue_size)
    uvicorn.run(server, host=host, port=port)


@app.command()
def demo(
    steps: int = typer.Option(60, min=1, help="fine-tuning steps"),
    test_examples: int = typer.Option(300, min=1, help="test reviews scored before and after"),
    output_dir: str = typer.Option("runs/demo"),
) -> None:
    """Fine-tune the embedded SmolLM2 with MoS on sentiment: accuracy before -> after, vs LoRA."""
    from .demo import run_finetune_demo

    run_finetune_demo(steps=steps, test_examples=test_examples, output_dir=output_dir)


@app.command()
def selfcheck(steps: int = typer.Option(30, min=1, help="training steps on the toy task")) -> None:
    """Seconds-long check on a small Llama: report, merge, save/load and PEFT export exactness."""
    from .demo import run_selfcheck

    result = run_selfcheck(steps=steps)
    if any(result[k] > 1e-5 for k in ("merged_diff", "reload_diff", "peft_diff")):
        raise typer.Exit(code=1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
