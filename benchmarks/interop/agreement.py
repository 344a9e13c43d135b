"""How closely another runtime reproduces an adapter: the measures `make interop` reports.

Pure numpy, so the driver (main venv) computes them on what the runtimes (interop venv) wrote,
and the tests check them without vLLM or llama.cpp.
"""

from __future__ import annotations

import numpy as np


def same_tokens(ours: list[list[int]], theirs: list[list[int]]) -> list[bool]:
    """Per prompt, whether two greedy continuations are token for token identical."""
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} continuations against {len(theirs)}")
    return [list(a) == list(b) for a, b in zip(ours, theirs)]


def first_divergence(ours: list[int], theirs: list[int]) -> int | None:
    """The index of the first token where two continuations differ (None if they never do)."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def delta_agreement(ours_base: np.ndarray, ours_adapted: np.ndarray,
                    theirs_base: np.ndarray, theirs_adapted: np.ndarray) -> dict[str, float]:
    """How the adapter moves another runtime's logits compared with how it moves ours.

    Each array is ``(positions, vocab)``: the logits at every prompt position, without and
    with the adapter. The adapter's effect is the delta ``adapted − base`` on each side;
    returned are the cosine similarity and the relative L2 error ``|Δ_theirs − Δ_ours| /
    |Δ_ours|`` of the two deltas over all positions, the fraction of positions whose top-1
    token with the adapter agrees, and the noise floor ``|base_theirs − base_ours| /
    |Δ_ours|``: how far apart the two bases already are, in units of the adapter's effect.
    """
    ours = (ours_adapted - ours_base).astype(np.float64).ravel()
    theirs = (theirs_adapted - theirs_base).astype(np.float64).ravel()
    effect = np.linalg.norm(ours)
    if effect == 0:
        raise ValueError("the adapter does not change our logits: there is nothing to compare")
    base_gap = np.linalg.norm((theirs_base - ours_base).astype(np.float64))
    return {
        "delta_cosine": float(ours @ theirs / (effect * np.linalg.norm(theirs))),
        "delta_relative_l2": float(np.linalg.norm(theirs - ours) / effect),
        "top1_agreement": float(np.mean(ours_adapted.argmax(-1) == theirs_adapted.argmax(-1))),
        "base_gap_relative": float(base_gap / effect),
    }
