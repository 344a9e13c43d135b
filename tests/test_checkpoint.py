import json
import struct

import pytest
import torch
from conftest import LLAMA_KINDS, randomize_adapter, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

from moslora import CheckpointError, MoSConfig, MoSModel, export_peft_lora, get_mos_model
from moslora.checkpoint import CONFIG_NAME, WEIGHTS_NAME, _sha256

CFG = dict(target_modules=LLAMA_KINDS, rank=6, budget_rank=3, private_rank=1, shards_per_vector=2)


@pytest.fixture
def saved(tmp_path, tokens):
    """An adapter with non-zero weights saved to disk, and its logits."""
    model = get_mos_model(tiny_llama(), MoSConfig(**CFG))
    randomize_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model(tokens).logits


def test_round_trip_gives_identical_logits(saved, tokens):
    path, logits = saved
    loaded = MoSModel.from_pretrained(tiny_llama(), path)
    assert torch.equal(loaded(tokens).logits, logits)
    assert loaded.mos_config == MoSConfig(**CFG)


def test_variants_round_trip_and_export_with_their_scales(tmp_path, tokens):
    from peft import PeftModel

    cfg = MoSConfig(**CFG, layer_scale=True, pool_lr_scale=0.25, pool_init_scale=0.5, private_shards=1)
    model = get_mos_model(tiny_llama(), cfg)
    assert all(pools.plan.private_shards == 1 for pools in model.mos_pools.values())
    randomize_adapter(model)  # the scales too: a loader that dropped them would differ
    model.save_pretrained(tmp_path / "adapter")
    loaded = MoSModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert loaded.mos_config == cfg and torch.equal(loaded(tokens).logits, model(tokens).logits)
    export_peft_lora(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    assert (peft_model(tokens).logits - model(tokens).logits).abs().max() <= 1e-5


def test_file_holds_pools_not_dense_factors(saved):
    path, _ = saved
    tensors = load_file(path / WEIGHTS_NAME)
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"pool_A", "pool_B", "private_A", "private_B", "index_A", "index_B"}
    params = sum(t.numel() for k, t in tensors.items() if "index" not in k)
    assert params == get_mos_model(tiny_llama(), MoSConfig(**CFG)).trainable_parameters()
    dense = 4 * 6 * sum(a + b for a, b in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
    assert params * 2 == dense  # r / e = 2 here
    assert all(t.dtype == torch.int16 for k, t in tensors.items() if "index" in k)


@pytest.mark.parametrize("make_base, targets", [(tiny_llama, LLAMA_KINDS), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])])
def test_export_loads_in_peft_with_the_same_logits(tmp_path, tokens, make_base, targets):
    from peft import PeftModel

    model = get_mos_model(make_base(), MoSConfig(target_modules=targets, rank=4, budget_rank=2, private_rank=1))
    randomize_adapter(model)
    export_peft_lora(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(make_base(), tmp_path / "peft").eval()
    assert (peft_model(tokens).logits - model(tokens).logits).abs().max() <= 1e-5
    config = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_modules"] == sorted(targets)


def test_export_refuses_a_non_empty_folder_unless_told_and_never_an_mos_adapter(saved, tmp_path):
    path, _ = saved
    model = MoSModel.from_pretrained(tiny_llama(), path)
    out = tmp_path / "old"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export_peft_lora(model, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    export_peft_lora(model, out, overwrite=True)
    assert (out / CONFIG_NAME).is_file() and not (out / "notes.txt").exists()
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="holds an MoS adapter"):
            export_peft_lora(model, path, overwrite=overwrite)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NotADirectoryError):
        export_peft_lora(model, tmp_path / "a-file", overwrite=True)


