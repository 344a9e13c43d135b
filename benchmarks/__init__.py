"""Benchmarks behind ``moslora bench``: quality and ablations (quality.py), speed (speed.py),
plots and the README's Results section drawn from results/*.json (report.py)."""
