"""Scoring: every metric is one routine, ``completion_logprobs``, the log-likelihood of each
example's completion. Loss and perplexity average it over tokens; classification compares it
across the label words (no free generation); memorization reads greedy exact match off the
same pass (``answer_scores``)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterator

import torch

from . import memorization
from .tasks import MEMORIZATION_TASKS, Example, Task
from .tokenizing import IGNORE_INDEX, answer_window, collate, tokenize_example


def _forward_batches(model, tokenizer, examples: list[Example], max_length: int, batch_size: int,
                     end_turn: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) per batch of tokenized ``examples``, in eval mode without gradients,
    both cut to ``answer_window`` (left padding, so that window is short); the model's mode
    is restored afterwards. Gradients are off around the forward only, not across the
    ``yield`` (grad mode is thread state and would leak into the caller)."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    try:
        for start in range(0, len(examples), batch_size):
            features = [tokenize_example(tokenizer, e, max_length, end_turn)
                        for e in examples[start:start + batch_size]]
            batch = answer_window(collate(features, pad_id, "left"))
            labels = batch.pop("labels").to(device)
            with torch.no_grad():
                logits = model(**{k: v.to(device) if torch.is_tensor(v) else v
                                  for k, v in batch.items()}).logits
            yield logits, labels
    finally:
        model.train(was_training)


def completion_logprobs(model, tokenizer, examples: list[Example], max_length: int = 256,
                        batch_size: int = 8, end_turn: bool = True) -> list[tuple[float, int]]:
    """Per example: (sum of the log-probabilities of its completion tokens, their count).

    ``end_turn`` as in ``format_example``. Runs in eval mode (no dropout) and restores the
    model's mode afterwards. The result does not depend on ``batch_size`` (padding gets its
    own position ids and no attention).
    """
    results = []
    for logits, labels in _forward_batches(model, tokenizer, examples, max_length, batch_size, end_turn):
        sums, counts = _completion_sums(logits, labels)
        results += zip(sums.tolist(), counts.tolist())
    return results


def _completion_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a batch: the summed log-probability of its completion tokens, their count."""
    # position t predicts token t + 1
    targets, scored = labels[:, 1:], labels[:, 1:] != IGNORE_INDEX
    logprobs = torch.log_softmax(logits[:, :-1][scored].float(), dim=-1)
    token_lp = logprobs.gather(1, targets[scored].unsqueeze(1)).squeeze(1)
    sums = torch.zeros(len(labels), device=labels.device)
    sums.index_add_(0, scored.nonzero()[:, 0], token_lp)
    return sums, scored.sum(1)


