"""Fine-tuning: the Trainer integration, resume, LoRA baseline, and one real-model run."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from moslora import MoSConfig
from moslora.assets import default_model_path
from moslora.cli import app
from moslora.base import load_base
from moslora.train import TrainConfig, last_checkpoint, train

TINY_MOS = MoSConfig(target_modules=["q_proj", "v_proj"], rank=4, budget_rank=2, private_rank=0)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def tiny_base(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=len(tokenizer)))


def tiny_config(out, **kw) -> TrainConfig:
    return TrainConfig(**{"task": "sentiment", "output_dir": str(out), "max_steps": 6, "batch_size": 4,
                          "eval_steps": 3, "train_examples": 16, "eval_examples": 4, "test_examples": 4,
                          "max_length": 64, "mos": TINY_MOS, "progress": False, **kw})


def test_run_folder_has_adapter_metrics_config_and_plot(tmp_path, tokenizer, monkeypatch):
    from transformers import Trainer

    def second_pass(*args, **kwargs):
        raise AssertionError("HF's evaluation loop ran beside the task metric")

    # a classification run evaluates in one pass: the task metric gives accuracy and loss
    monkeypatch.setattr(Trainer, "evaluation_loop", second_pass)
    result = train(tiny_config(tmp_path / "run"), base=tiny_base(tokenizer), tokenizer=tokenizer)
    run = tmp_path / "run"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.json",
                 "config.json", "loss.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["steps"] == 6
    assert [step for step, _ in metrics["train_loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in metrics["eval_loss"]] == [3, 6]
    assert metrics["examples"] == {"train": 16, "validation": 4, "test": 4}
    assert metrics["task_path"] is None  # a built-in task
    assert metrics["trainable_params"] == result.model.trainable_parameters() == 2 * 2 * (32 + 32) + 2 * 2 * (32 + 16)  # L · e · (d_in + d_out)
    assert json.loads((run / "config.json").read_text())["mos"]["rank"] == 4
    # checkpoints hold the compact adapter, not the frozen base
    ckpt = run / "checkpoints" / "checkpoint-6"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    evals = [h for h in json.loads((ckpt / "trainer_state.json").read_text())["log_history"] if "eval_loss" in h]
    assert len(evals) == 2 and all(0 <= h["eval_accuracy"] <= 1 and h["eval_loss"] > 0 for h in evals)
    assert metrics["best_checkpoint"] is not None  # picked on eval_accuracy


def test_resume_matches_an_uninterrupted_run(tmp_path, tokenizer):
    train(tiny_config(tmp_path / "full"), base=tiny_base(tokenizer), tokenizer=tokenizer)
    # an "interrupted" run: only the step-3 checkpoint exists, then resume to step 6
    shutil.copytree(tmp_path / "full/checkpoints/checkpoint-3", tmp_path / "cut/checkpoints/checkpoint-3")
    train(tiny_config(tmp_path / "cut", resume=True), base=tiny_base(tokenizer), tokenizer=tokenizer)
    full = load_file(tmp_path / "full/checkpoints/checkpoint-6/adapter_model.safetensors")
    cut = load_file(tmp_path / "cut/checkpoints/checkpoint-6/adapter_model.safetensors")
    assert full.keys() == cut.keys()
    changed = False
    for key in full:
        torch.testing.assert_close(full[key].float(), cut[key].float(), atol=1e-6, rtol=0, msg=key)
        changed |= bool(full[key].float().abs().sum() > 0) and "pool_B" in key
    assert changed  # training really moved B away from zero


def test_last_checkpoint_is_the_highest_complete_step(tmp_path):
    for name, complete in (("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-12", False),
                           (".checkpoint-14.tmp-7@host-ab12", True), ("checkpoint-x", True)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")  # by number, not by name
    assert last_checkpoint(tmp_path / "checkpoint-2") is None


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="resume=True but .* holds no complete checkpoint"):
        tiny_config(tmp_path / "none", resume=True)


def _old_run(run):
    """A previous run's leftovers: a checkpoint from a later step and its metrics."""
    (run / "checkpoints" / "checkpoint-99").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-99" / "trainer_state.json").write_text("{}")
    (run / "metrics.json").write_text('{"old": true}')


def test_a_fresh_run_refuses_a_folder_holding_a_previous_run(tmp_path):
    _old_run(tmp_path / "run")
    with pytest.raises(ValueError, match="holds a previous run .*checkpoint-99.*--resume.*--overwrite") as err:
        tiny_config(tmp_path / "run")
    assert err.value.field == "output_dir"
    assert json.loads((tmp_path / "run/metrics.json").read_text()) == {"old": True}
    with pytest.raises(ValueError, match="pass only one of them"):
        tiny_config(tmp_path / "run", resume=True, overwrite=True)
    tiny_config(tmp_path / "run" / "elsewhere")  # a folder with only unrelated files is fine


def test_overwrite_starts_afresh_without_the_old_checkpoints(tmp_path, tokenizer):
    run = tmp_path / "run"
    _old_run(run)
    (run / "notes.txt").write_text("mine")
    train(tiny_config(run, overwrite=True), base=tiny_base(tokenizer), tokenizer=tokenizer)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert "old" not in json.loads((run / "metrics.json").read_text())
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own outputs are replaced
    steps = [h["step"] for h in json.loads(
        (run / "checkpoints/checkpoint-6/trainer_state.json").read_text())["log_history"]]
    assert max(steps) == 6


