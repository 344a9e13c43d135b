"""Your own data: JSONL or CSV files of prompt/completion pairs, conversations, or text/label
pairs for classification, read into examples with a clear error for every malformed line."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from .tasks import Example


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


def user_examples(path: Path) -> tuple[list[Example], list[str] | None]:
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