def _greedy_exact(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: whether greedy decoding from the prompt writes exactly its completion.

    Under teacher forcing, every completion token being its position's argmax is the same
    as greedy decoding reproducing the completion (by induction over its tokens), so one
    pass answers it without generating."""
    targets, scored = labels[:, 1:], labels[:, 1:] != IGNORE_INDEX
    wrong = (logits[:, :-1].argmax(-1) != targets) & scored
    return ~wrong.any(1)


def answer_scores(model, tokenizer, examples: list[Example], max_length: int = 256,
                  batch_size: int = 16) -> list[tuple[float, int, bool]]:
    """Per example: (log-probability of its completion, its token count, greedy exact match),
    from one teacher-forced pass without the end of turn (the bare answer, as for scoring)."""
    results = []
    for logits, labels in _forward_batches(model, tokenizer, examples, max_length, batch_size, False):
        sums, counts = _completion_sums(logits, labels)
        results += zip(sums.tolist(), counts.tolist(), _greedy_exact(logits, labels).tolist())
    return results


def completion_loss(model, tokenizer, examples: list[Example], max_length: int = 256,
                    batch_size: int = 8) -> float:
    """Mean negative log-likelihood per completion token over ``examples``."""
    scores = completion_logprobs(model, tokenizer, examples, max_length, batch_size)
    tokens = sum(n for _, n in scores)
    if tokens == 0:
        raise ValueError("no completion tokens to score (empty examples or max_length too small)")
    return -sum(lp for lp, _ in scores) / tokens


def perplexity(model, tokenizer, texts: list[str], max_length: int = 1024,
               batch_size: int = 1) -> float:
    """exp(mean token NLL) of plain texts, each cut to its first ``max_length`` tokens."""
    examples = [Example("", text) for text in texts]
    return math.exp(completion_loss(model, tokenizer, examples, max_length, batch_size))


def predict_labels(model, tokenizer, examples: list[Example], label_words: list[str],
                   max_length: int = 256, batch_size: int = 8) -> list[int]:
    """For each example, the index of the label word the model finds most likely as answer.

    Each word is scored by its log-likelihood as the whole answer, without the end of turn:
    how the model would go on after the word is no evidence for or against it.
    """
    word_ids = _one_token_words(tokenizer, examples, label_words, max_length)
    if word_ids is not None:
        return _predict_single_tokens(model, tokenizer, examples, word_ids, label_words[0],
                                      max_length, batch_size)
    candidates = [replace(e, completion=word) for e in examples for word in label_words]
    scores = completion_logprobs(model, tokenizer, candidates, max_length, batch_size,
                                 end_turn=False)
    k = len(label_words)
    return [max(range(k), key=lambda j: scores[i * k + j][0]) for i in range(len(examples))]


def _predict_single_tokens(model, tokenizer, examples: list[Example], word_ids: list[int],
                           first_word: str, max_length: int, batch_size: int) -> list[int]:
    """``predict_labels`` when every label word is one token: one forward per example.

    Causality makes the logits before the answer the same whichever one-token word follows,
    and every candidate truncates the prompt alike, so the prompt + first word pass scores
    all words at once, exactly as one pass per word would.
    """
    candidates = [replace(e, completion=first_word) for e in examples]
    predictions: list[int] = []
    for logits, labels in _forward_batches(model, tokenizer, candidates, max_length, batch_size, False):
        predictions += _answer_choices(logits, labels, word_ids)
    return predictions


def _one_token_words(tokenizer, examples: list[Example], label_words: list[str],
                     max_length: int) -> list[int] | None:
    """The label words' token ids when one pass can score them all (each is one token and
    every example has a prompt to condition on), else None."""
    word_ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in label_words]
    if max_length > 1 and all(len(ids) == 1 for ids in word_ids) and all(e.prompt for e in examples):
        return [ids[0] for ids in word_ids]
    return None


def _answer_choices(logits: torch.Tensor, labels: torch.Tensor, word_ids: list[int]) -> list[int]:
    """Per row: which of the one-token ``word_ids`` the logits before its answer favour."""
    before_answer = (labels[:, 1:] != IGNORE_INDEX).float().argmax(1)  # predicts the 1st answer token
    scores = logits[torch.arange(len(labels)), before_answer][:, torch.tensor(word_ids, device=logits.device)]
    return scores.float().argmax(1).tolist()


def classification_accuracy(model, tokenizer, examples: list[Example], label_words: list[str],
                            max_length: int = 256, batch_size: int = 8) -> float:
    """Fraction of ``examples`` whose most likely label word is their label."""
    _check_labelled(examples)
    predictions = predict_labels(model, tokenizer, examples, label_words, max_length, batch_size)
    return sum(p == e.label for p, e in zip(predictions, examples)) / len(examples)


def _check_labelled(examples: list[Example]) -> None:
    if not examples or any(e.label is None for e in examples):
        raise ValueError("classification needs labelled examples")


def classification_metrics(model, tokenizer, examples: list[Example], label_words: list[str],
                           max_length: int = 256, batch_size: int = 8) -> dict[str, float]:
    """``accuracy`` (as ``classification_accuracy``) and ``loss`` (as ``completion_loss``).

    When every label word is one token, one forward pass per batch gives both: by causality
    the logits before the answer score every word whatever completion follows, so the pass
    that scores the example's own completion also predicts its label. The prompt is then cut
    to leave room for the whole completion, end of turn included: over ``max_length`` tokens
    it may lose a token or two more than ``classification_accuracy`` cuts from it.
    """
    _check_labelled(examples)
    word_ids = _one_token_words(tokenizer, examples, label_words, max_length)
    if word_ids is None:
        return {"accuracy": classification_accuracy(model, tokenizer, examples, label_words,
                                                    max_length, batch_size),
                "loss": completion_loss(model, tokenizer, examples, max_length, batch_size)}
    choices: list[int] = []
    logprob, tokens = 0.0, 0
    for logits, labels in _forward_batches(model, tokenizer, examples, max_length, batch_size, True):
        choices += _answer_choices(logits, labels, word_ids)
        sums, counts = _completion_sums(logits, labels)
        logprob, tokens = logprob + float(sums.sum()), tokens + int(counts.sum())
    correct = sum(c == e.label for c, e in zip(choices, examples))
    return {"accuracy": correct / len(examples), "loss": -logprob / tokens}


def evaluate(model, tokenizer, task: Task, split: str = "test", max_length: int = 256,
             batch_size: int = 8) -> dict[str, float]:
    """The task's metric on one split: accuracy for classification; exact match, loss and
    bits (facts) for memorization, with the control's; else loss and perplexity."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"unknown split {split!r}: use 'train', 'validation' or 'test'")
    examples = getattr(task, split)
    if task.name.partition(":")[0] in MEMORIZATION_TASKS:
        scores = memorization.metrics(answer_scores(model, tokenizer, examples, max_length, batch_size),
                                      task.chance_nll)
        if task.control:  # what the adapter did to facts of the same kind it never saw
            control = answer_scores(model, tokenizer, task.control, max_length, batch_size)
            scores |= {f"control_{k}": v for k, v in memorization.metrics(control).items()}
        return scores
    if task.label_words:
        return {"accuracy": classification_accuracy(model, tokenizer, examples, task.label_words,
                                                    max_length, batch_size)}
    loss = completion_loss(model, tokenizer, examples, max_length, batch_size)
    return {"loss": loss, "perplexity": math.exp(loss)}
