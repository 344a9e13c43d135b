"""The ``moslora`` command: train, eval, info, merge, export-peft/-gguf, serve, demo, selfcheck.

The benchmarks are not part of it: they live in the checkout's ``benchmarks/`` (``make bench``).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from .config import MAX_SEED, ConfigError, MoSConfig
from .demo import DEMO_DIR
from .train_config import LR_SCHEDULERS, MIN_LENGTH, TrainConfig

_HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(help="Mixture of Shards (MoS) adapters: fine-tune, evaluate, inspect, export.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, context_settings=_HELP)


def _adapter_dir(value: Optional[Path]) -> Optional[Path]:
    """An adapter option names a directory; a file (say, its safetensors) gets told so."""
    if value is not None and value.is_file():
        raise typer.BadParameter(f"{value} is a file; pass the adapter's directory (the folder "
                                 "that holds adapter_config.json)")
    return value


# adapter paths must exist: checked before any model is loaded
_ADAPTER_DIR = dict(exists=True, resolve_path=True, callback=_adapter_dir)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"moslora {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Mixture of Shards (MoS) adapters: fine-tune, evaluate, inspect, export."""


def _option(field: str) -> str:
    """The command-line option that sets config field ``field``."""
    return "--targets" if field == "target_modules" else "--" + field.replace("_", "-")


@contextmanager
def _config_errors(hint: str | None = None) -> Iterator[None]:
    """Report a ``ConfigError`` as a usage error naming the option (exit code 2)."""
    try:
        yield
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint=hint or _option(err.field)) from None


@contextmanager
def _usage_errors(hint: str | None = None) -> Iterator[None]:
    """Report a config or adapter error as a usage error naming the option (exit code 2)."""
    from .checkpoint import CheckpointError

    with _config_errors(hint):
        try:
            yield
        except (CheckpointError, FileNotFoundError) as err:
            raise typer.BadParameter(str(err), param_hint=hint) from None


def _finite(value: float) -> float:
    """Typer's ``min``/``max`` let NaN and infinity through."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def _model(value: Optional[str]) -> Optional[str]:
    return _checked("check_model", value)


def _task(value: str) -> str:
    return _checked("check_task", value)


def _checked(check: str, value: Any) -> Any:
    """Run ``moslora.train_config.<check>`` on an option's value in its callback (click names the
    option)."""
    from . import train_config

    try:
        getattr(train_config, check)(value)
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from None
    return value


def _targets(value: str) -> list[str] | str:
    """``all-linear``, ``re:<regex>``, or a comma-separated list of module-name suffixes."""
    if value == "all-linear":
        return value
    if value.startswith("re:"):
        return value[3:]
    return [t.strip() for t in value.split(",") if t.strip()]


def _default(field: str) -> Any:
    """The default of ``TrainConfig.<field>``, or of the default adapter's ``MoSConfig.<field>``:
    the options show the library's defaults instead of repeating them."""
    fields = TrainConfig.__dataclass_fields__
    if field in fields:
        return fields[field].default
    return getattr(fields["mos"].default_factory(), field)


def _default_targets() -> str:
    targets = _default("target_modules")
    return targets if isinstance(targets, str) else ",".join(targets)


# parentheses, not brackets: rich reads "[...]" in a help text as markup and drops it
_ADAPTER_BASE = typer.Option(None, "--model", callback=_model,
                             help="the adapter's base model (default: the one it records, else the "
                                  "embedded SmolLM2)")


