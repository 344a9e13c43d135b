import copy
import warnings

import pytest
import torch
from conftest import LLAMA_KINDS, randomize_adapter, tiny_gpt2, tiny_llama
from torch import nn

from moslora import MoSConfig, MoSLinear, get_mos_model
from moslora.targeting import kind_pattern


def test_kind_pattern():
    assert kind_pattern("model.layers.12.self_attn.q_proj") == "model.layers.*.self_attn.q_proj"
    assert kind_pattern("encoder.block.0.layer.1.DenseReluDense.wi") == "encoder.block.*.layer.*.DenseReluDense.wi"
    assert kind_pattern("0.lin") == "*.lin"
    assert kind_pattern("3") == "*"


def test_logits_at_init_equal_the_base_exactly(llama, tokens):
    ref = llama(tokens).logits
    model = get_mos_model(llama, MoSConfig(target_modules="all-linear", rank=5, budget_rank=2, private_rank=1,
                                           shards_per_vector=2))
    assert torch.equal(model(tokens).logits, ref)


def test_parameter_count_matches_formula_llama():
    model = get_mos_model(tiny_llama(layers=4), MoSConfig(target_modules=LLAMA_KINDS, rank=6, budget_rank=3,
                                                          private_rank=1, shards_per_vector=2))
    # hidden 64, intermediate 128, kv dim 32 (2 kv heads of 16)
    shapes = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
              "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    expected = sum(4 * 3 * (d_in + d_out) for d_in, d_out in shapes.values())
    assert model.trainable_parameters() == expected
    report = model.parameter_report()
    assert report.total == report.lora_budget_total == expected
    assert report.lora_same_rank_total == expected * 2
    rows = {r["kind"]: r for r in report.rows()}
    q = rows["model.layers.*.self_attn.q_proj"]
    assert (q["L"], q["d_in"], q["d_out"], q["pool_shards"]) == (4, 64, 64, (3 - 1) * 4 * 2)
    assert q["private"] == 4 * 1 * 128 and q["public"] == 16 * (32 + 32)
    assert "TOTAL" in str(report)


def test_parameter_count_matches_formula_gpt2_conv1d():
    gpt2 = tiny_gpt2(layers=3, hidden=32)
    model = get_mos_model(gpt2, MoSConfig(target_modules=["c_attn", "c_proj"], rank=3, budget_rank=1))
    # c_attn 32->96, attn.c_proj 32->32, mlp.c_proj 128->32: two different c_proj kinds
    expected = 3 * 1 * ((32 + 96) + (32 + 32) + (128 + 32))
    assert model.trainable_parameters() == expected
    assert len(model.kinds) == 3
    assert all(isinstance(m, MoSLinear) for m in model.mos_layers.values())


def test_targets_by_regex_and_all_linear(llama):
    m = get_mos_model(copy.deepcopy(llama), MoSConfig(target_modules=r".*\.(q|v)_proj", rank=2, budget_rank=2))
    assert len(m.mos_layers) == 8
    m = get_mos_model(llama, MoSConfig(target_modules="all-linear", rank=2, budget_rank=2))
    assert len(m.mos_layers) == 28 and "lm_head" not in m.mos_layers


def test_unknown_target_lists_what_exists(llama):
    with pytest.raises(ValueError, match=r"\['qq_proj'\] matched no module.*q_proj"):
        get_mos_model(llama, MoSConfig(target_modules=["q_proj", "qq_proj"], rank=2, budget_rank=2))
    with pytest.raises(ValueError, match="matched no module"):
        get_mos_model(llama, MoSConfig(target_modules=r"nothing\..*", rank=2, budget_rank=2))


def test_non_linear_target_is_explained(llama):
    with pytest.raises(ValueError, match="not linear layers.*embed_tokens"):
        get_mos_model(llama, MoSConfig(target_modules=["embed_tokens"], rank=2, budget_rank=2))


def test_budget_that_cannot_be_met_is_explained(llama):
    with pytest.raises(ValueError, match="largest rank that fits is 5"):
        get_mos_model(llama, MoSConfig(target_modules=["q_proj"], rank=16, budget_rank=2, private_rank=1))


def test_only_pools_and_private_segments_get_gradients(llama, tokens):
    model = get_mos_model(llama, MoSConfig(target_modules=LLAMA_KINDS, rank=5, budget_rank=2, private_rank=1))
    randomize_adapter(model)
    model(input_ids=tokens, labels=tokens).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mos_pools.") for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if p.requires_grad)


