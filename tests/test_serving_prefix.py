"""The prompt cache: a repeated prompt skips its prefill and gets the same text; entries are
per model and per adapter weights, and stay within their byte budget."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_serving_scheduler import alone, root, running  # noqa: F401  (root: the adapters "a", "b")

from moslora.serving import BASE, MultiAdapterModel
from moslora.serving.decoding import Sampling
from moslora.serving.prefix import PromptCache, batch_cache, row_state
from moslora.serving.scheduler import Job, Scheduler
from benchmarks.loadtest import word_tokenizer


def state(columns: int, value: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A two-layer state of ``columns`` columns: (kv_heads 2, columns, head_dim 4), 32·columns bytes a layer."""
    return [(torch.full((2, columns, 4), value), torch.full((2, columns, 4), -value)) for _ in range(2)]


class Owner:  # stands for an adapter's pools (anything weakly referable)
    pass


def test_a_stored_prompt_is_found_for_its_model_and_weights_only():
    cache, pools = PromptCache(10_000), Owner()
    cache.put("a", [1, 2, 3], pools, state(2))
    cache.put(BASE, [1, 2, 3], None, state(2, 5.0))
    assert cache.get("a", [1, 2, 3], pools)[0][0].eq(1.0).all()
    assert cache.get(BASE, [1, 2, 3], None)[0][0].eq(5.0).all()
    assert cache.get("b", [1, 2, 3], pools) is None and cache.get("a", [1, 2], pools) is None
    assert cache.get("a", [1, 2, 3], Owner()) is None  # the name now serves other pools: stale
    assert cache.get("a", [1, 2, 3], pools) is None  # and it was dropped
    assert cache.summary() == {"entries": 1, "bytes": 256, "max_bytes": 10_000, "hits": 2, "misses": 4}


def test_an_unloaded_adapter_is_not_kept_alive_and_its_entries_miss():
    cache, pools = PromptCache(10_000), Owner()
    cache.put("a", [1, 2, 3], pools, state(2))
    del pools  # only the cache's weak reference is left
    assert cache.get("a", [1, 2, 3], Owner()) is None


def test_the_least_recently_used_entries_go_first_to_stay_within_budget():
    cache = PromptCache(3 * 256)  # three entries of two columns
    for i in range(3):
        cache.put(BASE, [i, 0, 0], None, state(2))
    assert cache.get(BASE, [0, 0, 0], None) is not None  # 0 is now the most recently used
    cache.put(BASE, [9, 0, 0], None, state(2))
    assert [cache.get(BASE, [i, 0, 0], None) is not None for i in (0, 1, 2, 9)] == [True, False, True, True]
    assert cache.bytes == 3 * 256 and len(cache) == 3
    cache.put(BASE, [8, 0, 0], None, state(8))  # larger than the whole budget: not stored, nothing evicted
    assert len(cache) == 3 and cache.get(BASE, [8, 0, 0], None) is None


def test_a_zero_budget_stores_nothing_and_a_negative_one_is_refused():
    cache = PromptCache(0)
    cache.put(BASE, [1, 2], None, state(1))
    assert len(cache) == 0
    with pytest.raises(ValueError, match="0 disables"):
        PromptCache(-1)


def test_row_states_round_trip_through_a_left_padded_cache():
    keys = torch.arange(2 * 2 * 5 * 3, dtype=torch.float32).view(2, 2, 5, 3)  # rows 2, heads 2, columns 5
    from transformers import DynamicCache

    prefill = DynamicCache(ddp_cache_data=[(keys, -keys)])
    short, long = row_state(prefill, 0, 3), row_state(prefill, 1, 5)  # prompts of 3 and 5 tokens
    assert torch.equal(short[0][0], keys[0, :, 2:4]) and torch.equal(long[0][1], -keys[1, :, :4])
    joined = batch_cache([short, long])
    assert joined.layers[0].keys.shape == (2, 2, 4, 3)
    assert joined.layers[0].keys[0, :, :2].eq(0).all()  # the shorter row is left-padded
    assert torch.equal(joined.layers[0].keys[0, :, 2:], keys[0, :, 2:4])


def served(scheduler, requests):
    """Submit ``(model, prompt, max_tokens)`` requests at once; their texts."""
    jobs = [Job(model, prompt, Sampling(max_tokens=n)) for model, prompt, n in requests]
    for job in jobs:
        scheduler.submit(job)
    return [job.future.result(timeout=60)[0].text for job in jobs]


def test_repeated_prompts_skip_their_prefill_and_get_the_same_text(root):
    mm = MultiAdapterModel(tiny_llama())
    for name in ("a", "b"):
        mm.load_adapter(name, root / name)
    scheduler = running(Scheduler(mm, word_tokenizer(), max_batch=8, batch_window=0.05))
    requests = [("a", [5, 9, 17, 4], 8), (BASE, [20, 21], 6), ("b", [7, 8, 9, 10, 11, 12], 5)]
    try:
        first = served(scheduler, requests)
        assert scheduler.prompts.summary()["hits"] == 0 and len(scheduler.prompts) == 3
        # the same prompts again, one new and a repeat on another adapter: hits join fresh rows
        again = served(scheduler, requests + [("a", [30, 31, 32], 7), ("b", [5, 9, 17, 4], 8)])
        assert scheduler.prompts.summary()["hits"] == 3
        expected = [alone(mm, *r) for r in requests + [("a", [30, 31, 32], 7), ("b", [5, 9, 17, 4], 8)]]
        mm.unload_adapter("b")  # "b" again, other weights: its entries no longer apply
        mm.load_adapter("b", root / "a")
        reloaded = served(scheduler, [("b", [7, 8, 9, 10, 11, 12], 5)])
        assert scheduler.prompts.summary()["hits"] == 3
    finally:
        scheduler.stop()
    assert first == expected[:3] and again == expected
    assert reloaded == [alone(mm, "b", [7, 8, 9, 10, 11, 12], 5)] != [expected[2]]  # now the weights of "a"