def test_checkpoint_names_are_transformers_names():
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from moslora import train_config

    assert (train_config.CHECKPOINT_PREFIX, train_config.TRAINER_STATE_NAME) == (PREFIX_CHECKPOINT_DIR,
                                                                                 TRAINER_STATE_NAME)


def test_lora_baseline_writes_a_peft_adapter(tmp_path, tokenizer):
    result = train(tiny_config(tmp_path / "lora", method="lora"), base=tiny_base(tokenizer), tokenizer=tokenizer)
    config = json.loads((tmp_path / "lora/adapter/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert result.metrics["trainable_params"] == 2 * 4 * (32 + 32) + 2 * 4 * (32 + 16)


@pytest.mark.parametrize("kwargs, field", [({"max_steps": 0}, "max_steps"), ({"method": "dora"}, "method"),
                                           ({"learning_rate": 0.0}, "learning_rate"),
                                           ({"warmup_ratio": 1.5}, "warmup_ratio")])
def test_bad_train_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_eval_cli_with_a_local_model_and_adapter(tmp_path, tokenizer):
    base = tiny_base(tokenizer)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    train(tiny_config(tmp_path / "run"), base=tiny_base(tokenizer), tokenizer=tokenizer)
    out = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "base"), "--adapter",
                                   str(tmp_path / "run/adapter"), "--examples", "4"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output[out.output.rindex("{"):])  # after any progress lines
    assert 0 <= report["accuracy"] <= 1
    assert report["task"] == "sentiment" and report["examples"] == 4
    assert report["adapter"] == str(tmp_path / "run/adapter")


@pytest.mark.slow  # real SmolLM2 training
def test_twenty_steps_on_the_default_model_lower_the_loss(tmp_path):
    base, tokenizer = load_base(None)
    cfg = TrainConfig(task="sentiment", output_dir=str(tmp_path / "real"), max_steps=20, batch_size=4,
                      eval_steps=20, train_examples=8, eval_examples=4, test_examples=4, max_length=96,
                      learning_rate=2e-3, progress=False)
    train(cfg, base=base, tokenizer=tokenizer)
    state = json.loads((tmp_path / "real/checkpoints/checkpoint-20/trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 20
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4


def test_4bit_base_with_gradient_checkpointing(tmp_path, tokenizer):
    import bitsandbytes as bnb  # a test extra: its absence must fail, not skip

    tiny_base(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    cfg = tiny_config(tmp_path / "q", model=str(tmp_path / "base"), load_in_4bit=True,
                      gradient_checkpointing=True, mos=MoSConfig(target_modules=["q_proj", "v_proj"],
                                                                 rank=3, budget_rank=2, private_rank=1))
    result = train(cfg)
    layer = result.model.mos_layers["model.layers.0.self_attn.q_proj"]
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert result.model.base_model.is_gradient_checkpointing
    assert float(layer.pools.pool_B.detach().abs().sum()) > 0  # the adapter trained through the 4-bit base


def test_nan_loss_stops_training_and_keeps_good_checkpoints(tmp_path, tokenizer):
    from moslora.train import TrainingDiverged

    base = tiny_base(tokenizer)
    with torch.no_grad():
        base.lm_head.weight[0, 0] = float("nan")  # every logit row gets a NaN: the loss is NaN
    with pytest.raises(TrainingDiverged, match="loss became nan at step 1; last good checkpoint: none"):
        train(tiny_config(tmp_path / "nan"), base=base, tokenizer=tokenizer)
    assert not list((tmp_path / "nan").rglob("adapter_model.safetensors"))


def test_the_progress_bar_shows_the_current_steps_loss_and_the_eval_loss():
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from moslora.train import RichProgress

    bar = RichProgress(console=Console(file=io.StringIO()))
    state = SimpleNamespace(is_world_process_zero=True, max_steps=3, global_step=0)
    bar.on_train_begin(None, state, None)
    for step, loss in ((1, 2.5), (2, 1.25)):
        state.global_step = step
        bar.on_step_end(None, state, None)  # the Trainer ends the step, then logs its loss
        bar.on_log(None, state, None, logs={"loss": loss})
        assert bar.progress.tasks[0].fields["loss"] == f"{loss:.4f}"
    bar.on_log(None, state, None, logs={"eval_loss": 0.75})
    assert bar.progress.tasks[0].fields["eval_loss"] == "0.7500"
    bar.on_train_end(None, state, None)


def test_the_loss_plot_has_a_title_and_whole_steps():
    from moslora.train import loss_figure

    history = [{"step": s, "loss": 1.0 / s} for s in range(1, 4)] + [{"step": 3, "eval_loss": 0.5}]
    ax = loss_figure(history, "mos on sentiment").axes[0]
    assert ax.get_title() == "mos on sentiment"
    ax.figure.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_a_task_file_is_recorded_by_its_absolute_path(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(30)]
    (tmp_path / "mine.jsonl").write_text("\n".join(lines))
    result = train(tiny_config("run", task="mine.jsonl", max_steps=2, eval_steps=2), base=tiny_base(tokenizer),
                   tokenizer=tokenizer)
    assert result.metrics["task_path"] == str(tmp_path / "mine.jsonl")
