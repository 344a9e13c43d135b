"""Tokenizing: an example as the model sees it (chat template or plain markers), its tokens
with the loss on the answer only, and batches of them."""

from __future__ import annotations

import torch

from .tasks import Example

IGNORE_INDEX = -100  # label value that the loss skips (the prompt and the padding)


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