@app.command()
def train(
    task: str = typer.Option(_default("task"),
                             help="sentiment | party | hamlet | chat, or a .jsonl/.csv file"),
    eval_file: Optional[str] = typer.Option(None, help="a .jsonl/.csv file to validate and test on "
                                                       "(then every example of --task trains)"),
    model: Optional[str] = typer.Option(None, callback=_model,
                                        help="local HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)"),
    output_dir: str = typer.Option(_default("output_dir"), help="run folder"),
    overwrite: bool = typer.Option(False, help="delete a previous run in --output-dir first"),
    resume: bool = typer.Option(False, help="resume from the run folder's last checkpoint"),
    method: str = typer.Option(_default("method"), help="mos, or lora for a PEFT LoRA run with the same settings"),
    targets: str = typer.Option(_default_targets(), help="comma-separated suffixes, all-linear, or re:<regex>"),
    rank: int = typer.Option(_default("rank"), min=1, help="per-layer rank r"),
    budget_rank: int = typer.Option(_default("budget_rank"), min=1,
                                    help="LoRA rank e whose parameter count MoS matches"),
    shards_per_vector: int = typer.Option(_default("shards_per_vector"), min=1,
                                          help="l: shards per rank vector (vector sharding)"),
    private_rank: int = typer.Option(_default("private_rank"), min=0,
                                     help="p: private ranks per layer (shard privatization)"),
    subset_selection: bool = typer.Option(_default("subset_selection"),
                                          help="route each layer to its own subset of the pool"),
    pair_dissociation: bool = typer.Option(_default("pair_dissociation"),
                                           help="route A and B shards independently"),
    alpha: float = typer.Option(_default("alpha"), min=0.0, callback=_finite,
                                help="update scale numerator (alpha / rank)"),
    dropout: float = typer.Option(_default("dropout"), min=0.0, max=0.99, callback=_finite,
                                  help="dropout on the adapter's input"),
    init: str = typer.Option(_default("init"), help="kaiming | gaussian (initialisation of the A side)"),
    max_steps: int = typer.Option(_default("max_steps"), min=1, help="optimizer steps to train"),
    batch_size: int = typer.Option(_default("batch_size"), min=1, help="examples per step and device"),
    grad_accum: int = typer.Option(_default("grad_accum"), min=1,
                                   help="batches accumulated into one optimizer step"),
    learning_rate: float = typer.Option(_default("learning_rate"), min=0.0, max=1.0, callback=_finite,
                                        help="peak AdamW learning rate"),
    lr_scheduler: str = typer.Option(_default("lr_scheduler"),
                                     help="learning-rate schedule: " + " | ".join(LR_SCHEDULERS)),
    warmup_ratio: float = typer.Option(_default("warmup_ratio"), min=0.0, max=0.99, callback=_finite,
                                       help="fraction of the steps spent warming up"),
    weight_decay: float = typer.Option(_default("weight_decay"), min=0.0, callback=_finite,
                                       help="AdamW weight decay"),
    max_grad_norm: float = typer.Option(_default("max_grad_norm"), min=0.0, callback=_finite,
                                        help="gradient clipping norm"),
    eval_steps: int = typer.Option(_default("eval_steps"), min=1, help="evaluate every N steps"),
    save_steps: Optional[int] = typer.Option(None, min=1, help="checkpoint every N steps, a multiple "
                                                              "of --eval-steps (default: --eval-steps)"),
    logging_steps: int = typer.Option(_default("logging_steps"), min=1,
                                      help="log (and show) the training loss every N steps"),
    train_examples: Optional[int] = typer.Option(None, min=1, help="cap on training examples (default: all)"),
    eval_examples: int = typer.Option(_default("eval_examples"), min=1,
                                      help="validation examples scored at each evaluation"),
    test_examples: int = typer.Option(_default("test_examples"), min=1,
                                      help="test examples scored after training"),
    max_length: int = typer.Option(_default("max_length"), min=MIN_LENGTH, help="tokens per example (prompt cut first)"),
    seed: int = typer.Option(_default("seed"), min=0, max=MAX_SEED,
                             help="seeds the splits, the routing and the training"),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16",
                                        help="compute in bfloat16 (needs a GPU that supports it) "
                                             "(default: when supported)"),
    gradient_checkpointing: bool = typer.Option(_default("gradient_checkpointing"),
                                                help="recompute activations to save memory"),
    load_in_4bit: bool = typer.Option(_default("load_in_4bit"), help="NF4 base (bitsandbytes), QLoRA style"),
) -> None:
    """Fine-tune an adapter on a task; writes adapter, metrics.json, config.json, loss.png."""
    from .train import train as run

    with _usage_errors():
        mos = MoSConfig(target_modules=_targets(targets), rank=rank, budget_rank=budget_rank,
                        shards_per_vector=shards_per_vector, private_rank=private_rank,
                        subset_selection=subset_selection, pair_dissociation=pair_dissociation,
                        alpha=alpha, dropout=dropout, init=init, seed=seed)
        cfg = TrainConfig(model=model, task=task, eval_file=eval_file, method=method, mos=mos,
                          output_dir=output_dir, max_steps=max_steps, batch_size=batch_size,
                          grad_accum=grad_accum, learning_rate=learning_rate, lr_scheduler=lr_scheduler,
                          warmup_ratio=warmup_ratio, weight_decay=weight_decay,
                          max_grad_norm=max_grad_norm, eval_steps=eval_steps, save_steps=save_steps,
                          logging_steps=logging_steps, train_examples=train_examples,
                          eval_examples=eval_examples, test_examples=test_examples,
                          max_length=max_length, seed=seed, bf16=bf16,
                          gradient_checkpointing=gradient_checkpointing, load_in_4bit=load_in_4bit,
                          resume=resume, overwrite=overwrite)
    with _config_errors():  # the run checks data and fit before loading the model
        result = run(cfg)
    typer.echo(json.dumps(result.metrics, indent=2, default=str))


