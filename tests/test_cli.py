import json
import shutil

import pytest
import torch
from conftest import randomize_adapter, tiny_llama
from typer.testing import CliRunner

from moslora import MoSConfig, get_mos_model
from moslora.cli import app

runner = CliRunner()


def test_selfcheck_runs_and_reports_exactness():
    result = runner.invoke(app, ["selfcheck", "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert "exported -> peft.PeftModel" in result.output
    assert "LoRA r=16 (same per-layer rank)" in result.output
    assert "NO" not in result.output.split()


@pytest.fixture
def adapter_dir(tmp_path):
    model = get_mos_model(tiny_llama(), MoSConfig(rank=3, budget_rank=2, private_rank=1))
    randomize_adapter(model)
    model.save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def test_info_summarises_an_adapter(adapter_dir):
    result = runner.invoke(app, ["info", str(adapter_dir)])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines())
    assert lines["format"] == "moslora version 1"
    assert "trainable (LoRA at the same rank r=3" in lines["parameters"]
    assert lines["base"] == "LlamaForCausalLM, path not recorded"
    assert lines["integrity"].startswith("ok")
    assert len(result.output.splitlines()) < 12
    full = json.loads(runner.invoke(app, ["info", str(adapter_dir), "--json"]).output)
    assert full["config"]["rank"] == 3 and full["format_version"] == 1
    assert full["base_fingerprint"]["architecture"] == "LlamaForCausalLM"
    assert full["parameters"] == sum(p.numel() for p in get_mos_model(
        tiny_llama(), MoSConfig(rank=3, budget_rank=2, private_rank=1)).mos_pools.parameters())
    assert full["bytes_on_disk"] > 0 and full["integrity"] == "ok"


def test_info_reports_corrupt_weights_with_a_nonzero_exit(adapter_dir):
    import os

    from moslora.checkpoint import WEIGHTS_NAME

    weights = adapter_dir / WEIGHTS_NAME
    weights.write_bytes(os.urandom(weights.stat().st_size))
    result = runner.invoke(app, ["info", str(adapter_dir)])
    assert result.exit_code == 1, result.output
    assert "does not match the checksum" in result.output


def test_info_on_a_file_says_to_pass_the_directory(adapter_dir):
    from moslora.checkpoint import WEIGHTS_NAME

    result = runner.invoke(app, ["info", str(adapter_dir / WEIGHTS_NAME)])
    assert result.exit_code == 2
    assert "is a file; pass the adapter's directory" in flat(result.output)


def test_merge_saves_a_plain_model_with_the_adapters_outputs(saved_base_and_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    base, adapter, model = saved_base_and_adapter
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base)(ids).logits
    assert (plain - want).abs().max() > 0.1  # the adapter changes the outputs
    for dtype, tolerance in (("float32", 1e-5), ("bfloat16", 0.05)):
        out = tmp_path / f"merged-{dtype}"
        result = runner.invoke(app, ["merge", str(adapter), str(out), "--model", str(base),
                                     "--dtype", dtype])
        assert result.exit_code == 0, result.output
        merged = AutoModelForCausalLM.from_pretrained(out)
        assert merged.dtype == getattr(torch, dtype)
        assert not any("mos" in name for name, _ in merged.named_modules())
        with torch.no_grad():
            got = merged(ids).logits.float()
        assert (got - want).abs().max() <= tolerance, dtype
        assert (out / "tokenizer.json").is_file()


def test_merge_never_overwrites_a_model(saved_base_and_adapter, tmp_path):
    base, adapter, _ = saved_base_and_adapter
    result = runner.invoke(app, ["merge", str(adapter), str(base), "--model", str(base)])
    assert result.exit_code == 2
    assert "already exists" in flat(result.output)
    assert (base / "model.safetensors").is_file()


def test_export_peft_never_replaces_an_mos_adapter(saved_base_and_adapter, tmp_path):
    base, adapter, _ = saved_base_and_adapter
    other = tmp_path / "other"
    shutil.copytree(adapter, other)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(app, ["export-peft", str(adapter), str(other), "--model", str(base), *extra])
        assert result.exit_code == 2, result.output
        assert "holds an MoS adapter" in flat(result.output)
        assert {p.name: p.read_bytes() for p in other.iterdir()} == before  # the MoS adapter is intact


def test_export_peft_replaces_a_non_empty_folder_only_with_overwrite(saved_base_and_adapter, tmp_path):
    base, adapter, _ = saved_base_and_adapter
    out = tmp_path / "old-export"
    out.mkdir()
    (out / "notes.txt").write_text("an older export")
    result = runner.invoke(app, ["export-peft", str(adapter), str(out), "--model", str(base)])
    assert result.exit_code == 2, result.output
    assert "already exists and is not empty; pass --overwrite" in flat(result.output)
    assert (out / "notes.txt").read_text() == "an older export"
    result = runner.invoke(app, ["export-peft", str(adapter), str(out), "--model", str(base), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "peft_type" in json.loads((out / "adapter_config.json").read_text())
    assert not (out / "notes.txt").exists()


def test_merge_with_overwrite_replaces_the_whole_model(saved_base_and_adapter, tmp_path):
    base, adapter, _ = saved_base_and_adapter
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model-00002-of-00002.safetensors").write_text("a shard of an older model")
    result = runner.invoke(app, ["merge", str(adapter), str(out), "--model", str(base), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    assert not (out / "model-00002-of-00002.safetensors").exists()


def flat(output: str) -> str:
    """The CLI's output with the error box and line wrapping taken out."""
    return " ".join(output.replace("│", " ").split())


@pytest.fixture
def no_model_loading(monkeypatch):
    """Every entry point that loads a model or starts work fails the test if reached."""
    import moslora.base
    import moslora.demo
    import moslora.serving.server
    import moslora.train

    def reached(*args, **kwargs):
        raise AssertionError("a bad option reached model loading")

    for module, name in ((moslora.base, "load_base"), (moslora.train, "train"),
                         (moslora.serving.server, "load_server"), (moslora.demo, "run_finetune_demo"),
                         (moslora.demo, "run_selfcheck")):
        monkeypatch.setattr(module, name, reached)


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "a.txt").write_text("not a directory")
    (tmp_path / "empty").mkdir()
    (tmp_path / "keys.json").write_text("[1, 2]")
    (tmp_path / "previous-run").mkdir()
    (tmp_path / "previous-run" / "metrics.json").write_text("{}")
    return tmp_path


BAD_OPTIONS = [
    # train: MoSConfig fields
    (["train", "--rank", "0"], "--rank"),
    (["train", "--rank", "two"], "--rank"),
    (["train", "--budget-rank", "0"], "--budget-rank"),
    (["train", "--shards-per-vector", "0"], "--shards-per-vector"),
    (["train", "--private-rank", "-1"], "--private-rank"),
    (["train", "--rank", "4", "--budget-rank", "8", "--private-rank", "5"], "--private-rank"),
    (["train", "--alpha", "0"], "--alpha"),
    (["train", "--alpha", "inf"], "--alpha"),
    (["train", "--alpha", "nan"], "--alpha"),
    (["train", "--dropout", "1"], "--dropout"),
    (["train", "--init", "xavier"], "--init"),
    (["train", "--targets", ","], "--targets"),
    (["train", "--targets", "re:(["], "--targets"),
    (["train", "--seed", "-1"], "--seed"),
    (["train", "--seed", str(2**32)], "--seed"),
    # train: TrainConfig fields
    (["train", "--method", "dora"], "--method"),
    (["train", "--task", "nope"], "--task"),
    (["train", "--task", "{tmp}/missing.jsonl"], "--task"),
    (["train", "--model", "{tmp}/no-model"], "--model"),
    (["train", "--output-dir", "{tmp}/a.txt"], "--output-dir"),
    (["train", "--resume", "--output-dir", "{tmp}/empty"], "--resume"),
    (["train", "--output-dir", "{tmp}/previous-run"], "--output-dir"),
    (["train", "--max-steps", "0"], "--max-steps"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--grad-accum", "0"], "--grad-accum"),
    (["train", "--learning-rate", "0"], "--learning-rate"),
    (["train", "--learning-rate", "inf"], "--learning-rate"),
    (["train", "--warmup-ratio", "1.5"], "--warmup-ratio"),
    (["train", "--eval-steps", "0"], "--eval-steps"),
    (["train", "--train-examples", "0"], "--train-examples"),
    (["train", "--eval-examples", "0"], "--eval-examples"),
    (["train", "--test-examples", "0"], "--test-examples"),
    (["train", "--max-length", "4"], "--max-length"),
    # eval
    (["eval", "--task", "nope"], "--task"),
    (["eval", "--model", "{tmp}/no-model"], "--model"),
    (["eval", "--adapter", "{tmp}/no-adapter"], "--adapter"),
    (["eval", "--adapter", "{tmp}/empty"], "--adapter"),
    (["eval", "--adapter", "{tmp}/a.txt"], "--adapter"),
    (["eval", "--examples", "0"], "--examples"),
    (["eval", "--max-length", "4"], "--max-length"),
    (["eval", "--batch-size", "0"], "--batch-size"),
    (["eval", "--seed", "-1"], "--seed"),
    # info, export-peft
    (["info", "{tmp}/no-adapter"], "path"),
    (["info", "{tmp}/empty"], "path"),
    (["export-peft", "{tmp}/no-adapter", "{tmp}/out"], "adapter"),
    (["export-peft", "{tmp}/empty", "{tmp}/out"], "adapter"),
    (["export-peft", "{tmp}/empty", "{tmp}/a.txt"], "out_dir"),
    (["export-peft", "{tmp}/empty", "{tmp}/out", "--model", "{tmp}/no-model"], "--model"),
    # merge
    (["merge", "{tmp}/no-adapter", "{tmp}/out"], "adapter"),
    (["merge", "{tmp}/empty", "{tmp}/out"], "adapter"),
    (["merge", "{tmp}/empty", "{tmp}/a.txt"], "out_dir"),
    (["merge", "{tmp}/empty", "{tmp}/out", "--dtype", "int8"], "--dtype"),
    (["merge", "{tmp}/empty", "{tmp}/out", "--model", "{tmp}/no-model"], "--model"),
    # serve
    (["serve", "--adapters", "{tmp}/no-root"], "--adapters"),
    (["serve", "--adapters", "{tmp}/a.txt"], "--adapters"),
    (["serve", "--adapters", "{tmp}", "--base", "{tmp}/no-model"], "--base"),
    (["serve", "--adapters", "{tmp}", "--model", "{tmp}/no-model"], "--model"),
    (["serve", "--adapters", "{tmp}", "--port", "0"], "--port"),
    (["serve", "--adapters", "{tmp}", "--port", "65536"], "--port"),
    (["serve", "--adapters", "{tmp}", "--api-keys", "{tmp}/no-keys.json"], "--api-keys"),
    (["serve", "--adapters", "{tmp}", "--api-keys", "{tmp}/keys.json"], "--api-keys"),
    (["serve", "--adapters", "{tmp}", "--max-batch", "0"], "--max-batch"),
    (["serve", "--adapters", "{tmp}", "--batch-window-ms", "-1"], "--batch-window-ms"),
    (["serve", "--adapters", "{tmp}", "--batch-window-ms", "inf"], "--batch-window-ms"),
    (["serve", "--adapters", "{tmp}", "--queue-size", "0"], "--queue-size"),
    (["serve", "--adapters", "{tmp}", "--max-body-bytes", "0"], "--max-body-bytes"),
    (["serve", "--adapters", "{tmp}", "--max-prompt-chars", "0"], "--max-prompt-chars"),
    (["serve", "--adapters", "{tmp}", "--max-prompt-tokens", "0"], "--max-prompt-tokens"),
    (["serve", "--adapters", "{tmp}", "--max-tokens", "0"], "--max-tokens"),
    (["serve", "--adapters", "{tmp}", "--max-n", "0"], "--max-n"),
    (["serve", "--adapters", "{tmp}", "--request-timeout", "0"], "--request-timeout"),
    (["serve", "--adapters", "{tmp}", "--request-timeout", "nan"], "--request-timeout"),
    # demo, selfcheck
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--test-examples", "0"], "--test-examples"),
    (["selfcheck", "--steps", "0"], "--steps"),
]


@pytest.mark.parametrize("args, option", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_a_bad_option_is_a_usage_error_naming_it(args, option, paths, no_model_loading):
    result = runner.invoke(app, [a.replace("{tmp}", str(paths)) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    out = flat(result.output)
    assert f"Invalid value for '{option}'" in out or f"Invalid value for {option}" in out, out


def test_messages_say_the_allowed_range(paths, no_model_loading):
    cases = {("train", "--init", "xavier"): "init must be one of kaiming | gaussian",
             ("train", "--method", "dora"): "method must be one of mos | lora",
             ("train", "--task", "nope"): "task must be one of sentiment | party | hamlet | chat",
             ("train", "--seed", str(2**32)): "4294967295",
             ("train", "--rank", "0"): "greater than or equal to 1",
             ("train", "--learning-rate", "inf"): "less than or equal to 1",
             ("train", "--alpha", "inf"): "must be a finite number"}
    for args, words in cases.items():
        assert words in flat(runner.invoke(app, list(args)).output), args


@pytest.fixture
def model_folder(tmp_path):
    """A tiny Llama's config.json alone: enough for every check made before loading."""
    tiny_llama(layers=2).config.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.fixture
def no_base_loading(monkeypatch):
    import moslora.train

    def reached(*args, **kwargs):
        raise AssertionError("the base model was loaded before the run was checked")

    monkeypatch.setattr(moslora.train, "load_base", reached)  # train's own reference to base.load_base


def test_train_reports_user_errors_in_one_line_before_loading_the_model(model_folder, tmp_path,
                                                                        no_base_loading):
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"prompt": "a", "completion": "b"}\n{"question": "c"}\n')
    (tmp_path / "no-config").mkdir()
    cases = [
        (["--task", str(bad_data)], "--task", "line 2: expected fields 'prompt' and 'completion'"),
        (["--rank", "16", "--budget-rank", "2", "--private-rank", "1"], "--rank",
         "the largest rank that fits is 3"),
        (["--targets", "q_proj,qkv"], "--targets", "['qkv'] matched no module"),
        (["--model", str(tmp_path / "no-config")], "--model", "has no config.json"),
    ]
    for args, option, words in cases:
        model = [] if "--model" in args else ["--model", str(model_folder)]
        result = runner.invoke(app, ["train", "--output-dir", str(tmp_path / "run"), *model, *args])
        assert result.exit_code == 2, (args, result.output, result.exception)
        out = flat(result.output)
        assert f"Invalid value for '{option}'" in out or f"Invalid value for {option}" in out, out
        assert words in out, out
        assert "Traceback" not in result.output


def _commands(group, prefix=()):
    """(name path, click command) of every command under ``group``."""
    import click

    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + (name,))
        else:
            yield prefix + (name,), command


def test_every_option_has_help():
    import typer.main

    missing = [f"{' '.join(path)} {param.name}"
               for path, command in _commands(typer.main.get_command(app))
               for param in command.params
               if not getattr(param, "hidden", False) and not (getattr(param, "help", None) or "").strip()]
    assert not missing, missing


def test_every_help_text_is_shown_whole_under_h():
    """Rich markup eats ``[...]`` in help strings: each option's help must survive ``-h``."""
    import re

    import typer.main

    def words(text: str) -> str:
        return " ".join(re.sub(r"[\u2500-\u257f│]", " ", text).split())

    for path, command in _commands(typer.main.get_command(app)):
        shown = words(runner.invoke(app, [*path, "-h"], env={"COLUMNS": "400"}).output)
        for param in command.params:
            if getattr(param, "help", None) and not getattr(param, "hidden", False):
                assert words(param.help) in shown, f"{' '.join(path)} --{param.name}: {param.help!r}"


def test_version_and_short_help():
    from moslora import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"moslora {__version__}"
    for args in (["-h"], ["train", "-h"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage" in result.output, args


def test_train_option_defaults_come_from_the_config_dataclasses():
    import typer.main

    from moslora.train_config import TrainConfig

    params = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    mos = TrainConfig.__dataclass_fields__["mos"].default_factory()
    assert params["rank"].default == mos.rank and params["alpha"].default == mos.alpha
    assert params["targets"].default == ",".join(mos.target_modules)
    for name in ("max_steps", "learning_rate", "weight_decay", "lr_scheduler", "logging_steps"):
        assert params[name].default == TrainConfig.__dataclass_fields__[name].default, name


@pytest.fixture
def recorded_base(saved_base_and_adapter, tmp_path, monkeypatch):
    """An adapter trained on the base folder loaded by a relative path: it records the base."""
    from transformers import AutoModelForCausalLM

    base, _, _ = saved_base_and_adapter
    monkeypatch.chdir(tmp_path)
    model = get_mos_model(AutoModelForCausalLM.from_pretrained("base"),
                          MoSConfig(rank=3, budget_rank=2, private_rank=1))
    randomize_adapter(model)
    model.save_pretrained(tmp_path / "recorded")
    return base, tmp_path / "recorded"


def test_the_adapter_records_its_base_and_merge_and_export_use_it(recorded_base, tmp_path):
    base, adapter = recorded_base
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    result = runner.invoke(app, ["merge", str(adapter), str(tmp_path / "merged")])  # no --model
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export-peft", str(adapter), str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    peft = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert peft["base_model_name_or_path"] == str(base)


def test_a_missing_or_wrong_base_is_named(recorded_base, tmp_path):
    base, adapter = recorded_base
    moved = tmp_path / "moved-base"
    base.rename(moved)
    result = runner.invoke(app, ["merge", str(adapter), str(tmp_path / "m")])
    assert result.exit_code == 2
    assert f"was trained on '{base}', which is not here; pass that base with --model" in flat(result.output)
    tiny_llama(layers=2).save_pretrained(tmp_path / "other")
    shutil.copy(moved / "tokenizer.json", tmp_path / "other")
    shutil.copy(moved / "tokenizer_config.json", tmp_path / "other")
    result = runner.invoke(app, ["merge", str(adapter), str(tmp_path / "m"), "--model", str(tmp_path / "other")])
    assert result.exit_code == 2
    assert f"(it was trained on {base})" in flat(result.output)


def test_generate_answers_a_prompt_with_an_adapter(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from moslora.assets import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 vocab_size=len(tokenizer))).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = get_mos_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                          MoSConfig(rank=3, budget_rank=2, private_rank=1))
    model.save_pretrained(tmp_path / "adapter")
    result = runner.invoke(app, ["generate", "--adapter", str(tmp_path / "adapter"), "--prompt", "Hello",
                                 "--max-new-tokens", "3"])  # the adapter names its base
    assert result.exit_code == 0, result.output
    assert result.output.strip()
