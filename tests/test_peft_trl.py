"""TRL trains MoS adapters through ``moslora.peft``: ``SFTTrainer(peft_config=MoSPeftConfig(...))``,
and ``DPOTrainer``, whose reference model is the base under ``disable_adapter()`` or a frozen
copy of the adapter made with ``add_adapter("ref")``.

A tiny random Llama over the real SmolLM2 tokenizer (the asset packages must be installed),
a few steps on a handful of chat examples.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') skips this file

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from peft import PeftModel, get_peft_model  # noqa: E402

from moslora.assets import default_model_path  # noqa: E402
from conftest import randomize_adapter  # noqa: E402
from moslora.peft import MoSPeftConfig  # noqa: E402


PAIRS = [("Is this review positive? A joy from start to end.", "yes"),
         ("Is this review positive? Dull and far too long.", "no"),
         ("Is this review positive? The best film this year.", "yes"),
         ("Is this review positive? I walked out after an hour.", "no")]


def tiny_base(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=vocab))


def mos_config() -> MoSPeftConfig:
    return MoSPeftConfig(target_modules="all-linear", rank=3, budget_rank=2, private_rank=1,
                         task_type="CAUSAL_LM")


def few_steps(config_cls: type, out: str, **kwargs) -> object:
    """TRL training arguments for a few deterministic CPU steps."""
    return config_cls(output_dir=out, max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                      lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                      report_to=[], use_cpu=True, bf16=False, max_length=64,
                      dataloader_num_workers=0, seed=0, **kwargs)


def snapshot(pools: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pools.named_parameters()}


def test_sft_trainer_trains_an_mos_adapter_that_reloads(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    data = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
        for q, a in PAIRS
    ])
    args = few_steps(trl.SFTConfig, str(tmp_path / "run"))
    trainer = trl.SFTTrainer(model=tiny_base(len(tokenizer)), args=args, train_dataset=data,
                             processing_class=tokenizer, peft_config=mos_config())
    model = trainer.model
    assert isinstance(model, PeftModel)
    pools = model.base_model.mos_pools["default"]
    before = snapshot(pools)
    trainer.train()

    moved = [k for k, v in pools.named_parameters() if not torch.equal(v, before[k])]
    assert moved and all(k.endswith(("pool_A", "pool_B", "private_A", "private_B"))
                         for k in moved)
    assert any(k.endswith("pool_B") for k in moved)  # B starts at zero: the update is live
    base_params = [p for n, p in model.named_parameters() if "mos_pools" not in n]
    assert not any(p.requires_grad for p in base_params)  # the base stayed frozen

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny_base(len(tokenizer)), tmp_path / "adapter")
    tokens = tokenizer(PAIRS[0][0], return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        diff = (reloaded(input_ids=tokens).logits - model(input_ids=tokens).logits).abs().max()
    assert diff.item() <= 1e-6


@pytest.mark.parametrize("reference", ["disabled adapter", "ref adapter"])
def test_dpo_trainer_trains_an_mos_adapter_against_its_reference(reference, tmp_path):
    """DPO's first loss is exactly ln 2 iff the reference equals the policy at step 0: the base
    (adapters disabled) for a fresh adapter, or the frozen "ref" copy DPO adds of a trained one."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    data = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": q}],
         "chosen": [{"role": "assistant", "content": a}],
         "rejected": [{"role": "assistant", "content": "no" if a == "yes" else "yes"}]}
        for q, a in PAIRS
    ])
    base, peft_config = tiny_base(len(tokenizer)), mos_config()
    if reference == "ref adapter":  # a PeftModel with a non-zero adapter, e.g. after SFT
        base, peft_config = get_peft_model(base, peft_config), None
        randomize_adapter(base, std=0.05)
    trainer = trl.DPOTrainer(model=base, args=few_steps(trl.DPOConfig, str(tmp_path)),
                             train_dataset=data, processing_class=tokenizer,
                             peft_config=peft_config)
    pools = trainer.model.base_model.mos_pools
    assert ("ref" in pools) == (reference == "ref adapter")
    before = snapshot(pools["default"])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert all(not torch.equal(v, before[k]) for k, v in pools["default"].named_parameters())
    if reference == "ref adapter":
        assert not any(p.requires_grad for p in pools["ref"].parameters())
