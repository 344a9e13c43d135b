"""moslora.peft: MoS as a registered PEFT method, run by PEFT's own machinery.

Every check compares against something independent: a fresh base, the unwrapped base's logits,
or moslora's own ``get_mos_model`` with the same config and seed.
"""

from __future__ import annotations

import pickle
import tomllib
from pathlib import Path
from types import SimpleNamespace

import peft
import pytest
import torch
from packaging.specifiers import SpecifierSet
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from conftest import randomize_adapter, tiny_llama
from moslora import MoSConfig, get_mos_model
from moslora.peft import (SUPPORTED_PEFT, MoSPeftConfig, MoSPeftLayer, add_peft_type,
                          check_peft_version)

# two layers allow rank <= p + (e - p) * L = 3 at e = 2, p = 1; l = 2 and p = 1 exercise both
# strategies that add state (vector sharding, privatization)
SETTINGS = dict(target_modules="all-linear", rank=3, budget_rank=2, shards_per_vector=2,
                private_rank=1, seed=3)


def mos_peft(base: torch.nn.Module, **overrides) -> PeftModel:
    return get_peft_model(base, MoSPeftConfig(task_type="CAUSAL_LM", **{**SETTINGS, **overrides}))


def randomize(model: PeftModel, adapter: str, seed: int) -> None:
    """Non-zero pools (B starts at zero) for one adapter, so updates differ from the base."""
    randomize_adapter(SimpleNamespace(mos_pools=model.base_model.mos_pools[adapter]), seed=seed)


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture
def model():
    m = mos_peft(tiny_llama(layers=2))
    randomize(m, "default", seed=1)
    return m


def test_save_then_from_pretrained_on_a_fresh_base_gives_the_same_logits(model, tokens, tmp_path):
    model.save_pretrained(tmp_path)
    # under another name: saved keys carry no adapter name, so any name loads them
    loaded = PeftModel.from_pretrained(tiny_llama(layers=2), tmp_path, adapter_name="reloaded")
    assert isinstance(loaded.base_model.model.model.layers[0].self_attn.q_proj, MoSPeftLayer)
    assert max_diff(logits(loaded, tokens), logits(model, tokens)) <= 1e-6
    assert max_diff(logits(model, tokens), logits(tiny_llama(layers=2), tokens)) > 1e-3  # not a no-op


def test_trainable_count_is_moslora_own_with_pools_counted_once(model):
    own = get_mos_model(tiny_llama(layers=2), MoSConfig(**SETTINGS))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == own.trainable_parameters() == own.parameter_report().total
    assert trainable < own.parameter_report().lora_same_rank_total  # shared, not per layer


def test_same_config_and_seed_give_moslora_own_adapter_and_logits(tokens):
    peft_model = mos_peft(tiny_llama(layers=2))
    own = get_mos_model(tiny_llama(layers=2), MoSConfig(**SETTINGS))
    ours, theirs = peft_model.base_model.mos_pools["default"].state_dict(), own.mos_pools.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # routing and init, before training
    randomize(peft_model, "default", seed=1)
    randomize_adapter(own, seed=1)
    assert max_diff(logits(peft_model, tokens), logits(own, tokens)) <= 1e-6


def test_named_adapters_switch_outputs_and_gradients(model, tokens):
    first = logits(model, tokens)
    model.add_adapter("other", MoSPeftConfig(task_type="CAUSAL_LM", **{**SETTINGS, "seed": 4}))
    randomize(model, "other", seed=2)
    assert torch.equal(logits(model, tokens), first)  # adding does not activate
    model.set_adapter("other")
    assert max_diff(logits(model, tokens), first) > 1e-3
    pools = model.base_model.mos_pools
    assert all(p.requires_grad for p in pools["other"].parameters())
    assert not any(p.requires_grad for p in pools["default"].parameters())
    model.set_adapter("default")
    assert torch.equal(logits(model, tokens), first)


def test_disable_adapter_gives_the_base_logits(model, tokens):
    base = logits(tiny_llama(layers=2), tokens)
    with model.disable_adapter():
        assert max_diff(logits(model, tokens), base) == 0.0
    assert max_diff(logits(model, tokens), base) > 1e-3


def test_delete_adapter_removes_its_pools_and_keeps_the_other(model, tokens):
    first = logits(model, tokens)
    model.add_adapter("other", MoSPeftConfig(task_type="CAUSAL_LM", **SETTINGS))
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert list(model.base_model.mos_pools) == ["default"]
    layers = [m for m in model.modules() if isinstance(m, MoSPeftLayer)]
    assert layers and all(set(m.mos_pools) == {"default"} for m in layers)
    assert not any(".other." in k for k in model.state_dict())
    assert torch.equal(logits(model, tokens), first)


def test_merge_and_unmerge_are_exact(model, tokens):
    unmerged = logits(model, tokens)
    weight = model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight
    original = weight.detach().clone()
    model.merge_adapter()
    assert max_diff(weight, original) > 0
    assert max_diff(logits(model, tokens), unmerged) <= 1e-5
    model.unmerge_adapter()
    assert max_diff(weight, original) <= 1e-6
    assert max_diff(logits(model, tokens), unmerged) <= 1e-5


def test_merge_and_unload_gives_a_plain_model_with_the_same_logits(model, tokens):
    adapted = logits(model, tokens)
    plain = model.merge_and_unload()
    assert type(plain) is LlamaForCausalLM
    assert not any(isinstance(m, MoSPeftLayer) for m in plain.modules())
    assert max_diff(logits(plain, tokens), adapted) <= 1e-5


@pytest.mark.parametrize("layers", [2, 4])
def test_save_holds_each_kind_once_whatever_the_layer_count(layers, tmp_path):
    mos_peft(tiny_llama(layers=layers)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    kinds = {k.split(".")[2] for k in tensors}
    assert len(kinds) == 7  # q, k, v, o, gate, up, down: one entry per kind, none per layer
    assert len(tensors) == 6 * len(kinds)  # pools, private segments (stacked per kind), indices
    assert all(k.startswith("base_model.mos_pools.") and ".default." not in k for k in tensors)
    assert tensors[f"base_model.mos_pools.{sorted(kinds)[0]}.index_A"].shape[0] == layers


def test_unsupported_peft_version_is_refused_with_a_clear_message(monkeypatch):
    check_peft_version()  # the installed one passes
    for version in ("0.20.0", "0.22.0", "1.0.0"):
        monkeypatch.setattr(peft, "__version__", version)
        with pytest.raises(ImportError, match=rf"supports peft.*but peft {version} is installed"):
            check_peft_version()


def test_peft_type_shim_makes_a_real_enum_member():
    mos = PeftType.MOS
    assert PeftType("MOS") is mos and mos in list(PeftType) and add_peft_type("MOS") is mos
    assert pickle.loads(pickle.dumps(mos)) is mos and mos == "MOS"
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MOS"] is MoSPeftConfig  # how a saved config is resolved


def test_pyproject_declares_the_supported_peft_range():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (requirement,) = pyproject["project"]["optional-dependencies"]["peft"]
    assert SpecifierSet(requirement.removeprefix("peft")) == SUPPORTED_PEFT


def test_bad_config_gets_moslora_own_error():
    with pytest.raises(ValueError, match="largest rank that fits is 3"):
        mos_peft(tiny_llama(layers=2), rank=8)
