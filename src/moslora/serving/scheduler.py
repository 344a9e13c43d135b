"""Continuous (iteration-level) batching: a request joins the running batch at the next decoding
step and leaves it when it finishes.

One worker thread owns a ``Batch``: the rows being generated (one per choice of each request,
each with its own adapter), their KV cache (transformers' ``DynamicCache``) and an attention
mask over its columns. Every iteration

1. admits queued jobs into the free rows, first come first served, up to ``max_batch`` rows
   (an idle batch waits up to ``batch_window`` for company; a running one never waits);
2. prefills the new rows together (left-padded, one mixed-adapter call that stops after the
   first token); their cache joins the batch's: both are left-padded to a common length and
   concatenated on the batch dim, the padding masked out. A row whose prompt is in the prompt
   cache (``prefix``) skips the prefill and joins with the cached state instead;
3. decodes every row, each from its newest token at its own position, in one HF ``generate``
   call continuing from the batch's cache (``decoding.generate_rows``); the call pauses as
   soon as a row is done, a queued job fits in the free rows, or after ``STEPS_PER_CALL``
   steps, so an arrival joins at the next step;
4. answers the jobs whose rows are all done, drops their rows, and drops the leading cache
   columns that are padding for every row left.

Decoding runs in ``generate`` calls rather than one forward per step because each call of
``MultiAdapterModel`` sets every layer's per-row adapter factors once: per step, that setup
cost a third of the time on the tiny test model. A batch that arrives at once now costs two
calls (prefill, decode) where the window batcher this replaces made one.

So a short request that arrives behind a long one waits for one step and a prefill, not for the
long one, and a row's tokens are those it would get alone (up to float rounding of the batched
matmuls at a near tie): its positions and mask are its own, padding adds nothing.

Why not transformers' own continuous batching (``generate_batch``, ``init_continuous_batching``)?
It flattens every request into one ragged row, ``input_ids: (1, tokens)`` with ``cu_seq_lens``,
over a paged cache, and calls the model itself. ``MultiAdapterModel`` routes adapters per batch
row, so that one row would get one adapter; its sampling is one setting for the whole manager,
not a generator per row; and stop strings on decoded text, streaming per choice and dropping
abandoned rows would all sit outside it. Its paged attention pays off on GPUs (CUDA graphs,
flash kernels); on CPU the dynamic cache costs the same per step. What is used of transformers:
``generate`` with its logits-processor and stopping-criterion hooks, and ``DynamicCache``
(``batch_select_indices`` to drop rows; its layers' ``keys``/``values`` padded, concatenated
and sliced to merge and trim).
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .decoding import RowDecoder, Sampling, generate_rows
from .multi import BASE, MultiAdapterModel, UnknownAdapterError
from .prefix import PromptCache, batch_cache, left_pad, row_state

STEPS_PER_CALL = 16
"""Most decoding steps per ``generate`` call. Loading or unloading an adapter waits for the
model between calls, so this bounds its wait; a call's fixed cost (routing every adapter
layer) is then paid at most once per this many steps."""


PROMPT_CACHE_BYTES = 256 * 2**20
"""The default budget of the prompt cache (``prefix.PromptCache``): ~90 SmolLM2 prompts of
64 tokens (2.9 MB each)."""


def servable(model: MultiAdapterModel) -> set[str]:
    """Every model name a request may ask for: the base and each adapter ``model`` serves."""
    return {BASE, *model.available()}


@dataclass(frozen=True)
class Choice:
    """One finished choice: its visible text, how many tokens it generated, and why it ended."""

    text: str
    tokens: int
    finish: str


@dataclass
class Job:
    """One request waiting in the queue, ``n`` rows; the worker answers it through ``future``
    (one ``Choice`` per row) and, if ``on_text`` is set, streams ``(choice, new text)`` to it
    from the worker thread while it generates."""

    model: str
    prompt_ids: list[int]
    sampling: Sampling
    n: int = 1
    on_text: Callable[[int, str], None] | None = None
    future: Future = field(default_factory=Future)
    abandoned: threading.Event = field(default_factory=threading.Event)


@dataclass
class Task:
    """A job once admitted: one ``RowDecoder`` per choice."""

    job: Job
    decoders: list[RowDecoder]

    def done(self) -> bool:
        return all(d.finish is not None for d in self.decoders)

    def choices(self) -> list[Choice]:
        return [Choice(d.text, len(d.tokens), d.finish) for d in self.decoders]


class Row(NamedTuple):
    """One batch row: a choice of a task."""

    task: Task
    decoder: RowDecoder


# ---------------------------------------------------------------------------- the batch


class Batch:
    """The running rows and their KV state.

    ``rows``: R rows; ``cache``: per layer, keys and values ``(R, kv_heads, T, head_dim)``;
    ``mask: (R, T)``, 1 where a cache column holds a real token of that row (rows are
    left-padded); ``last: (R,)``, each row's newest token, fed at the next step (so not yet in
    the cache). A row's next position is its count of real columns.
    """

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.last = torch.zeros(0, dtype=torch.long)

    def tasks(self) -> list[Task]:
        return list({id(row.task): row.task for row in self.rows}.values())

    def join(self, rows: list[Row], cache: DynamicCache, mask: Tensor, last: Tensor) -> None:
        """Add freshly prefilled ``rows`` with their ``cache``, ``mask: (k, L)`` and ``last: (k,)``."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.last = rows, cache, mask, last
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([left_pad(old.keys, width, -2), left_pad(new.keys, width, -2)])
            old.values = torch.cat([left_pad(old.values, width, -2), left_pad(new.values, width, -2)])
        self.mask = torch.cat([left_pad(self.mask, width, -1), left_pad(mask, width, -1)])
        self.rows, self.last = self.rows + rows, torch.cat([self.last, last])

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at ``indices``, then drop the columns that are padding for all of them."""
        if not indices:
            self.__init__()
            return
        if len(indices) < len(self.rows):
            self.cache.batch_select_indices(torch.tensor(indices, device=self.mask.device))
            self.rows = [self.rows[i] for i in indices]
            self.mask, self.last = self.mask[indices], self.last[indices]
        lead = int(self.mask.any(0).int().argmax())  # the first column some row still needs
        if lead:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
            self.mask = self.mask[:, lead:]


def _dynamic(cache: Any) -> DynamicCache:
    """The cache a prefill returned, if its rows can be merged and trimmed column by column."""
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not all(type(layer) is DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise NotImplementedError(
            "continuous batching needs a base with full attention in every layer, whose KV cache is "
            f"transformers' DynamicCache of DynamicLayer; this base's cache holds {kinds} "
            "(sliding-window, linear-attention and static caches are not supported)"
        )
    return cache


# ---------------------------------------------------------------------------- the scheduler


class Scheduler:
    """A bounded queue and the worker thread that answers it by continuous batching."""

    def __init__(self, model: MultiAdapterModel, tokenizer: Any, max_batch: int = 16, batch_window: float = 0.005,
                 queue_size: int = 256, prompt_cache_bytes: int = PROMPT_CACHE_BYTES) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.prompts = PromptCache(prompt_cache_bytes)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.max_batch, self.batch_window = max_batch, batch_window
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.batch = Batch()
        self._held: Job | None = None  # taken from the queue, waits for free rows
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_flight: Counter[str] = Counter()  # per model: jobs submitted, not yet answered
        self._in_flight_lock = threading.Lock()  # submits come from the server, answers from the worker

    def submit(self, job: Job) -> Future:
        """Queue ``job``; raises ``queue.Full`` when the queue is at capacity."""
        self.queue.put_nowait(job)
        with self._in_flight_lock:
            self._in_flight[job.model] += 1
        job.future.add_done_callback(functools.partial(self._answered, job.model))
        return job.future

    def in_flight(self, model: str) -> int:
        """How many submitted jobs for ``model`` are not answered yet (queued or running)."""
        with self._in_flight_lock:
            return self._in_flight[model]

    def _answered(self, model: str, _: Future) -> None:
        with self._in_flight_lock:
            self._in_flight[model] -= 1
            if not self._in_flight[model]:
                del self._in_flight[model]

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="moslora-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            tasks = self._admit()
            try:
                if tasks:
                    self._prefill(tasks)
                if self.batch.rows:
                    self._decode()
            except Exception as err:  # every waiting client must get an answer, whatever went wrong
                _fail(tasks + self.batch.tasks(), err)
                self.batch = Batch()
        stopped = RuntimeError("the server stopped before answering")
        _fail(self.batch.tasks(), stopped)
        if self._held is not None and self._held.future.set_running_or_notify_cancel():
            self._held.future.set_exception(stopped)

    def _admit(self) -> list[Task]:
        """The queued jobs that start now, in order, as many as fit in the free rows (a job of
        more than ``max_batch`` rows starts alone). An idle batch waits for a first job (0.1 s
        at a time, to notice ``stop``), then ``batch_window`` for more; a running one takes only
        what is queued already."""
        idle = not self.batch.rows
        free = self.max_batch - len(self.batch.rows)
        tasks: list[Task] = []
        deadline: float | None = None
        while True:
            if self._held is None:
                wait = 0.1 if deadline is None else deadline - time.monotonic()
                try:
                    self._held = self.queue.get(timeout=wait) if idle and wait > 0 else self.queue.get_nowait()
                except queue.Empty:
                    return tasks
            job = self._held
            if job.n > free and (tasks or not idle):
                return tasks
            self._held = None
            if not job.future.set_running_or_notify_cancel():  # its client gave up while it was queued
                continue
            tasks.append(self._task(job))
            free -= job.n
            if deadline is None:
                deadline = time.monotonic() + self.batch_window

    def _task(self, job: Job) -> Task:
        return Task(job, [RowDecoder(job.sampling, i, self._decode_text, self.tokenizer.eos_token_id,
                                     None if job.on_text is None else functools.partial(job.on_text, i),
                                     job.abandoned.is_set) for i in range(job.n)])

    def _prefill(self, tasks: list[Task]) -> None:
        """Run the new rows' prompts, left-padded into one mixed batch, take each row's first
        token, and join the rows to the batch. A row whose prompt is in the prompt cache skips
        this: it joins with the cached state and its prompt's last token still to feed, so its
        first token comes from the next decoding step."""
        tasks = self._drop_unservable(tasks)
        if not tasks:
            return
        rows = [Row(task, d) for task in tasks for d in task.decoders]
        states = [self._stored(row) for row in rows]
        fresh = [row for row, state in zip(rows, states) if state is None]
        if fresh:
            prompts = [row.task.job.prompt_ids for row in fresh]
            ids, mask = self._left_padded(prompts, self.pad_id), self._left_padded([[1] * len(p) for p in prompts], 0)
            try:
                new, cache = self._generate(fresh, ids, mask, pause=lambda: True)
            except UnknownAdapterError:  # an adapter went away since the check above: again without it
                kept = self._drop_unservable(tasks)
                if len(kept) == len(tasks):
                    raise
                return self._prefill(kept)
            cache = _dynamic(cache)
            for i, row in enumerate(fresh):
                self.prompts.put(row.task.job.model, prompts[i], self._owner(row.task.job.model),
                                 row_state(cache, i, len(prompts[i])))
            self.batch.join(fresh, cache, mask, new[:, -1])
        hits = [(row, state) for row, state in zip(rows, states) if state is not None]
        if hits:
            prompts = [row.task.job.prompt_ids for row, _ in hits]
            mask = self._left_padded([[1] * (len(p) - 1) for p in prompts], 0)
            last = torch.tensor([p[-1] for p in prompts], device=mask.device)
            self.batch.join([row for row, _ in hits], batch_cache([state for _, state in hits]), mask, last)
        self._retire()

    def _stored(self, row: Row) -> list[tuple[Tensor, Tensor]] | None:
        """The prompt cache's state for this row's prompt and model, if it has one."""
        model = row.task.job.model
        if model != BASE and model not in self.model.adapter_pools:  # not resident: nothing cached is current
            return None
        return self.prompts.get(model, row.task.job.prompt_ids, self._owner(model))

    def _owner(self, model: str) -> Any:
        """What a cached state of ``model`` was computed with: its resident pools (None: the base)."""
        return None if model == BASE else self.model.adapter_pools[model]

    def _left_padded(self, rows: list[list[int]], pad: int) -> Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self._device())

    def _decode(self) -> None:
        """Decode every row, each from its newest token, until a row is done, a queued job could
        join, or ``STEPS_PER_CALL`` steps."""
        batch = self.batch
        ids = F.pad(batch.last[:, None], (batch.mask.shape[1], 0), value=self.pad_id)  # the cache holds all but the last
        mask = F.pad(batch.mask, (0, 1), value=1)
        steps = itertools.count(1)

        def pause() -> bool:
            return next(steps) >= STEPS_PER_CALL or self._joinable()

        try:
            new, batch.cache = self._generate(batch.rows, ids, mask, cache=batch.cache, pause=pause)
        except UnknownAdapterError:  # an adapter was unloaded while its rows ran: they end, the rest go on
            tasks = batch.tasks()
            kept = {id(task) for task in self._drop_unservable(tasks)}
            if len(kept) == len(tasks):
                raise
            batch.keep([i for i, row in enumerate(batch.rows) if id(row.task) in kept])
            return
        batch.mask = F.pad(mask, (0, new.shape[1] - 1), value=1)  # the new tokens but the last are cached
        batch.last = new[:, -1]
        self._retire()

    def _generate(self, rows: list[Row], ids: Tensor, mask: Tensor, **kwargs: Any) -> tuple[Tensor, Any]:
        return generate_rows(self.model, ids, mask, [row.task.job.model for row in rows],
                             [row.decoder for row in rows], self.pad_id, self.tokenizer.eos_token_id, **kwargs)

    def _joinable(self) -> bool:
        """Whether a running call should pause: a queued job fits in the free rows, or ``stop``."""
        free = self.max_batch - len(self.batch.rows)
        if self._held is not None:
            return self._held.n <= free or self._stop.is_set()
        return (free > 0 and not self.queue.empty()) or self._stop.is_set()

    def _retire(self) -> None:
        """Answer the jobs whose rows are all done, and drop the finished rows."""
        rows = self.batch.rows
        for task in {id(r.task): r.task for r in rows if r.decoder.finish is not None}.values():
            if task.done():
                task.job.future.set_result(task.choices())
        self.batch.keep([i for i, row in enumerate(rows) if row.decoder.finish is None])

    def _drop_unservable(self, tasks: list[Task]) -> list[Task]:
        """``tasks`` whose model is still served; the others fail (404 for their client)."""
        names = servable(self.model)
        for task in (t for t in tasks if t.job.model not in names):
            task.job.future.set_exception(UnknownAdapterError(f"no adapter named {task.job.model!r} is loaded"))
        return [t for t in tasks if t.job.model in names]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def _fail(tasks: list[Task], err: Exception) -> None:
    for task in tasks:
        if not task.job.future.done():
            task.job.future.set_exception(err)
