"""Loading a task: a built-in one or your file, split once with a seed into train / validation /
test, so that no test input was seen in training.

The pieces: ``tasks`` (what a task is, the built-in and memorization tasks), ``datafiles``
(your JSONL/CSV files), ``tokenizing`` (prompts, tokens, batches), ``scoring`` (metrics).
"""

from __future__ import annotations

import random
from pathlib import Path

from .datafiles import user_examples
from .tasks import MEMORIZATION_TASKS, TASKS, Example, Scorer, Task, memorization_task

EVAL_FRACTION = 0.1  # of the distinct inputs, for validation and again for test


def load_task(name_or_path: str | Path, seed: int = 0, max_examples: int | None = None,
              eval_file: str | Path | None = None, scorer: Scorer | None = None) -> Task:
    """A built-in task by name (see ``TASKS`` and ``MEMORIZATION_TASKS``) or your own
    ``.jsonl`` / ``.csv`` file.

    Duplicates are dropped, examples are shuffled with ``seed`` and split 80/10/10; examples
    that share a prompt stay in one split, so no test input was seen in training. With
    ``eval_file`` every example of the task trains, and the file's examples are split in
    half into validation and test. ``max_examples`` caps each split; capping takes a prefix,
    so smaller caps are subsets. Memorization tasks are named ``facts:N`` / ``wikidata:N``
    (N items) and not split; ``wikidata`` needs ``scorer`` (``answer_scores`` of the base
    model, see ``memorization_task``).
    """
    kind, _, size = str(name_or_path).partition(":")
    if kind in MEMORIZATION_TASKS:
        return memorization_task(kind, size, seed, scorer)
    if str(name_or_path) in TASKS:
        name = str(name_or_path)
        examples, label_words = TASKS[name]()
    elif Path(name_or_path).suffix in (".jsonl", ".csv"):
        path = Path(name_or_path)
        name = path.stem
        examples, label_words = user_examples(path)
    else:
        raise ValueError(f"unknown task {str(name_or_path)!r}: use one of {sorted(TASKS)}, "
                         f"{' or '.join(f'{k}:N' for k in MEMORIZATION_TASKS)}, or "
                         "a .jsonl / .csv file of prompt,completion (or text,label) records")
    if eval_file is None:
        train, validation, test = _split(list(dict.fromkeys(examples)), seed)
    else:
        held_out, held_out_words = user_examples(Path(eval_file))
        if held_out_words != label_words:
            raise ValueError(f"{eval_file} has the classes {held_out_words}, but the task has "
                             f"{label_words}: both must be classification with the same labels, or "
                             "both prompt/completion")
        (train,) = _split(list(dict.fromkeys(examples)), seed, parts=1)
        validation, test = _split(list(dict.fromkeys(held_out)), seed, parts=2)
    return Task(name, train[:max_examples], validation[:max_examples], test[:max_examples],
                label_words)


def _split(examples: list[Example], seed: int, parts: int = 3) -> tuple[list[Example], ...]:
    """Shuffle with ``seed`` and cut into ``parts``: 3 is train/validation/test (80/10/10),
    2 is halves, 1 is everything, shuffled."""
    # split the distinct inputs, not the examples: a question with several answers, or a
    # review listed twice, must not land in both train and test. Plain texts (no prompt)
    # are their own input.
    groups: dict[str, list[Example]] = {}
    for e in examples:
        groups.setdefault(e.prompt or e.completion, []).append(e)
    keys = list(groups)
    if len(keys) < parts:
        raise ValueError(f"need at least {parts} distinct inputs to make {parts} split(s), got {len(keys)}")
    random.Random(seed).shuffle(keys)
    if parts == 3:
        n_eval = max(1, round(len(keys) * EVAL_FRACTION))
        n_train = len(keys) - 2 * n_eval
        cuts = [keys[:n_train], keys[n_train:n_train + n_eval], keys[n_train + n_eval:]]
    else:
        half = len(keys) // 2 if parts == 2 else len(keys)
        cuts = [keys[:half], keys[half:]][:parts]
    rng = random.Random(seed + 1)
    splits = []
    for part in cuts:
        split = [e for key in part for e in groups[key]]
        rng.shuffle(split)  # so a prefix of a split is a random sample of it
        splits.append(split)
    return tuple(splits)