@app.command("eval")
def evaluate_cmd(
    task: str = typer.Option(_default("task"), callback=_task, help="task name or .jsonl/.csv file"),
    model: Optional[str] = _ADAPTER_BASE,
    adapter: Optional[Path] = typer.Option(None, **_ADAPTER_DIR,
                                           help="an MoS adapter or exported PEFT LoRA directory"),
    examples: int = typer.Option(_default("test_examples"), min=1, help="test examples to score"),
    max_length: int = typer.Option(_default("max_length"), min=MIN_LENGTH, help="tokens per example"),
    batch_size: int = typer.Option(_default("batch_size"), min=1, help="examples per forward pass"),
    seed: int = typer.Option(_default("seed"), min=0, max=MAX_SEED, help="split seed (as in training)"),
) -> None:
    """Evaluate a base model, with or without an adapter, on a task's test split."""
    from .data import load_task
    from .scoring import evaluate

    net, tokenizer, base = _load_model(adapter, model)
    task_data = load_task(task, seed=seed)
    test = replace(task_data, train=[], validation=[], test=task_data.test[:examples])
    scores = evaluate(net, tokenizer, test, "test", max_length, batch_size)
    typer.echo(json.dumps({"task": task_data.name, "task_path": _task_path(task),
                           "examples": len(test.test), "model": base or "smollm2",
                           "adapter": str(adapter) if adapter else None, **scores}, indent=2))


def _task_path(task: str) -> Optional[str]:
    """A task file's absolute path (None for a built-in task)."""
    from .tasks import MEMORIZATION_TASKS, TASKS

    builtin = task in TASKS or task.partition(":")[0] in MEMORIZATION_TASKS
    return None if builtin else str(Path(task).resolve())


@app.command()
def generate(
    prompt: str = typer.Option(..., help="the user's message (sent through the chat template)"),
    adapter: Optional[Path] = typer.Option(None, **_ADAPTER_DIR,
                                           help="an MoS adapter or exported PEFT LoRA directory "
                                                "(default: none, the base alone)"),
    model: Optional[str] = _ADAPTER_BASE,
    max_new_tokens: int = typer.Option(64, min=1, max=4096, help="tokens to generate at most"),
) -> None:
    """Answer one prompt with a base model and, optionally, an adapter (greedy decoding)."""
    import torch

    from .tasks import Example
    from .tokenizing import format_example

    net, tokenizer, _ = _load_model(adapter, model)
    text, _ = format_example(tokenizer, Example(prompt, ""), end_turn=False)
    templated = bool(tokenizer.chat_template)  # a template writes its own special tokens
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not templated)
    device = next(net.parameters()).device
    with torch.no_grad():
        out = net.generate(**{k: v.to(device) for k, v in inputs.items()}, max_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id)
    typer.echo(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())


