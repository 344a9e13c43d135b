"""Training step time and peak memory of MoS vs PEFT LoRA, and where MoS time goes.

A thin wrapper around ``moslora.bench.speed.run_speed`` (the same as ``moslora bench speed``);
see that module for what is measured. Writes results/speed.json and results/speed.png
(results/quick/ with --quick).

    python benchmarks/speed.py [--quick] [--results DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moslora.bench.speed import run_speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a minutes-long smoke run (one small model)")
    ap.add_argument("--results", type=Path, default=Path("results"), help="where the JSON and PNG go")
    args = ap.parse_args()
    run_speed(quick=args.quick, results_dir=args.results)


if __name__ == "__main__":  # the memory probes' worker processes import this module again
    main()
