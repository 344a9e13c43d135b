"""Shared fixtures: tiny random models built from configs (no downloads)."""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from moslora import MoSConfig, get_mos_model, solve_pools
from moslora.config import ConfigError, default_targets
from moslora.pools import ShardPools, kind_generator
from moslora.serving.stacked import StackedPools

LLAMA_KINDS = default_targets("llama")


def tiny_llama(layers: int = 4, hidden: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers: int = 3, hidden: int = 32, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=128, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def randomize_adapter(model, std: float = 0.05, seed: int = 1) -> None:
    """Give every MoS parameter non-zero values, so B A != 0 and checks have teeth."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.mos_pools.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def tokens():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def clone():
    return copy.deepcopy


def replayable_rng(name: str) -> random.Random:
    """A fresh random seed per run (kill timings should vary), printed so that a failure
    can be replayed: pytest shows a failed test's output; set MOSLORA_TEST_SEED to rerun it."""
    seed = int(os.environ.get("MOSLORA_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"{name}: seed {seed} (replay with MOSLORA_TEST_SEED={seed})")
    return random.Random(seed)


@st.composite
def budgets(draw, max_budget: int = 8, max_layers: int = 12, max_width: int = 24):
    """Configurations drawn valid by construction (l divides the widths, p < e, the rank
    within what subset selection allows), so the property holds its assertions on nearly
    every example; the solver may still refuse a few, which ``assume`` discards."""
    l = draw(st.sampled_from([1, 2, 3, 4]))
    e, layers = draw(st.integers(1, max_budget)), draw(st.integers(1, max_layers))
    subset = draw(st.booleans())
    p = draw(st.integers(0, e - 1))
    top = p + (e - p) * layers  # a layer's public ranks must fit in the pool, routed or not
    r = draw(st.integers(max(1, p), max(1, p, min(64, top))))
    return dict(e=e, r=r, l=l, p=p, layers=layers, subset=subset,
                d_in=l * draw(st.integers(1, max_width)), d_out=l * draw(st.integers(1, max_width)))


@pytest.fixture
def saved_base_and_adapter(tmp_path):
    """A tiny Llama saved as a local model folder (with a tokenizer) and an MoS adapter for it."""
    from transformers import AutoTokenizer

    from moslora.assets import default_model_path

    tiny_llama().save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(tmp_path / "base")
    model = get_mos_model(tiny_llama(), MoSConfig(rank=3, budget_rank=2, private_rank=1))
    randomize_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", model


def adapter_root(tmp_path_factory, name: str):
    """A folder holding one saved MoS adapter ``name`` for tiny_llama() (a server's root)."""
    root = tmp_path_factory.mktemp("root")
    model = get_mos_model(tiny_llama(), MoSConfig(target_modules=LLAMA_KINDS, rank=4, budget_rank=2))
    randomize_adapter(model, std=0.2)
    model.save_pretrained(root / name)
    return root


LAYERS, D_IN, D_OUT = 4, 24, 12  # adapter_pools' kind


@st.composite
def adapter_pools(draw) -> ShardPools:
    """One adapter's pools of a (4 layers, 24 -> 12) kind with any strategies and variants,
    shard privatization, every parameter random (so zero-initialised B cannot hide a wrong index)."""
    budget = draw(st.integers(1, 3))
    cfg = dict(rank=draw(st.integers(1, 6)), budget_rank=budget, private_rank=draw(st.integers(0, budget - 1)),
               shards_per_vector=draw(st.sampled_from([1, 2, 3, 4])), subset_selection=draw(st.booleans()),
               pair_dissociation=draw(st.booleans()), layer_scale=draw(st.booleans()),
               pool_lr_scale=draw(st.sampled_from([1.0, 0.5])), private_shards=draw(st.integers(0, 2)),
               seed=draw(st.integers(0, 99)))
    try:
        config = MoSConfig(**cfg)
        plan = solve_pools(config, LAYERS, D_IN, D_OUT)
    except ConfigError:
        config = MoSConfig(rank=2, budget_rank=1, seed=cfg["seed"])
        plan = solve_pools(config, LAYERS, D_IN, D_OUT)
    pools = ShardPools(plan, config, kind_generator(config.seed, "kind"))
    gen = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for p in pools.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return pools


@st.composite
def stacked_layer(draw) -> tuple[list[ShardPools], StackedPools, list[tuple[int, int]]]:
    """1-4 adapters' pools (``adapter_pools``) end to end, and one layer's members: any subset of
    the adapters, in any order (a layer that only some adapters target)."""
    parts = draw(st.lists(adapter_pools(), min_size=1, max_size=4))
    layer = draw(st.integers(0, LAYERS - 1))
    order = draw(st.permutations(range(len(parts))))
    return parts, StackedPools(parts), [(g, layer) for g in order[:draw(st.integers(1, len(parts)))]]