def _read_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` of an MoS or PEFT adapter as a dict ({} when unreadable: the MoS
    loader then explains what is wrong)."""
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _is_peft(path: Path) -> bool:
    """Whether ``path`` holds a PEFT adapter (its config names a ``peft_type``)."""
    return "peft_type" in _read_config(path)


def _adapter_base(adapter: Optional[Path], model: Optional[str]) -> Optional[str]:
    """``--model`` if given, else the base the adapter records, else None (the default)."""
    if model is not None or adapter is None:
        return model
    recorded = _read_config(adapter).get("base_model_name_or_path")
    if recorded is None:
        return None
    from .train_config import check_model

    try:
        check_model(recorded)
    except ConfigError:
        raise typer.BadParameter(f"the adapter {adapter} was trained on {recorded!r}, which is not "
                                 "here; pass that base with --model", param_hint="'--model'") from None
    return recorded


def _load_model(adapter: Optional[Path], model: Optional[str]):
    """(model with the adapter attached if any, tokenizer, the base's name) for ``adapter``'s base.

    An MoS adapter is checked before the base loads, so a broken one costs no loading time.
    """
    from .checkpoint import read_adapter_config
    from .base import load_base

    if adapter and not _is_peft(adapter):
        with _usage_errors("'--adapter'"):
            read_adapter_config(adapter)
    base_name = _adapter_base(adapter, model)
    base, tokenizer = load_base(base_name)
    with _usage_errors("'--adapter'"):
        net = attach_adapter(base, adapter) if adapter else base
    return net, tokenizer, base_name


def attach_adapter(base, path: Path):
    """An MoS adapter directory, or a PEFT one (told apart by ``peft_type`` in its config)."""
    if _is_peft(path):
        from peft import PeftModel

        from .noise import peft_calls

        with peft_calls():
            return PeftModel.from_pretrained(base, path)
    from .model import MoSModel

    return MoSModel.from_pretrained(base, path)


@app.command()
def info(
    path: Path = typer.Argument(..., **_ADAPTER_DIR, help="an MoS adapter directory"),
    as_json: bool = typer.Option(False, "--json", help="print everything the adapter records, as JSON"),
) -> None:
    """What an adapter holds (parameters, size, base, format) and whether its weights are intact.

    Exits with code 1 when the weights are corrupt.
    """
    from .checkpoint import CheckpointError, read_adapter_config, verify_adapter
    from .sizes import adapter_bytes

    with _usage_errors("path"):
        header = read_adapter_config(path)
    try:
        header, problem = verify_adapter(path), None
    except CheckpointError as err:
        problem = str(err)
    summary = {**header, "path": str(path), "bytes_on_disk": adapter_bytes(path),
               "integrity": problem or "ok"}
    typer.echo(json.dumps(summary, indent=2) if as_json else _info_text(summary))
    if problem:
        raise typer.Exit(code=1)


def _info_text(summary: dict[str, Any]) -> str:
    """The lines of ``moslora info``: what a user asks of an adapter first."""
    cfg, kinds = summary["config"], summary.get("kinds") or {}
    layers = sum(len(k.get("layers", ())) for k in kinds.values())
    lora = sum(len(k["layers"]) * cfg["rank"] * (k["d_in"] + k["d_out"]) for k in kinds.values())
    parameters = (f"{summary['parameters']:,} trainable (LoRA at the same rank r={cfg['rank']}: {lora:,})"
                  if "parameters" in summary else "unknown (the weights cannot be read)")
    targets = cfg["target_modules"]
    rows = [
        ("adapter", summary["path"]),
        ("format", f"{summary['format']} version {summary['format_version']}"),
        ("base", f"{summary['base_fingerprint'].get('architecture')}, "
                 f"{summary.get('base_model_name_or_path') or 'path not recorded'}"),
        ("targets", f"{', '.join(targets) if isinstance(targets, list) else targets} "
                    f"({len(kinds)} kinds, {layers} layers)"),
        ("rank", f"r={cfg['rank']} at the budget of LoRA e={cfg['budget_rank']} "
                 f"(shards per vector {cfg['shards_per_vector']}, private rank {cfg['private_rank']})"),
        ("parameters", parameters),
        ("size", f"{summary['bytes_on_disk']:,} bytes on disk"),
        ("integrity", summary["integrity"] if summary["integrity"] != "ok"
         else "ok (checksum, tensor names, shapes, dtypes, finite values, routing indices)"),
    ]
    return "\n".join(f"{name:<11} {value}" for name, value in rows)


def _load_mos(adapter: Path, model: Optional[str]):
    """The base model with the MoS adapter at ``adapter`` attached, and its tokenizer."""
    from .checkpoint import read_adapter_config
    from .model import MoSModel
    from .base import load_base

    with _usage_errors("adapter"):
        read_adapter_config(adapter)  # a broken adapter is reported before the base loads
    base, tokenizer = load_base(_adapter_base(adapter, model))
    with _usage_errors("adapter"):
        return MoSModel.from_pretrained(base, adapter), tokenizer


_DTYPES = ("float32", "bfloat16", "float16")


def _dtype(value: str) -> str:
    if value not in _DTYPES:
        raise typer.BadParameter(f"unknown dtype {value!r}; choose from {', '.join(_DTYPES)}")
    return value


def _check_new_directory(path: Path, overwrite: bool) -> None:
    """``checkpoint.check_new_directory`` as a usage error, before any model is loaded."""
    from .checkpoint import check_new_directory

    try:
        check_new_directory(path, overwrite)
    except (FileExistsError, NotADirectoryError) as err:
        raise typer.BadParameter(str(err).replace("overwrite=True (--overwrite)", "--overwrite"),
                                 param_hint="'out_dir'") from None


_OVERWRITE = typer.Option(False, "--overwrite", help="replace OUT_DIR if it already holds files")


@app.command()
def merge(
    adapter: Path = typer.Argument(..., **_ADAPTER_DIR, help="an MoS adapter directory"),
    out_dir: Path = typer.Argument(..., help="a new directory for the merged model"),
    model: Optional[str] = _ADAPTER_BASE,
    dtype: str = typer.Option("float32", callback=_dtype, help="dtype of the saved weights: "
                              + ", ".join(_DTYPES)),
    overwrite: bool = _OVERWRITE,
) -> None:
    """Fold an MoS adapter into its base (W += alpha/r B A) and save a plain Hugging Face model."""
    import torch

    from .atomic import atomic_directory

    _check_new_directory(out_dir, overwrite)
    mos, tokenizer = _load_mos(adapter, model)
    # cast after merging: the sum is taken at the base's own precision
    merged = mos.merge_and_unload().to(getattr(torch, dtype))
    # keep_others=False: an overwritten model must not keep the old one's extra weight shards
    with atomic_directory(out_dir, keep_others=False) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    typer.echo(f"wrote {out_dir}")


@app.command("export-peft")
def export_peft(
    adapter: Path = typer.Argument(..., **_ADAPTER_DIR, help="an MoS adapter directory"),
    out_dir: Path = typer.Argument(..., help="a new directory for the PEFT LoRA adapter"),
    model: Optional[str] = _ADAPTER_BASE,
    overwrite: bool = _OVERWRITE,
) -> None:
    """Materialize an MoS adapter as a standard PEFT LoRA adapter (rank r)."""
    from .checkpoint import export_peft_lora

    _check_new_directory(out_dir, overwrite)
    mos, _ = _load_mos(adapter, model)
    export_peft_lora(mos, out_dir, overwrite=overwrite)
    typer.echo(f"wrote {out_dir}")


@app.command("export-gguf")
def export_gguf(
    adapter: Path = typer.Argument(..., **_ADAPTER_DIR, help="an MoS adapter directory (of a Llama)"),
    out_gguf: Path = typer.Argument(..., help="the .gguf file to write (a llama.cpp LoRA adapter)"),
    model: Optional[str] = _ADAPTER_BASE,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT_GGUF if it exists"),
) -> None:
    """Materialize an MoS adapter as a llama.cpp LoRA adapter (GGUF, rank r), for a GGUF base."""
    from .checkpoint import read_adapter_config
    from .llamacpp import check_output_file, export_gguf, gguf_targets

    # everything that can be refused is refused before the base loads
    try:
        check_output_file(out_gguf, overwrite)
    except OSError as err:
        raise typer.BadParameter(str(err), param_hint="'out_gguf'") from None
    with _usage_errors("adapter"):
        fingerprint = read_adapter_config(adapter)["base_fingerprint"]
    try:
        gguf_targets(fingerprint)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="'adapter'") from None
    mos, _ = _load_mos(adapter, model)
    export_gguf(mos, out_gguf, overwrite=overwrite)
    typer.echo(f"wrote {out_gguf}")


@app.command()
def serve(
    adapters: Path = typer.Option(..., **_ADAPTER_DIR,
                                  help="root directory of MoS adapters (each subdirectory is one, loaded on "
                                       "its first request)"),
    model: Optional[str] = typer.Option(None, callback=_model,
                                        help="local HF folder or .gguf file (default: embedded SmolLM2)"),
    base: Optional[str] = typer.Option(None, callback=_model, hidden=True,
                                       help="deprecated name of --model"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port to listen on"),
    api_keys: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                            help="JSON file of keys (default: $MOSLORA_API_KEYS)"),
    max_resident_bytes: Optional[int] = typer.Option(
        None, min=0, help="bytes of adapters kept in memory; past it the least recently used are "
                          "unloaded (default: no limit)"),
    max_batch: int = typer.Option(16, min=1, help="rows per batched forward"),
    batch_window_ms: float = typer.Option(5.0, min=0.0, max=10_000.0, callback=_finite,
                                          help="how long to wait for more requests"),
    queue_size: int = typer.Option(256, min=1, help="pending requests before answering 503"),
    prompt_cache_mb: int = typer.Option(256, min=0, help="MiB of KV kept for repeated prompts, which then "
                                                         "skip their prefill (0: off)"),
    max_body_bytes: int = typer.Option(65_536, min=1, help="largest request body (else 413)"),
    max_prompt_chars: int = typer.Option(16_384, min=1, help="longest prompt in characters (else 400)"),
    max_prompt_tokens: int = typer.Option(1024, min=1, help="longest prompt in tokens (else 400)"),
    max_tokens: int = typer.Option(1024, min=1, help="largest max_tokens a request may ask (else 400)"),
    max_n: int = typer.Option(8, min=1, help="most choices (n) a request may ask (else 400)"),
    request_timeout: float = typer.Option(60.0, min=0.001, callback=_finite,
                                          help="seconds before a request is answered 504"),
    allow_runtime_adapters: bool = typer.Option(
        False, "--allow-runtime-adapters",
        help="add vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter (behind the \"*\" API key if "
             "one is set; else 404)"),
) -> None:
    """Serve every adapter under --adapters over the OpenAI API (/v1/chat/completions, /v1/completions),
    each loaded on its first request."""
    from .serving.server import ApiKeys, Limits, load_server

    if base is not None:
        if model is not None:
            raise typer.BadParameter("pass --model only (--base is its old name)", param_hint="'--base'")
        typer.echo("warning: --base is deprecated; use --model", err=True)
        model = base

    try:
        keys = ApiKeys.load(api_keys)
    except ValueError as err:  # not JSON, or not an object of non-empty keys
        raise typer.BadParameter(str(err), param_hint="--api-keys (or $MOSLORA_API_KEYS)") from None
    limits = Limits(max_body_bytes=max_body_bytes, max_prompt_chars=max_prompt_chars,
                    max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, max_n=max_n,
                    request_timeout=request_timeout)
    import uvicorn

    server = load_server(model, adapters, keys, max_resident_bytes, max_batch=max_batch,
                         batch_window=batch_window_ms / 1000, queue_size=queue_size, limits=limits,
                         allow_runtime_adapters=allow_runtime_adapters, prompt_cache_bytes=prompt_cache_mb * 2**20)
    uvicorn.run(server, host=host, port=port)


@app.command()
def demo(
    steps: int = typer.Option(_default("max_steps"), min=1, help="fine-tuning steps"),
    test_examples: int = typer.Option(_default("test_examples"), min=1, help="test reviews scored before and after"),
    output_dir: str = typer.Option(DEMO_DIR, help="run folder (a previous demo there is replaced)"),
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
