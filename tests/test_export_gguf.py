"""The llama.cpp export: a GGUF LoRA adapter read back with gguf's own reader.

The reference for the q/k row order is transformers' GGUF loader (``LlamaTensorProcessor``),
which undoes llama.cpp's permutation when it reads a GGUF Llama: it is how the embedded
SmolLM2 became the HF model we train on, and it is not our code.
"""

import gguf
import numpy as np
import pytest
import torch
from conftest import LLAMA_KINDS, randomize_adapter, tiny_gpt2, tiny_llama
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
from typer.testing import CliRunner

from moslora import MoSConfig, export_gguf, get_mos_model, llamacpp
from moslora.assets import DEFAULT_GGUF, asset_path, default_model_path
from moslora.cli import app

CFG = dict(target_modules=LLAMA_KINDS, rank=6, budget_rank=3, private_rank=1, shards_per_vector=2, alpha=12.0)
GGUF_KINDS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


@pytest.fixture
def mos():
    """An MoS adapter with non-zero B on a tiny Llama with grouped-query attention (4 q heads,
    2 k/v heads), so that a k permuted by the q head count shows."""
    model = get_mos_model(tiny_llama(), MoSConfig(**CFG))
    randomize_adapter(model)
    return model


def read(path) -> tuple[dict, dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def max_delta_error(path, mos) -> float:
    """Max |ΔW| difference over all layers between the GGUF file and the MoS model.

    ΔW is rebuilt as llama.cpp does, ``(alpha / r) · lora_b @ lora_a`` with ``r`` from lora_b,
    then brought back to HF's row order by transformers' GGUF loader.
    """
    fields, tensors = read(path)
    config = mos.base_model.config
    to_hf = LlamaTensorProcessor(config={"num_attention_heads": config.num_attention_heads,
                                         "num_key_value_heads": config.num_key_value_heads})
    error = 0.0
    for name, layer in mos.mos_layers.items():
        base = llamacpp.gguf_targets(mos.base_fingerprint)[name].tensor
        a, b = tensors[f"{base}.lora_a"].data, tensors[f"{base}.lora_b"].data
        delta = to_hf.process(b @ a * (fields["adapter.lora.alpha"] / b.shape[1]), base).weights
        error = max(error, float(np.abs(delta - layer.delta_weight().detach().numpy()).max()))
    return error


def test_file_has_the_metadata_llama_cpp_checks(mos, tmp_path):
    fields, _ = read(export_gguf(mos, tmp_path / "a.gguf"))
    assert fields["general.type"] == "adapter"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 12.0


def test_tensors_are_named_and_shaped_as_llama_cpp_expects(mos, tmp_path):
    _, tensors = read(export_gguf(mos, tmp_path / "a.gguf"))
    assert set(tensors) == {f"blk.{i}.{kind}.weight.lora_{ab}"
                            for i in range(4) for kind in GGUF_KINDS for ab in "ab"}
    shapes = {"attn_q": (64, 64), "attn_k": (64, 32), "attn_v": (64, 32), "attn_output": (64, 64),
              "ffn_gate": (64, 128), "ffn_up": (64, 128), "ffn_down": (128, 64)}  # (d_in, d_out)
    for kind, (d_in, d_out) in shapes.items():
        a, b = tensors[f"blk.2.{kind}.weight.lora_a"], tensors[f"blk.2.{kind}.weight.lora_b"]
        # ggml's ne order: lora_a [d_in, r], lora_b [r, d_out] (llama-adapter.cpp's checks)
        assert list(a.shape) == [d_in, 6] and list(b.shape) == [6, d_out], kind
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32


def test_every_update_matches_the_mos_model(mos, tmp_path):
    error = max_delta_error(export_gguf(mos, tmp_path / "a.gguf"), mos)
    print(f"max |dW(GGUF) - dW(MoS)| = {error:.1e}")
    assert error <= 1e-6


@pytest.mark.parametrize("bug", ["no permutation", "k permuted by the q head count"])
def test_a_wrong_row_order_is_caught(mos, tmp_path, monkeypatch, bug):
    if bug == "no permutation":
        monkeypatch.setattr(llamacpp, "rope_permute", lambda rows, heads: rows)
    else:
        monkeypatch.setitem(llamacpp.LLAMA_TENSORS, "self_attn.k_proj", ("attn_k", "num_attention_heads"))
    assert max_delta_error(export_gguf(mos, tmp_path / "a.gguf"), mos) > 1e-3


def test_an_existing_file_is_kept_unless_overwrite(mos, tmp_path):
    path = tmp_path / "a.gguf"
    path.write_bytes(b"not yours")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_gguf(mos, path)
    assert path.read_bytes() == b"not yours"
    export_gguf(mos, path, overwrite=True)
    assert read(path)[0]["general.type"] == "adapter"
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]  # no staging file left


