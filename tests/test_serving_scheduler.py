"""Continuous batching (issue 18, part 2): a short request behind a long one finishes in a few
steps of its own; every request's greedy output equals the library's for it alone, whatever
joins or leaves the batch around it; an adapter unloaded mid-request fails only its rows; a
base whose KV cache cannot be merged row by row is refused clearly."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import LLAMA_KINDS, randomize_adapter, tiny_llama
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

from moslora import MoSConfig, get_mos_model
from moslora.serving import BASE, MultiAdapterModel, UnknownAdapterError
from moslora.serving.decoding import Sampling
from benchmarks.loadtest import word_tokenizer
from moslora.serving.scheduler import Batch, Job, Scheduler


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    for i, name in enumerate(("a", "b")):
        model = get_mos_model(tiny_llama(), MoSConfig(target_modules=LLAMA_KINDS, rank=4, budget_rank=2, seed=i))
        randomize_adapter(model, std=0.2, seed=i)
        model.save_pretrained(root / name)
    return root


@pytest.fixture
def mm(root):
    mm = MultiAdapterModel(tiny_llama())
    for name in ("a", "b"):
        mm.load_adapter(name, root / name)
    return mm


class NoEos:
    """The word tokenizer's decoding without an EOS token, so a request runs to its max_tokens."""

    pad_token_id, eos_token_id = 0, None

    def decode(self, ids, skip_special_tokens=True):
        return word_tokenizer().decode(ids, skip_special_tokens=skip_special_tokens)


def running(scheduler):
    scheduler.start()
    return scheduler


def alone(mm, model, prompt, max_tokens):
    """The library's greedy completion of ``prompt`` with ``model``, by itself (the oracle)."""
    out = mm.generate(torch.tensor([prompt]), adapter_names=[model], max_new_tokens=max_tokens, do_sample=False,
                      pad_token_id=0, eos_token_id=2)[0, len(prompt):].tolist()
    return word_tokenizer().decode(out[: out.index(2)] if 2 in out else out, skip_special_tokens=True)


def test_short_requests_behind_a_long_one_finish_in_a_few_steps(mm):
    scheduler = running(Scheduler(mm, NoEos(), max_batch=8, batch_window=0.0))
    try:
        steps = []  # one entry per token of the long request, appended by the worker thread
        long = Job("a", [5, 6, 7, 8], Sampling(max_tokens=200), on_text=lambda i, text: steps.append(time.perf_counter()))
        started = time.perf_counter()
        scheduler.submit(long)
        while len(steps) < 20:  # well under way
            time.sleep(0.001)
        shorts = [Job(model, prompt, Sampling(max_tokens=4))
                  for model, prompt in (("b", [9, 10]), (BASE, [11, 12, 13, 14, 15, 16]), ("a", [17]))]
        joined, finished = {}, {}
        for job in shorts:
            joined[id(job)] = len(steps)
            job.future.add_done_callback(lambda _, job=job: finished.setdefault(id(job), (len(steps), time.perf_counter())))
            scheduler.submit(job)
        submitted = time.perf_counter()
        for job in shorts:
            assert [c.tokens for c in job.future.result(timeout=60)] == [4]
        assert [(c.tokens, c.finish) for c in long.future.result(timeout=120)] == [(200, "length")]
        ended = time.perf_counter()
    finally:
        scheduler.stop()
    # counted in the long request's own steps: a short one joins at the next step and needs 4 tokens
    waited = [finished[id(job)][0] - joined[id(job)] for job in shorts]
    assert max(waited) <= 6, waited
    short = max(t for _, t in finished.values()) - submitted
    print(f"\nshort behind long: {short:.3f} s for the shorts, {ended - started:.3f} s for the long one, "
          f"{waited} of its steps; ratio {short / (ended - started):.3f}")
    assert short < 0.3 * (ended - started)


