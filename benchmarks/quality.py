"""Quality at matched parameter budgets (MoS vs PEFT LoRA, VeRA, VB-LoRA) and the ablation.

A thin wrapper around ``moslora.bench.quality`` (the same as ``moslora bench quality`` and
``moslora bench ablate``); see that module for what is trained and how. Writes
results/quality.json, results/ablation.json, their plots and results/runs.jsonl (the cache of
finished runs: run it again to resume). ``--quick`` writes under results/quick/.

    python benchmarks/quality.py [--quick] [--results DIR] [--tracks encoder,llm,capacity] [--no-ablation]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moslora.bench.quality import TRACKS, run_ablation, run_quality


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a minutes-long smoke run (one seed, few steps)")
    ap.add_argument("--results", type=Path, default=Path("results"), help="where the JSON and PNG go")
    ap.add_argument("--tracks", default=",".join(TRACKS), help="comma-separated: " + ", ".join(TRACKS))
    ap.add_argument("--no-ablation", action="store_true", help="skip the ablation")
    args = ap.parse_args()
    tracks = [t for t in args.tracks.split(",") if t]
    if unknown := set(tracks) - set(TRACKS):
        ap.error(f"unknown tracks {sorted(unknown)}; choose from {', '.join(TRACKS)}")
    run_quality(quick=args.quick, results_dir=args.results, tracks=tracks)
    if not args.no_ablation:
        run_ablation(quick=args.quick, results_dir=args.results)


if __name__ == "__main__":
    main()