def test_training_reduces_loss_on_regression():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    x = torch.randn(256, 16)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    model = get_mos_model(base, MoSConfig(target_modules=r"[024]", rank=4, budget_rank=4, private_rank=1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_merge_unmerge_and_unload(llama, tokens):
    original = {n: p.detach().clone() for n, p in llama.state_dict().items()}
    model = get_mos_model(llama, MoSConfig(target_modules="all-linear", rank=5, budget_rank=2, private_rank=1))
    randomize_adapter(model)
    ref = model(tokens).logits
    model.merge()
    assert model.merged
    assert (model(tokens).logits - ref).abs().max() <= 1e-5
    model.unmerge()
    restored = {n.replace(".base_layer", ""): p for n, p in model.base_model.state_dict().items()}
    assert max((restored[n] - w).abs().max().item() for n, w in original.items()) <= 1e-6
    base = model.merge_and_unload()
    assert not any(isinstance(m, MoSLinear) for m in base.modules())
    assert (base(tokens).logits - ref).abs().max() <= 1e-5
    with pytest.raises(RuntimeError, match="merge_and_unload"):
        model(tokens)


def test_disable_adapter_gives_the_base(llama, tokens):
    ref = llama(tokens).logits
    model = get_mos_model(llama, MoSConfig(rank=2, budget_rank=2))
    randomize_adapter(model)
    assert not torch.allclose(model(tokens).logits, ref)
    with model.disable_adapter():
        assert torch.equal(model(tokens).logits, ref)
    model.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        with model.disable_adapter():
            pass


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tokens, reentrant):
    grads = []
    for checkpointing in (False, True):
        model = get_mos_model(tiny_llama(), MoSConfig(rank=3, budget_rank=2, private_rank=1))
        randomize_adapter(model)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        model.train()
        model(input_ids=tokens, labels=tokens).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)


def test_generate_passthrough(llama, tokens):
    model = get_mos_model(llama, MoSConfig(rank=2, budget_rank=2))
    out = model.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    assert model.config is llama.config  # attribute passthrough


def test_4bit_base_trains():
    import bitsandbytes as bnb  # a test extra: its absence must fail, not skip

    base = tiny_llama(layers=2)
    # quantize every linear layer but the head, QLoRA style
    for name, module in list(base.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  quant_type="nf4", compute_dtype=torch.float32)
            q.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, q.to("cpu"))
    with torch.no_grad():  # a zero-shot eval first: bitsandbytes may repack weights for inference
        base(torch.randint(0, 128, (1, 4)))
    model = get_mos_model(base, MoSConfig(target_modules="all-linear", rank=3, budget_rank=2, private_rank=1))
    data = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    model.eval()
    with torch.no_grad():
        ref = model(data).logits
        model.merge()  # exact: dequantized into dense layers
        assert (model(data).logits - ref).abs().max() <= 1e-4
        model.unmerge()  # the 4-bit layers are back
        assert all(isinstance(l.base_layer, bnb.nn.Linear4bit) for l in model.mos_layers.values())
        assert torch.equal(model(data).logits, ref)
        model.merge(requantize=True)  # lossy, and says by how much
    for layer in model.mos_layers.values():
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        absmax = layer.base_layer.weight.quant_state.absmax.max().item()
        assert 0 < layer.merge_error <= 0.15 * absmax  # NF4's half-gap of a block's absmax


def test_a_budget_above_the_rank_warns(llama):
    with pytest.warns(UserWarning, match="budget_rank=8 > rank=4: the adapter trains as many parameters"):
        get_mos_model(llama, MoSConfig(rank=4, budget_rank=8))


def test_a_budget_below_the_rank_does_not_warn(llama):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_mos_model(llama, MoSConfig(rank=4, budget_rank=2))


def test_loading_onto_a_base_wrapped_in_place_says_so(llama, tmp_path):
    from moslora import MoSModel

    model = get_mos_model(llama, MoSConfig(rank=3, budget_rank=2))
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="already carries an MoS adapter: get_mos_model and "
                                         "MoSModel.from_pretrained wrap the base model in place"):
        MoSModel.from_pretrained(llama, tmp_path / "a")
    MoSModel.from_pretrained(tiny_llama(), tmp_path / "a")  # a fresh base takes it