def test_other_architectures_and_layers_are_refused(tmp_path):
    gpt2 = get_mos_model(tiny_gpt2(), MoSConfig(target_modules=["c_attn"], rank=4, budget_rank=2))
    with pytest.raises(ValueError, match="supports Llama bases .* is a GPT2LMHeadModel"):
        export_gguf(gpt2, tmp_path / "a.gguf")
    head = get_mos_model(tiny_llama(), MoSConfig(target_modules=["q_proj", "lm_head"], rank=2, budget_rank=2))
    with pytest.raises(ValueError, match="also adapts lm_head"):
        export_gguf(head, tmp_path / "a.gguf")
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def smollm2_gguf() -> tuple[dict, dict[str, gguf.ReaderTensor]]:
    return read(asset_path(*DEFAULT_GGUF))  # seconds: the reader parses the whole vocabulary


def test_names_and_shapes_fit_the_embedded_smollm2_gguf(smollm2_gguf, tmp_path):
    """llama.cpp finds a LoRA pair's base tensor by name and checks its shape against it: a
    one-block Llama of SmolLM2's sizes must export names and shapes that its GGUF holds."""
    base_fields, base = smollm2_gguf
    config = LlamaConfig(hidden_size=base_fields["llama.embedding_length"],
                         intermediate_size=base_fields["llama.feed_forward_length"],
                         num_attention_heads=base_fields["llama.attention.head_count"],
                         num_key_value_heads=base_fields["llama.attention.head_count_kv"],
                         num_hidden_layers=1, vocab_size=128)
    mos = get_mos_model(LlamaForCausalLM(config), MoSConfig(target_modules="all-linear", rank=2, budget_rank=2))
    fields, tensors = read(export_gguf(mos, tmp_path / "a.gguf"))
    assert fields["general.architecture"] == base_fields["general.architecture"]
    pairs = {name.rsplit(".", 1)[0] for name in tensors}
    assert pairs == {f"blk.0.{kind}.weight" for kind in GGUF_KINDS}
    for name in pairs:
        a, b, w = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"], base[name]
        assert (a.shape[0], b.shape[1], a.shape[1]) == (w.shape[0], w.shape[1], b.shape[0]), name


@pytest.mark.parametrize("hf, kind, heads", [("q_proj", "attn_q", "llama.attention.head_count"),
                                             ("k_proj", "attn_k", "llama.attention.head_count_kv")])
def test_rope_permute_turns_smollm2s_hf_weights_into_its_gguf_tensors(smollm2_gguf, hf, kind, heads):
    """The row order the adapter's B gets is the one the base's own weights have in its GGUF:
    our HF copy of SmolLM2, permuted, equals the GGUF tensor dequantized."""
    fields, base = smollm2_gguf
    with safe_open(default_model_path() / "model.safetensors", "pt") as f:
        weight = f.get_tensor(f"model.layers.0.self_attn.{hf}.weight")
    tensor = base[f"blk.0.{kind}.weight"]
    in_gguf = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
    assert torch.equal(llamacpp.rope_permute(weight, fields[heads]), in_gguf.to(weight.dtype))
    assert not torch.equal(weight, in_gguf.to(weight.dtype))


def test_cli_exports_and_refuses_to_overwrite(saved_base_and_adapter, tmp_path):
    base, adapter, model = saved_base_and_adapter
    out = tmp_path / "adapter.gguf"
    runner = CliRunner()
    result = runner.invoke(app, ["export-gguf", str(adapter), str(out), "--model", str(base)])
    assert result.exit_code == 0, result.output
    assert max_delta_error(out, model) <= 1e-6
    before = out.read_bytes()
    result = runner.invoke(app, ["export-gguf", str(adapter), str(out), "--model", str(base)])
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.output
    assert out.read_bytes() == before
    result = runner.invoke(app, ["export-gguf", str(adapter), str(out), "--model", str(base), "--overwrite"])
    assert result.exit_code == 0, result.output


def test_cli_refuses_a_non_llama_adapter_before_loading_a_base(tmp_path):
    adapter = tmp_path / "gpt2"
    get_mos_model(tiny_gpt2(), MoSConfig(target_modules=["c_attn"], rank=4, budget_rank=2)).save_pretrained(adapter)
    # no base recorded: had the check come after loading, the embedded SmolLM2 would load
    result = CliRunner().invoke(app, ["export-gguf", str(adapter), str(tmp_path / "a.gguf")])
    assert result.exit_code == 2
    assert "GPT2LMHeadModel" in " ".join(result.output.replace("│", " ").split())