def test_save_over_existing_keeps_other_files(saved, tmp_path):
    path, _ = saved
    (path / "README.md").write_text("my notes")
    model = get_mos_model(tiny_llama(), MoSConfig(**{**CFG, "seed": 7}))
    model.save_pretrained(path)
    assert (path / "README.md").read_text() == "my notes"
    assert json.loads((path / CONFIG_NAME).read_text())["config"]["seed"] == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_failed_save_leaves_the_old_adapter(saved, tokens, monkeypatch):
    path, logits = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("moslora.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        get_mos_model(tiny_llama(), MoSConfig(**CFG)).save_pretrained(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert torch.equal(MoSModel.from_pretrained(tiny_llama(), path)(tokens).logits, logits)


# ---- every bad input gets its own clear error, and the base is left alone


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MoSModel.from_pretrained(tiny_llama(), tmp_path / "nope")


@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME])
def test_missing_file(saved, name):
    path, _ = saved
    (path / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing {name}"):
        MoSModel.from_pretrained(tiny_llama(), path)


def test_corrupt_json(saved):
    path, _ = saved
    (path / CONFIG_NAME).write_text('{"format": "moslora", ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        MoSModel.from_pretrained(tiny_llama(), path)


def test_truncated_weights(saved):
    path, _ = saved
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        MoSModel.from_pretrained(tiny_llama(), path)


def _rewrite(path, edit_header=None, edit_tensors=None):
    """Change a saved adapter and keep its checksum consistent, to reach the later checks."""
    header = json.loads((path / CONFIG_NAME).read_text())
    if edit_tensors:
        tensors = load_file(path / WEIGHTS_NAME)
        edit_tensors(tensors)
        save_file(tensors, path / WEIGHTS_NAME)
    if edit_header:
        edit_header(header)
    header["weights_sha256"] = _sha256(path / WEIGHTS_NAME)
    (path / CONFIG_NAME).write_text(json.dumps(header))


def test_an_adapter_saved_before_private_shards_loads_without_them(saved, tokens):
    path, logits = saved
    _rewrite(path, edit_header=lambda h: h["config"].pop("private_shards"))
    loaded = MoSModel.from_pretrained(tiny_llama(), path)
    assert loaded.mos_config.private_shards == 0 and torch.equal(loaded(tokens).logits, logits)


def test_unreadable_weights_with_valid_checksum(saved):
    path, _ = saved
    (path / WEIGHTS_NAME).write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    _rewrite(path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        MoSModel.from_pretrained(tiny_llama(), path)


def test_wrong_format_version(saved):
    path, _ = saved
    _rewrite(path, edit_header=lambda h: h.update(format_version=99))
    with pytest.raises(CheckpointError, match="format_version 99"):
        MoSModel.from_pretrained(tiny_llama(), path)


def test_peft_directory_is_named_as_such(saved, tmp_path):
    path, _ = saved
    export_peft_lora(MoSModel.from_pretrained(tiny_llama(), path), tmp_path / "peft")
    with pytest.raises(CheckpointError, match="PEFT adapter"):
        MoSModel.from_pretrained(tiny_llama(), tmp_path / "peft")


def test_invalid_config_in_file(saved):
    path, _ = saved
    _rewrite(path, edit_header=lambda h: h["config"].update(rank=0))
    with pytest.raises(CheckpointError, match="invalid config.*rank"):
        MoSModel.from_pretrained(tiny_llama(), path)


def test_shape_mismatch(saved):
    path, _ = saved
    key = "model/layers/*/self_attn/q_proj@64x64.pool_A"
    _rewrite(path, edit_tensors=lambda t: t.update({key: torch.zeros(3, 32)}))
    with pytest.raises(CheckpointError, match=r"q_proj@64x64.pool_A has shape \(3, 32\)"):
        MoSModel.from_pretrained(tiny_llama(), path)


def test_missing_tensor(saved):
    path, _ = saved
    _rewrite(path, edit_tensors=lambda t: t.pop("model/layers/*/mlp/up_proj@64x128.private_B"))
    with pytest.raises(CheckpointError, match="missing.*up_proj@64x128.private_B"):
        MoSModel.from_pretrained(tiny_llama(), path)


def test_out_of_range_index_caught_at_load(saved):
    path, _ = saved
    key = "model/layers/*/self_attn/v_proj@64x32.index_B"

    def poison(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0, 0] = 999

    _rewrite(path, edit_tensors=poison)
    with pytest.raises(CheckpointError, match="outside its pool"):
        MoSModel.from_pretrained(tiny_llama(), path)


def test_nan_values(saved):
    path, _ = saved
    key = "model/layers/*/mlp/down_proj@128x64.pool_B"
    _rewrite(path, edit_tensors=lambda t: t[key].fill_(float("nan")))
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        MoSModel.from_pretrained(tiny_llama(), path)


def test_different_architecture(saved):
    path, _ = saved
    with pytest.raises(CheckpointError, match="does not fit this base|saved for a LlamaForCausalLM"):
        MoSModel.from_pretrained(tiny_gpt2(), path)


def test_different_shapes_and_depth(saved):
    path, _ = saved
    with pytest.raises(CheckpointError, match="different base.*shape"):
        MoSModel.from_pretrained(tiny_llama(hidden=32), path)
    with pytest.raises(CheckpointError, match="different base.*not in this base"):
        MoSModel.from_pretrained(tiny_llama(layers=3), path)


def test_failed_load_leaves_the_base_untouched(saved):
    path, _ = saved
    (path / CONFIG_NAME).write_text("{}")
    base = tiny_llama()
    with pytest.raises(CheckpointError):
        MoSModel.from_pretrained(base, path)
    assert all(p.requires_grad for p in base.parameters())
    assert "MoSLinear" not in repr(base)
