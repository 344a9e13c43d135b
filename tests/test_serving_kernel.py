"""The one-token decode kernel: the C++ op equals the torch path, checks its inputs, and is used."""

import os
import subprocess
import sys
from functools import partial

import pytest
import torch
from conftest import D_IN, D_OUT, LAYERS, LLAMA_KINDS, randomize_adapter, stacked_layer, tiny_gpt2, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from moslora import MoSConfig, get_mos_model, solve_pools
from moslora.pools import ShardPools, kind_generator
from moslora.serving import MultiAdapterModel, multi
from moslora.serving.kernel import available, can_build, decode_update
from moslora.serving.stacked import StackedPools

needs_kernel = pytest.mark.skipif(not can_build(), reason="no C++ compiler or ninja: the torch path serves")


def test_the_kernel_is_built_wherever_a_compiler_is():
    """Set-up builds the op; a machine with a compiler and ninja that fails to build it is a
    failure here, not a silent fallback."""
    assert available() == can_build()


def reference(x, stack, members, groups, scaling):
    """The torch path's math, row by row: ``scaling · B (A x)`` with the gathered factors
    (which carry the layer scale)."""
    a, b = stack.factors(*stack.indices(members))
    out = torch.zeros(x.shape[0], D_OUT)
    for i, g in enumerate(groups.tolist()):
        if g >= 0:
            out[i] = scaling[g] * (b[g] @ (a[g] @ x[i]))
    return out


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(layer=stacked_layer(), data=st.data())
def test_the_op_equals_the_gathered_factors_for_any_adapters_rows_and_scales(layer, data):
    _, stack, members = layer
    rows = data.draw(st.integers(1, 9))
    groups = torch.tensor(data.draw(st.lists(st.integers(-1, len(members) - 1), min_size=rows, max_size=rows)))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    x, base = torch.randn(rows, D_IN, generator=gen), torch.randn(rows, D_OUT, generator=gen)
    scaling = torch.rand(len(members), generator=gen) + 0.5
    index_a, index_b, layer_scale = stack.indices(members)
    scale = scaling.view(-1, 1) * (torch.ones(stack.rank) if layer_scale is None else layer_scale.squeeze(-1))
    out = base.clone()
    decode_update(x, out, stack.pool_a, stack.pool_b, index_a.contiguous(), index_b.contiguous(), groups, scale)
    torch.testing.assert_close(out, base + reference(x, stack, members, groups, scaling), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[groups < 0], base[groups < 0]), "a row with no adapter must be left exactly as it was"


@needs_kernel
def test_the_op_refuses_inputs_it_cannot_read_safely():
    cfg = MoSConfig(rank=4, budget_rank=2, private_rank=1)
    pools = ShardPools(solve_pools(cfg, LAYERS, D_IN, D_OUT), cfg, kind_generator(0, "kind"))
    with torch.no_grad():
        pools.pool_B.normal_()
    stack = StackedPools([pools])
    index_a, index_b, _ = stack.indices([(0, 0)])
    x, out = torch.randn(2, D_IN), torch.zeros(2, D_OUT)
    groups, scale = torch.tensor([0, -1]), torch.ones(1, stack.rank)
    args = (stack.pool_a, stack.pool_b, index_a.contiguous(), index_b.contiguous())
    with pytest.raises(RuntimeError, match="outside its pool"):
        decode_update(x, out, stack.pool_a, stack.pool_b, index_a + 10**6, index_b.contiguous(), groups, scale)
    with pytest.raises(RuntimeError, match="groups must be in"):
        decode_update(x, out, *args, torch.tensor([0, 1]), scale)
    with pytest.raises(RuntimeError, match="must be Float"):
        decode_update(x, out.double(), *args, groups, scale)
    with pytest.raises(RuntimeError, match="contiguous"):
        decode_update(x, torch.zeros(D_OUT, 2).T, *args, groups, scale)
    with pytest.raises(RuntimeError, match="float CPU tensor"):
        decode_update(x.long(), out, *args, groups, scale)
    # a layer's (B, 1, d) input in another dtype is read as float32 rows
    want, got = torch.zeros(2, D_OUT), torch.zeros(2, 1, D_OUT)
    decode_update(x.double(), want, *args, groups, scale)
    decode_update(x.double().T.contiguous().T.unsqueeze(1), got, *args, groups, scale)
    assert torch.equal(got.squeeze(1), want) and want[0].abs().sum() > 0
    with pytest.raises(RuntimeError, match="disagree on rows"):
        decode_update(x, torch.zeros(3, D_OUT), *args, groups, scale)


@needs_kernel
@pytest.mark.parametrize("make_base", [tiny_llama, partial(tiny_gpt2, layers=4)], ids=["llama", "gpt2-conv1d"])
def test_decoding_with_the_op_equals_the_torch_path(tmp_path, monkeypatch, make_base):
    """Mixed ranks, strategies, layer subsets, a layer scale, base rows, left padding and beams:
    greedy and beam tokens identical, every step's scores within 1e-5, and the op was called."""
    kinds = LLAMA_KINDS if make_base is tiny_llama else ["c_attn", "c_proj", "c_fc"]
    configs = {"a": MoSConfig(target_modules=kinds, rank=8, budget_rank=3, private_rank=1, shards_per_vector=2,
                              alpha=12.0),
               "s": MoSConfig(target_modules=kinds[:2], rank=5, budget_rank=2, layer_scale=True, seed=3,
                              subset_selection=False, pair_dissociation=False),
               "c": MoSConfig(target_modules=kinds, rank=4, budget_rank=2, shards_per_vector=4, pool_lr_scale=0.5,
                              seed=5)}
    mm = MultiAdapterModel(make_base())
    for i, (name, cfg) in enumerate(configs.items()):
        model = get_mos_model(make_base(), cfg)
        randomize_adapter(model, seed=20 + i)
        with torch.no_grad():
            for pools in model.mos_pools.values():
                if pools.scale is not None:
                    pools.scale.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(i))
        model.save_pretrained(tmp_path / name)
        mm.load_adapter(name, tmp_path / name)
    ids = torch.randint(0, 128, (6, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    names = ["a", "s", None, "c", "a", "s"]
    calls = []
    monkeypatch.setattr(multi, "decode_update", lambda *a: (calls.append(mm.decode_kernel), decode_update(*a)))
    runs = {}
    for kernel in (True, False):
        mm.decode_kernel = kernel
        for beams in (1, 2):
            gen = dict(max_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=0, output_scores=True,
                       return_dict_in_generate=True)
            runs[kernel, beams] = mm.generate(ids, attention_mask=mask, adapter_names=names, **gen)
    assert calls and set(calls) == {True}, "the op must serve the decoding steps, and only with decode_kernel"
    for beams in (1, 2):
        fast, slow = runs[True, beams], runs[False, beams]
        assert torch.equal(fast.sequences, slow.sequences)
        for f, s in zip(fast.scores, slow.scores, strict=True):
            torch.testing.assert_close(f, s, rtol=0, atol=1e-5)


def test_the_op_can_be_turned_off_for_a_process():
    env = {**os.environ, "MOSLORA_DECODE_KERNEL": "0"}
    out = subprocess.run([sys.executable, "-c", "from moslora.serving.kernel import available; print(available())"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
