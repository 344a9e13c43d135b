"""The agreement measures of `make interop` (benchmarks/interop/agreement.py), without vLLM."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "interop" / "agreement.py"
_spec = importlib.util.spec_from_file_location("interop_agreement", _PATH)
agreement = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(agreement)


def test_same_tokens_and_first_divergence():
    ours, theirs = [[1, 2, 3], [4, 5, 6], [7, 8]], [[1, 2, 3], [4, 9, 6], [7, 8, 9]]
    assert agreement.same_tokens(ours, theirs) == [True, False, False]
    assert [agreement.first_divergence(a, b) for a, b in zip(ours, theirs)] == [None, 1, 2]
    with pytest.raises(ValueError):
        agreement.same_tokens(ours, theirs[:2])


def test_delta_agreement_separates_a_faithful_runtime_from_a_wrong_one():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(20, 50)).astype(np.float32)
    delta = 3 * rng.normal(size=base.shape).astype(np.float32)
    noise = lambda: 0.05 * rng.normal(size=base.shape).astype(np.float32)  # noqa: E731
    # another runtime whose base is slightly off (say quantized) but applies the same update
    same = agreement.delta_agreement(base, base + delta, base + noise(), base + delta + noise())
    assert same["delta_cosine"] > 0.99 and same["delta_relative_l2"] < 0.05
    assert same["top1_agreement"] > 0.9 and 0 < same["base_gap_relative"] < 0.05
    # one that applies another update (say q's rows in the wrong order)
    other = agreement.delta_agreement(base, base + delta, base, base + rng.permutation(delta))
    assert other["delta_cosine"] < 0.3 and other["delta_relative_l2"] > 1


def test_delta_agreement_refuses_an_adapter_that_does_nothing():
    base = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="does not change"):
        agreement.delta_agreement(base, base, base, base)
