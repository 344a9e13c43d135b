"""The README's Quick start runs exactly as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_code() -> str:
    """The ```python block under the README's "Quick start" heading."""
    section = README.read_text().split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the Quick start section has no python block"
    return match.group(1)


def test_the_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes my-adapter/ and my-adapter-peft/ where it runs
    exec(compile(quick_start_code(), "README.md (Quick start)", "exec"), {"__name__": "readme"})
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "my-adapter-peft" / "adapter_config.json").is_file()
    assert "trainable params" in capsys.readouterr().out
