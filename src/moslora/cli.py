"""The ``moslora`` command."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Mixture of Shards (MoS) adapters: demo, inspect, export.", no_args_is_help=True)


@app.command()
def demo(steps: int = typer.Option(30, min=1, help="training steps on the toy task")) -> None:
    """MoS on a small Llama: parameter report, merge, save/load and PEFT export checks."""
    from .demo import run_demo

    result = run_demo(steps=steps)
    bad = [k for k in ("merged_diff", "reload_diff", "peft_diff") if result[k] > 1e-5]
    if bad:
        raise typer.Exit(code=1)


@app.command()
def info(path: Path = typer.Argument(..., help="an MoS adapter directory")) -> None:
    """What an adapter holds: config, kinds, base fingerprint, size on disk."""
    from .checkpoint import read_adapter_config

    header = read_adapter_config(path)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    typer.echo(json.dumps({"config": header["config"], "kinds": header.get("kinds"),
                           "base_architecture": header["base_fingerprint"].get("architecture"),
                           "bytes_on_disk": size}, indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
