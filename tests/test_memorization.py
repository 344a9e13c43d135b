"""Memorization tasks: seeded facts, the codebook, qa_wikidata out of the sdist, and their metrics."""

from __future__ import annotations

import io
import json
import math
import tarfile

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from moslora import memorization
from moslora.assets import default_model_path
from moslora.data import load_task
from moslora.scoring import answer_scores, evaluate
from moslora.tasks import Example


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def test_words_are_distinct_single_tokens_so_chance_is_known(tokenizer):
    assert len(set(memorization.WORDS)) == len(memorization.WORDS) == 99
    for word in memorization.WORDS:
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    assert memorization.CHANCE_NLL == pytest.approx(math.log(99))


def test_facts_are_seeded_distinct_and_drawn_from_the_words():
    items = memorization.facts(500, seed=3)
    assert items == memorization.facts(500, seed=3) and items != memorization.facts(500, seed=4)
    assert len({p for p, _ in items}) == 500  # one answer per name
    assert memorization.facts(200, seed=3) == items[:200]  # a smaller task is a subset
    for prompt, answer in items:
        assert prompt.endswith(":") and answer.startswith(" ")
        words = answer.split()
        assert len(words) == memorization.ANSWER_WORDS and set(words) <= set(memorization.WORDS)


def test_facts_task_trains_and_scores_the_same_items():
    task = load_task("facts:40", seed=1)
    assert task.name == "facts:40" and len(task.train) == 40
    assert task.train == task.validation == task.test and not task.control
    assert task.chance_nll == memorization.CHANCE_NLL and not task.train[0].chat
    assert len(load_task("facts").train) == 256  # the default size


def test_codebook_applies_one_code_per_position_and_holds_out_unseen_phrases():
    train, validation, test = memorization.codebook(300, seed=2)
    assert (train, validation, test) == memorization.codebook(300, seed=2) != memorization.codebook(300, seed=3)
    assert (len(train), len(validation), len(test)) == (300, *memorization.CODEBOOK_HELD_OUT)
    prompts = [p for p, _ in train + validation + test]
    assert len(set(prompts)) == len(prompts)  # no held-out phrase was trained on
    code: list[dict[str, str]] = [{}, {}, {}]
    for prompt, answer in train + validation + test:
        assert prompt.endswith(" ->") and answer.startswith(" ")
        for position, (word, coded) in enumerate(zip(prompt[:-3].split(), answer.split(), strict=True)):
            assert code[position].setdefault(word, coded) == coded  # one code word per word and place
    for place in code:  # each place's code is a permutation of the words
        assert set(place) <= set(memorization.WORDS) and len(set(place.values())) == len(place)
    assert code[0] != code[1]  # the places have codes of their own


def test_codebook_task_trains_on_phrases_and_scores_on_held_out_ones():
    task = load_task("codebook:64", seed=1)
    assert task.name == "codebook:64" and len(task.train) == 64
    assert not {e.prompt for e in task.train} & {e.prompt for e in task.test + task.validation}
    assert task.chance_nll == memorization.CHANCE_NLL and not task.test[0].chat
    with pytest.raises(ValueError, match="more phrases than there are"):
        memorization.codebook(99 ** 3)


@pytest.mark.parametrize("name", ["facts:0", "facts:many", "wikidata:-3", "codebook:0"])
def test_a_bad_size_says_how_to_write_one(name):
    with pytest.raises(ValueError, match="positive whole number"):
        load_task(name)


def random_llama(tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)  # large weights: confident, context-dependent predictions
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=len(tokenizer), initializer_range=0.5)).eval()


