"""Per-row decoding: in a served batch each row has its own sampling, stop strings and stream.

A served batch mixes rows of different requests, and the ``n`` choices of one request are a
row each. The scheduler (``scheduler``) runs the batch with HF ``generate`` calls
(``generate_rows``), which sample all rows from one global RNG with one temperature, so each
call runs greedy and two hooks hand every row to its own ``RowDecoder``:

- ``_Pick`` (a logits processor): a sampling row draws its token with its own generator
  (temperature, top-p) and every other token is masked, so greedy's argmax takes the draw; a
  greedy row's logits pass unchanged;
- ``_Feed`` (a stopping criterion): each row gets its new token, decodes its text, looks for
  its stop strings, streams the text that is safe to show and says when it is done; the call
  ends when a row is done (so the scheduler can drop it) or the scheduler wants to pause it
  (to let new requests join).

A row's draws depend only on its own seed and logits, so a seed gives the same text whatever
else shares the batch (up to float rounding of the batched matmuls at a near tie).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from transformers import Cache, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .multi import MultiAdapterModel


@dataclass(frozen=True)
class Sampling:
    """How one request is decoded. ``temperature == 0`` is greedy (``top_p`` and ``seed``
    then do nothing); choice ``i`` of a request with a seed draws with ``seed + i``."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


class RowDecoder:
    """One row (one choice of one request) while it is generated.

    ``text`` is the visible completion so far: decoded, and cut before a stop string.
    ``finish`` becomes ``"stop"`` (EOS or a stop string), ``"length"`` (``max_tokens``) or
    ``"abandoned"`` (``abandoned()`` turned true: nobody waits for the answer any more).
    ``on_text`` receives each new piece of ``text`` that can no longer change: text that
    might be the start of a stop string, or an incomplete UTF-8 character, is held back.
    """

    def __init__(self, sampling: Sampling, choice: int, decode: Callable[[list[int]], str],
                 eos_id: int | None, on_text: Callable[[str], None] | None = None,
                 abandoned: Callable[[], bool] = lambda: False) -> None:
        self.sampling, self.decode, self.eos_id = sampling, decode, eos_id
        self.on_text, self.abandoned = on_text, abandoned
        self.generator: torch.Generator | None = None
        if sampling.temperature > 0:
            self.generator = torch.Generator()
            if sampling.seed is None:
                self.generator.seed()  # a fresh random seed
            else:
                self.generator.manual_seed((sampling.seed + choice) % 2**64)
        self.tokens: list[int] = []
        self.text = ""
        self.finish: str | None = None
        self._shown = 0  # characters of text already given to on_text

    def pick(self, logits: Tensor) -> Tensor:
        """``logits: (vocab,)`` -> what greedy's argmax should see: unchanged for a greedy row,
        else ``-inf`` everywhere but the token this row draws."""
        if self.generator is None or self.finish is not None:
            return logits
        probs = torch.softmax(logits / self.sampling.temperature, dim=-1)
        if self.sampling.top_p < 1.0:  # keep the smallest top set whose mass reaches top_p
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs >= self.sampling.top_p
            probs = probs.scatter(0, order[outside], 0.0)
        token = torch.multinomial(probs, 1, generator=self.generator)
        return torch.full_like(logits, float("-inf")).scatter_(0, token, 0.0)

    def push(self, token: int) -> None:
        """Take the row's next token (ignored once the row is done)."""
        if self.finish is not None:
            return
        if self.abandoned():
            self.finish = "abandoned"
            return
        if token == self.eos_id:
            self.finish = "stop"
        else:
            self.tokens.append(token)
            self.text = self.decode(self.tokens)
            cut = min((i for i in (self.text.find(s) for s in self.sampling.stop) if i >= 0), default=None)
            if cut is not None:
                self.text, self.finish = self.text[:cut], "stop"
            elif len(self.tokens) >= self.sampling.max_tokens:
                self.finish = "length"
        self._stream()

    def _stream(self) -> None:
        if self.on_text is None:
            return
        safe = self.text if self.finish else self.text[: len(self.text) - self._held_back()]
        # a decoder may rewrite earlier text (e.g. clean-up of spaces); what was sent stays sent
        if len(safe) > self._shown and safe.startswith(self.text[: self._shown]):
            self.on_text(safe[self._shown:])
            self._shown = len(safe)

    def _held_back(self) -> int:
        """How many trailing characters of ``text`` may still change: an incomplete UTF-8
        character (decoded as U+FFFD), or the longest suffix that starts a stop string."""
        text = self.text
        replacement = len(text) - len(text.rstrip("\ufffd"))
        prefix = max((k for s in self.sampling.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return max(replacement, prefix)


class _Pick(LogitsProcessor):
    def __init__(self, rows: Sequence[RowDecoder]) -> None:
        self.rows = rows

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return torch.stack([row.pick(s) for row, s in zip(self.rows, scores)])


class _Feed(StoppingCriteria):
    def __init__(self, rows: Sequence[RowDecoder], pause: Callable[[], bool]) -> None:
        self.rows, self.pause = rows, pause

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: object) -> Tensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            row.push(token)
        stop = any(row.finish is not None for row in self.rows) or self.pause()
        return torch.full((len(self.rows),), stop, device=input_ids.device)


def generate_rows(model: MultiAdapterModel, ids: Tensor, mask: Tensor, adapters: Sequence[str],
                  rows: Sequence[RowDecoder], pad_id: int, eos_id: int | None, cache: Cache | None = None,
                  pause: Callable[[], bool] = lambda: False) -> tuple[Tensor, Cache]:
    """Generate for left-padded rows ``ids: (rows, T)`` (``mask: (rows, T)``, 1 = real token),
    row ``i`` with adapter ``adapters[i]``, decoded by ``rows[i]``; with ``cache`` holding the
    first ``T - 1`` columns already, only the last is run.

    One HF ``generate`` call, until a row is done or, after any token, ``pause()`` says so.
    Returns the ``(rows, k)`` new tokens and the cache, which holds every column but the last
    new token's (the next call feeds it).
    """
    out = model.generate(
        ids, attention_mask=mask, adapter_names=list(adapters), cache=cache, do_sample=False,
        max_new_tokens=max(row.sampling.max_tokens - len(row.tokens) for row in rows), pad_token_id=pad_id,
        eos_token_id=eos_id, logits_processor=LogitsProcessorList([_Pick(rows)]),
        stopping_criteria=StoppingCriteriaList([_Feed(rows, pause)]), return_dict_in_generate=True,
    )
    return out.sequences[:, ids.shape[1]:], out.cache