def test_outputs_equal_each_request_alone_as_requests_join_and_leave(mm):
    """Requests of different adapters and prompt lengths join at different steps (submitted from
    the worker thread when an earlier one streams its k-th token, so the steps are exact), some
    leave early, one has two choices; each text equals its greedy completion alone."""
    scheduler = Scheduler(mm, word_tokenizer(), max_batch=8, batch_window=0.0)
    plan = [  # (adapter, prompt, max_tokens, n, submitted when the previous request has this many tokens)
        ("a", [5, 9, 17, 4], 24, 1, None),
        ("b", [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], 6, 1, 2),  # a longer prompt: pads the running rows
        (BASE, [20], 14, 1, 1),                                       # a shorter one: padded to the batch
        ("a", [30, 31, 32], 10, 2, 3),
        ("b", [40, 41, 42, 43, 44], 5, 1, 6),                           # after "b" #1 left: its columns trimmed
    ]
    jobs: list[Job] = []

    def job(k):
        model, prompt, max_tokens, n, _ = plan[k]
        tokens = []

        def on_text(choice, text):  # one piece per token: no stop strings
            tokens.extend([text] if choice == 0 else [])
            if choice == 0 and k + 1 < len(plan) and len(tokens) == plan[k + 1][4]:
                scheduler.submit(job(k + 1))

        jobs.append(Job(model, prompt, Sampling(max_tokens=max_tokens), n=n, on_text=on_text))
        return jobs[-1]

    scheduler.submit(job(0))
    running(scheduler)
    try:
        deadline = time.monotonic() + 60
        while not all(j.future.done() for j in jobs):  # the last done future submits no other
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert len(jobs) == len(plan), "a request ended (EOS) before the next one was due"
        results = [j.future.result() for j in jobs]
    finally:
        scheduler.stop()
    for (model, prompt, max_tokens, n, _), choices in zip(plan, results):
        expected = alone(mm, model, prompt, max_tokens)
        assert [c.text for c in choices] == [expected] * n, (model, prompt)
    assert not scheduler.batch.rows


def test_an_adapter_unloaded_mid_request_fails_only_its_rows(mm):
    scheduler = Scheduler(mm, NoEos(), max_batch=8, batch_window=0.2)
    steps, unloading = [], threading.Thread(target=mm.unload_adapter, args=("b",))

    def on_text(choice, text):
        steps.append(text)
        if len(steps) == 3:  # the unload waits for the model between two calls
            unloading.start()

    keeps = Job("a", [5, 6, 7], Sampling(max_tokens=100), on_text=on_text)
    gone = Job("b", [8, 9], Sampling(max_tokens=100))
    for job in (keeps, gone):
        scheduler.submit(job)
    running(scheduler)
    try:
        with pytest.raises(UnknownAdapterError, match="'b'"):
            gone.future.result(timeout=60)
        assert keeps.future.result(timeout=60)[0].tokens == 100
    finally:
        scheduler.stop()
        unloading.join()


def test_a_batch_joins_and_trims_its_cache_by_the_mask():
    def cache(rows, length, fill):
        c = DynamicCache()
        c.update(torch.full((rows, 2, length, 3), fill), torch.full((rows, 2, length, 3), -fill), 0)
        return c

    batch = Batch()
    batch.join(["r0", "r1"], cache(2, 3, 1.0), torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.tensor([4, 5]))
    batch.join(["r2"], cache(1, 5, 2.0), torch.tensor([[0, 0, 1, 1, 1]]), torch.tensor([6]))
    keys = batch.cache.layers[0].keys
    assert keys.shape == (3, 2, 5, 3) and batch.mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert keys[0, 0, :, 0].tolist() == [0, 0, 1, 1, 1] and batch.last.tolist() == [4, 5, 6]
    batch.keep([0, 2])  # column 2 was only needed by r1: every column left of r2's prompt goes
    assert batch.rows == ["r0", "r2"] and batch.mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert batch.cache.layers[0].values[:, 0, :, 0].tolist() == [[-1, -1, -1], [-2, -2, -2]]
    batch.keep([])
    assert batch.rows == [] and batch.cache is None


def test_a_sliding_window_base_is_refused_clearly():
    torch.manual_seed(0)
    cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, sliding_window=4)
    scheduler = running(Scheduler(MultiAdapterModel(MistralForCausalLM(cfg).eval()), word_tokenizer()))
    try:
        job = scheduler.submit(Job(BASE, [5, 6], Sampling(max_tokens=2)))
        with pytest.raises(NotImplementedError, match="DynamicSlidingWindowLayer"):
            job.result(timeout=60)
    finally:
        scheduler.stop()


def test_stopping_answers_the_requests_still_running(mm):
    scheduler = running(Scheduler(mm, NoEos()))
    steps = []
    job = Job("a", [5, 6], Sampling(max_tokens=1000), on_text=lambda i, text: steps.append(text))
    scheduler.submit(job)
    while not steps:
        time.sleep(0.001)
    scheduler.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        job.future.result(timeout=1)