def test_exact_match_is_what_greedy_decoding_writes(tokenizer):
    model = random_llama(tokenizer, 0)
    prompts = [p for p, _ in memorization.facts(12, seed=0)]
    items = []
    for prompt in prompts:  # half of the answers are the model's own greedy continuation
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        greedy = tokenizer.decode(out[0, ids.shape[1]:])
        items.append(Example(prompt, greedy, chat=False))
        items.append(Example(prompt, " apple river stone", chat=False))
    scores = answer_scores(model, tokenizer, items, batch_size=5)
    for example, (_, _, exact) in zip(items, scores):
        ids = tokenizer(example.prompt, return_tensors="pt")["input_ids"]
        n = len(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
        written = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
        assert exact == (out[0, ids.shape[1]:].tolist() == written), example
    assert any(e for _, _, e in scores) and not all(e for _, _, e in scores)


def test_metrics_count_bits_against_chance():
    chance = math.log(99)
    guess = [(-3 * chance, 3, False)] * 10  # exactly chance: nothing stored
    assert memorization.metrics(guess, chance) == pytest.approx({"accuracy": 0.0, "loss": chance, "bits": 0.0})
    known = [(0.0, 3, True)] * 10  # certain: all 3 * log2(100) bits of each of 10 facts
    assert memorization.metrics(known, chance)["bits"] == pytest.approx(30 * math.log2(99))
    assert "bits" not in memorization.metrics(known)
    with pytest.raises(ValueError, match="no items"):
        memorization.metrics([])


def test_evaluate_reports_exact_match_and_bits_for_facts(tokenizer):
    model = random_llama(tokenizer, 1)
    scores = evaluate(model, tokenizer, load_task("facts:8"))
    assert set(scores) == {"accuracy", "loss", "bits"} and scores["accuracy"] == 0.0
    assert scores["loss"] > 0


FAKE_WIKIDATA = [{"input": f"The capital of Place{i} is", "target": f"City{i}"} for i in range(300)]
FAKE_WIKIDATA += [{"input": "The genre of Someone is", "target": ["comedy", "parody"]}]


@pytest.fixture
def fake_sdist(tmp_path, monkeypatch):
    """A bigbench sdist holding only qa_wikidata, and an empty moslora cache."""
    data = json.dumps({"canary": "x", "examples": FAKE_WIKIDATA}).encode()
    sdist = tmp_path / memorization.BIGBENCH_SDIST
    with tarfile.open(sdist, "w:gz") as archive:
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/qa_wikidata/task.json")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("MOSLORA_BIGBENCH_SDIST", str(sdist))
    monkeypatch.setenv("MOSLORA_CACHE", str(tmp_path / "cache"))
    return sdist


def known_if_even(examples):
    """A base that knows the facts about even-numbered places."""
    return [(-0.1, 1, True) if int(e.prompt.split("Place")[1].split()[0]) % 2 == 0 else (-9.0, 2, False)
            for e in examples]


def test_wikidata_keeps_unknown_facts_and_a_disjoint_control(fake_sdist):
    task = load_task("wikidata:40", seed=0, scorer=known_if_even)
    assert len(task.train) == 40 and len(task.control) == 40 and task.test == task.train
    numbers = [int(e.prompt.split("Place")[1].split()[0]) for e in task.train + task.control]
    assert all(n % 2 for n in numbers) and len(set(numbers)) == 80  # unknown only, no overlap
    assert task.train[0].completion.startswith(" City") and task.chance_nll is None
    fake_sdist.unlink()  # the extraction is cached: the archive is read once
    assert load_task("wikidata:40", seed=0, scorer=known_if_even).train == task.train


def test_wikidata_errors_say_what_to_do(fake_sdist, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs the base"):
        load_task("wikidata:10")
    with pytest.raises(ValueError, match="ask for fewer"):
        load_task("wikidata:140", scorer=known_if_even)  # 150 unknown, 140 + 140 wanted
    monkeypatch.setenv("MOSLORA_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("MOSLORA_BIGBENCH_SDIST", str(tmp_path / "nowhere.tar.gz"))
    with pytest.raises(FileNotFoundError, match="bigbench==1.0.0, an optional asset.*MOSLORA_BIGBENCH_SDIST"):
        load_task("wikidata:10", scorer=known_if_even)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_without_the_optional_sdist_the_cli_says_why_in_one_line(tmp_path, monkeypatch, command):
    from typer.testing import CliRunner

    from moslora.cli import app

    monkeypatch.setenv("MOSLORA_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("MOSLORA_BIGBENCH_SDIST", str(tmp_path / "nowhere.tar.gz"))
    args = [command, "--task", "wikidata:10"] + (["--output-dir", str(tmp_path / "out")] if command == "train" else [])
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert "the wikidata task is unavailable" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
