import json

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


def test_info_describes_an_adapter(tmp_path):
    model = get_mos_model(tiny_llama(), MoSConfig(rank=3, budget_rank=2, private_rank=1))
    randomize_adapter(model)
    model.save_pretrained(tmp_path / "a")
    result = runner.invoke(app, ["info", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["config"]["rank"] == 3
    assert info["base_architecture"] == "LlamaForCausalLM"
    assert info["bytes_on_disk"] > 0


def test_info_on_a_missing_adapter_fails_clearly(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert result.exit_code != 0
    assert "does not exist" in str(result.exception)
