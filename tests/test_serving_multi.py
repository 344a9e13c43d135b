"""MultiAdapterModel: mixed batches equal each adapter alone; registry, memory and errors."""

import gc
import shutil
import weakref

import pytest
import torch
from conftest import LLAMA_KINDS, randomize_adapter, tiny_gpt2, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moslora import CheckpointError, MoSConfig, MoSModel, get_mos_model
from moslora.layer import add_to_weight
from moslora.serving import BASE, MultiAdapterLinear, MultiAdapterModel, UnknownAdapterError

# Different ranks, scalings (alpha / r not a power of two, so folding it into B rounds
# differently), strategies and layer subsets: "c" targets two kinds in layers 1-2 only, so its
# layer indices within a kind differ from the others'; "d" uses all-linear and is loaded last,
# after the others have wrapped the base.
CONFIGS = {
    "a": MoSConfig(target_modules=LLAMA_KINDS, rank=8, budget_rank=3, private_rank=1,
                   shards_per_vector=2, alpha=12.0),
    "b": MoSConfig(target_modules=["q_proj", "v_proj"], rank=3, budget_rank=1, alpha=5.0, seed=3),
    "c": MoSConfig(target_modules=r"model\.layers\.[12]\.(mlp\.down_proj|self_attn\.o_proj)", rank=4,
                   budget_rank=2, subset_selection=False, pair_dissociation=False, alpha=7.0, seed=5),
    "d": MoSConfig(target_modules="all-linear", rank=5, budget_rank=2, private_rank=1, alpha=6.5, seed=7),
}
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each adapter saved with non-zero weights: name -> directory."""
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        model = get_mos_model(tiny_llama(), cfg)
        randomize_adapter(model, seed=10 + i)
        model.save_pretrained(root / name)
    return {name: root / name for name in CONFIGS}


@pytest.fixture(scope="module")
def batch():
    """Six rows, two of them left-padded."""
    ids = torch.randint(0, 128, (6, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[4, :6] = 0
    return ids, mask


@pytest.fixture(scope="module")
def alone(saved, batch):
    """Reference logits and greedy tokens for the whole batch: each adapter alone via
    MoSModel.from_pretrained, and the bare base (key None)."""
    ids, mask = batch
    models = {name: MoSModel.from_pretrained(tiny_llama(), path) for name, path in saved.items()}
    models[None] = tiny_llama()
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return {
        name: (m(ids, attention_mask=mask).logits, m.generate(ids, attention_mask=mask, **gen))
        for name, m in models.items()
    }


@pytest.fixture(scope="module")
def served(saved):
    mm = MultiAdapterModel(tiny_llama())
    for name, path in saved.items():
        mm.load_adapter(name, path)
    return mm


def _key(name):
    return None if name == BASE else name


def test_adapters_change_the_logits(alone):
    # otherwise the equivalence checks below would pass with no adapter at all
    for name in CONFIGS:
        assert (alone[name][0] - alone[None][0]).abs().max() > 0.05


def test_mixed_forward_matches_each_adapter_alone(served, alone, batch):
    ids, mask = batch
    names = ["d", None, "b", "c", BASE, "a"]
    logits = served(ids, attention_mask=mask, adapter_names=names).logits
    for i, name in enumerate(names):
        ref = alone[_key(name)][0][i]
        if _key(name) is None:
            assert torch.equal(logits[i], ref), "base rows must be the bare base exactly"
        else:
            assert (logits[i] - ref).abs().max() <= 1e-5, name


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 5), st.sampled_from([*CONFIGS, None, BASE])), min_size=1, max_size=7))
def test_any_rows_in_any_order(served, alone, batch, rows):
    ids, mask = batch
    index = torch.tensor([r for r, _ in rows])
    names = [n for _, n in rows]
    logits = served(ids[index], attention_mask=mask[index], adapter_names=names).logits
    for i, (row, name) in enumerate(rows):
        assert (logits[i] - alone[_key(name)][0][row]).abs().max() <= 1e-5


def test_greedy_generate_matches_each_adapter_alone(served, alone, batch):
    ids, mask = batch
    names = ["a", "b", BASE, "d", "c", "a"]
    out = served.generate(ids, attention_mask=mask, adapter_names=names,
                          max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert out.shape == (6, ids.shape[1] + NEW_TOKENS)
    for i, name in enumerate(names):
        assert torch.equal(out[i], alone[_key(name)][1][i]), name
    assert all(layer.route is None for layer in served._layers.values()), "routes must not outlive the call"


def test_beams_keep_their_rows_adapter(served, saved, batch):
    ids, mask = batch
    gen = dict(max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    out = served.generate(ids[:2], attention_mask=mask[:2], adapter_names=["b", "a"], **gen)
    for i, name in enumerate(["b", "a"]):
        ref = MoSModel.from_pretrained(tiny_llama(), saved[name]).generate(ids[:2], attention_mask=mask[:2], **gen)
        assert torch.equal(out[i], ref[i])


def test_rows_reach_each_layer_grouped_by_adapter(served, saved, alone, batch):
    ids, mask = batch
    layer = served._layers["model.layers.0.self_attn.q_proj"]
    seen = []
    hook = layer.register_forward_pre_hook(
        lambda module, args: seen.append([u.rows.index(args[0].shape[0]) for u in module.route.updates]))
    try:
        logits = served(ids, attention_mask=mask, adapter_names=["a"] * 6).logits
        out = served.generate(ids[:2], attention_mask=mask[:2], adapter_names=["b", "b"], max_new_tokens=3,
                              num_beams=2, do_sample=False, pad_token_id=0)
        served(ids[:3], attention_mask=mask[:3], adapter_names=["b", "a", "a"])
        served(ids[:3], attention_mask=mask[:3], adapter_names=["a", "b", "a"])
    finally:
        hook.remove()
    assert seen[0] == [None], "one adapter for every row: plain matmuls over all tokens"
    assert seen[-2] == [slice(0, 1), slice(1, 3)], "contiguous rows: views, no gather"
    assert [r.tolist() if isinstance(r, torch.Tensor) else r for r in seen[-1]] == [[0, 2], slice(1, 2)]
    assert (logits - alone["a"][0]).abs().max() <= 1e-5
    ref = MoSModel.from_pretrained(tiny_llama(), saved["b"]).generate(
        ids[:2], attention_mask=mask[:2], max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_repeated_rows_keep_their_adapter(served, saved, batch):
    # beams and extra sequences repeat each row in place: row i's k copies are rows i*k .. i*k+k-1
    ids, mask = batch
    gen = dict(max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    names = ["a", "c", "a"]
    out = served.generate(ids[:3], attention_mask=mask[:3], adapter_names=names, **gen)
    for name in ("a", "c"):
        ref = MoSModel.from_pretrained(tiny_llama(), saved[name]).generate(ids[:3], attention_mask=mask[:3], **gen)
        for i in (i for i, n in enumerate(names) if n == name):
            assert torch.equal(out[2 * i:2 * i + 2], ref[2 * i:2 * i + 2]), name


def test_variants_in_a_mixed_batch_match_each_adapter_alone(tmp_path, batch):
    """layer_scale and pool_lr_scale reach the stacked gather: a mixed batch of them and a
    plain adapter equals each alone, in one forward and in greedy decoding."""
    ids, mask = batch
    configs = {"s": MoSConfig(target_modules=LLAMA_KINDS, rank=5, budget_rank=3, private_rank=1,
                              layer_scale=True, seed=1),
               "c": MoSConfig(target_modules=LLAMA_KINDS, rank=4, budget_rank=2, shards_per_vector=4,
                              pool_lr_scale=0.5, seed=2),
               "p": MoSConfig(target_modules=["q_proj"], rank=2, budget_rank=1, seed=4)}
    mm, names = MultiAdapterModel(tiny_llama()), ["s", "c", None, "p", "s", "c"]
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    refs = {None: tiny_llama()}
    for i, (name, cfg) in enumerate(configs.items()):
        model = get_mos_model(tiny_llama(), cfg)
        randomize_adapter(model, seed=40 + i)
        with torch.no_grad():  # scales away from 1, so the check has teeth
            for pools in model.mos_pools.values():
                if pools.scale is not None:
                    pools.scale.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(i))
        model.save_pretrained(tmp_path / name)
        mm.load_adapter(name, tmp_path / name)
        refs[name] = MoSModel.from_pretrained(tiny_llama(), tmp_path / name)
    logits = mm(ids, attention_mask=mask, adapter_names=names).logits
    tokens = mm.generate(ids, attention_mask=mask, adapter_names=names, **gen)
    for i, name in enumerate(names):
        ref = refs[name]
        torch.testing.assert_close(logits[i], ref(ids, attention_mask=mask).logits[i], rtol=0, atol=1e-5)
        assert torch.equal(tokens[i], ref.generate(ids, attention_mask=mask, **gen)[i]), name


def test_load_and_unload_free_memory(saved, batch):
    ids, _ = batch
    base = tiny_llama()
    linears_before = {n: type(m) for n, m in base.named_modules()}
    mm = MultiAdapterModel(base)
    mm.load_adapter("a", saved["a"])
    mm.load_adapter("b", saved["b"])
    mm(ids, adapter_names=["a", "b", "a", "b", None, "a"])
    report = mm.memory_report()
    state_a = MoSModel.from_pretrained(tiny_llama(), saved["a"]).mos_pools.state_dict()
    assert report["adapters"]["a"] == sum(t.numel() * t.element_size() for t in state_a.values())
    assert report["total"] == report["base"] + report["adapters_total"]

    pool = weakref.ref(mm.adapter_pools["a"][next(iter(mm.adapter_pools["a"]))].pool_A)
    mm.unload_adapter("a")
    gc.collect()
    assert pool() is None, "the unloaded adapter's tensors must be gone"
    after = mm.memory_report()
    assert mm.adapters() == ["b"] and set(after["adapters"]) == {"b"}
    assert after["adapters_total"] == report["adapters_total"] - report["adapters"]["a"]
    assert after["base"] == report["base"]
    # only b's layers stay wrapped; the rest of the base is as it was
    assert set(mm._layers) == {n for n in linears_before if n.endswith(("q_proj", "v_proj"))}

    mm.unload_adapter("b")
    assert {n: type(m) for n, m in base.named_modules()} == linears_before
    assert mm.memory_report()["adapters_total"] == 0
    mm.load_adapter("a", saved["a"])  # a name is free again once unloaded
    assert mm.adapters() == ["a"]


def test_mismatched_adapter_is_rejected_and_changes_nothing(saved, tmp_path):
    other = get_mos_model(tiny_llama(hidden=32), MoSConfig(target_modules=["q_proj"], rank=2, budget_rank=1))
    other.save_pretrained(tmp_path / "small")
    gpt2 = get_mos_model(tiny_gpt2(), MoSConfig(target_modules=["c_attn"], rank=2, budget_rank=1))
    gpt2.save_pretrained(tmp_path / "gpt2")
    mm = MultiAdapterModel(tiny_llama())
    mm.load_adapter("a", saved["a"])
    wrapped = dict(mm._layers)
    with pytest.raises(CheckpointError, match="different base.*shape"):
        mm.load_adapter("small", tmp_path / "small")
    with pytest.raises(CheckpointError, match="does not fit this base"):
        mm.load_adapter("gpt2", tmp_path / "gpt2")
    with pytest.raises(FileNotFoundError):
        mm.load_adapter("nowhere", tmp_path / "nowhere")
    assert mm.adapters() == ["a"] and mm._layers == wrapped


def test_bad_names_and_batches_get_clear_errors(served, saved, batch):
    ids, _ = batch
    with pytest.raises(UnknownAdapterError, match=r"\['zzz'\].*loaded: \['a', 'b', 'c', 'd'\]"):
        served(ids, adapter_names=["a", "zzz", None, None, None, None])
    with pytest.raises(ValueError, match="5 entries for a batch of 6 rows"):
        served(ids, adapter_names=["a"] * 5)
    with pytest.raises(TypeError, match="one name per row"):
        served(ids, adapter_names="a")
    with pytest.raises(ValueError, match="already loaded"):
        served.load_adapter("a", saved["a"])
    for bad in ("", BASE, "../a", "a.b", "x" * 65, 3):
        with pytest.raises(ValueError, match="invalid"):
            served.load_adapter(bad, saved["a"])
    with pytest.raises(UnknownAdapterError, match="no adapter named 'zzz'"):
        served.unload_adapter("zzz")
    assert served.adapters() == list(CONFIGS)


def test_merged_weights_refuse_mixed_batches(saved, alone, batch):
    ids, mask = batch
    mm = MultiAdapterModel(tiny_llama())
    mm.load_adapter("a", saved["a"])
    mm.load_adapter("b", saved["b"])
    mm.merge("a")
    logits = mm(ids, attention_mask=mask, adapter_names=["a"] * 6).logits
    assert (logits - alone["a"][0]).abs().max() <= 1e-5
    for names in (["a"] * 5 + ["b"], ["a"] * 5 + [None]):
        with pytest.raises(RuntimeError, match="merged.*unmerge"):
            mm(ids, attention_mask=mask, adapter_names=names)
    with pytest.raises(RuntimeError, match="unmerge"):
        mm.unload_adapter("a")
    with pytest.raises(RuntimeError, match="already merged"):
        mm.merge("b")
    mm.unmerge()
    names = ["a", "b", None, "a", "b", None]
    logits = mm(ids, attention_mask=mask, adapter_names=names).logits
    for i, name in enumerate(names):
        assert (logits[i] - alone[name][0][i]).abs().max() <= 1e-5
    with pytest.raises(RuntimeError, match="no adapter is merged"):
        mm.unmerge()


def test_merge_goes_through_the_layers_merge(saved, monkeypatch):
    # one merge for MoSLinear and serving: layer.add_to_weight (which requantizes a 4-bit base
    # and returns the storage error); the largest error is kept, as MoSLinear keeps its own
    import moslora.serving.multi as multi

    calls = []

    def recording(module, delta):
        calls.append((module, delta.shape))
        return add_to_weight(module, delta) + 0.25 * len(calls)

    monkeypatch.setattr(multi, "add_to_weight", recording)
    mm = MultiAdapterModel(tiny_llama())
    mm.load_adapter("b", saved["b"])
    mm.merge("b")
    wrapped = {name: layer.base_layer for name, layer in mm._layers.items()}
    assert [m for m, _ in calls] == [wrapped[n] for n in mm._factors("b")]
    assert all(shape == (m.out_features, m.in_features) for m, shape in calls)
    assert mm.merge_error == 0.25 * len(calls)
    mm.unmerge()
    assert len(calls) == 2 * len(wrapped)


def test_a_base_that_carries_an_mos_adapter_is_refused(saved):
    with pytest.raises(ValueError, match="already carries an MoS adapter"):
        MultiAdapterModel(MoSModel.from_pretrained(tiny_llama(), saved["a"]))
    merged = MoSModel.from_pretrained(tiny_llama(), saved["a"])
    merged.merge()
    with pytest.raises(ValueError, match="plain base"):
        MultiAdapterModel(merged.base_model)


def test_wrapper_without_route_is_its_base_layer():
    linear = nn.Linear(8, 4)
    x = torch.randn(3, 5, 8)
    assert torch.equal(MultiAdapterLinear(linear)(x), linear(x))


# ---------------------------------------------------------------------------- shared routing indices

SHARED_CFG = MoSConfig(target_modules=["q_proj", "down_proj"], rank=5, budget_rank=2, private_rank=1,
                       shards_per_vector=2, alpha=9.0)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """Adapters "s1" and "s2": the same config and seed (so the same routing), other weights;
    "t": another seed. name -> directory."""
    root = tmp_path_factory.mktemp("seeded")
    for i, (name, seed) in enumerate([("s1", 0), ("s2", 0), ("t", 4)]):
        model = get_mos_model(tiny_llama(), MoSConfig(**{**SHARED_CFG.to_dict(), "seed": seed}))
        randomize_adapter(model, seed=20 + i)
        model.save_pretrained(root / name)
    return {name: root / name for name in ("s1", "s2", "t")}


def _indices(mm, name):
    return [t for pools in mm.adapter_pools[name].values() for t in (pools.index_A, pools.index_B)]


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_same_seed_adapters_share_routing_indices(seeded, batch):
    ids, mask = batch
    mm = MultiAdapterModel(tiny_llama())
    for name, path in seeded.items():
        mm.load_adapter(name, path)
    s1, s2, t = (_indices(mm, n) for n in ("s1", "s2", "t"))
    assert all(a is b for a, b in zip(s1, s2)), "same seed and config: one resident copy"
    assert not {id(a) for a in s1} & {id(a) for a in t}, "another seed routes differently: nothing shared"
    assert not all(torch.equal(a, b) for a, b in zip(s1, t))

    report = mm.memory_report()
    own = {n: sum(p.numel() * p.element_size() for p in mm.adapter_pools[n].parameters()) for n in seeded}
    assert report["shared"] == _nbytes(s1) > 0
    assert report["adapters"] == {"s1": own["s1"], "s2": own["s2"], "t": own["t"] + _nbytes(t)}
    assert report["adapters_total"] == sum(report["adapters"].values()) + report["shared"]

    names = ["s1", "t", "s2", None, "s2", "s1"]
    logits = mm(ids, attention_mask=mask, adapter_names=names).logits
    for name in seeded:
        ref = MoSModel.from_pretrained(tiny_llama(), seeded[name])(ids, attention_mask=mask).logits
        for i in (i for i, n in enumerate(names) if n == name):
            assert (logits[i] - ref[i]).abs().max() <= 1e-5, name

    gone = weakref.ref(s1[0])
    del s1, s2
    mm.unload_adapter("s1")
    after = mm.memory_report()
    assert after["shared"] == 0 and after["adapters"]["s2"] == own["s2"] + report["shared"]
    mm.unload_adapter("s2")
    gc.collect()
    assert gone() is None, "unloading the last user frees the shared indices"
    assert mm.memory_report()["adapters_total"] == report["adapters"]["t"]


def test_indices_with_equal_digests_but_other_content_are_not_shared(seeded, batch, monkeypatch):
    # a digest is only a lookup key: sharing needs the contents to be equal
    monkeypatch.setattr("moslora.serving.multi._digest", lambda t: "collision")
    ids, _ = batch
    mm = MultiAdapterModel(tiny_llama())
    mm.load_adapter("s1", seeded["s1"])
    mm.load_adapter("t", seeded["t"])
    assert mm.memory_report()["shared"] == 0
    ref = MoSModel.from_pretrained(tiny_llama(), seeded["t"])(ids).logits
    assert (mm(ids, adapter_names=["t"] * 6).logits - ref).abs().max() <= 1e-5


# ---------------------------------------------------------------------------- adapters from disk


def _on_disk(saved, budget=None, ttl=0.0):
    """A registry over the saved adapters' root, rescanning at every listing (``ttl=0``)."""
    mm = MultiAdapterModel(tiny_llama(), adapter_root=saved["a"].parent, max_resident_bytes=budget)
    mm.root.ttl = ttl
    return mm


@pytest.fixture(scope="module")
def sizes(saved):
    """Resident bytes of each saved adapter alone."""
    mm = _on_disk(saved)
    mm(torch.zeros(4, 2, dtype=torch.long), adapter_names=list(CONFIGS))
    return mm.memory_report()["adapters"]


def test_adapters_on_disk_load_on_first_use(saved, alone, batch):
    ids, mask = batch
    mm = _on_disk(saved)
    assert mm.available() == sorted(CONFIGS) and mm.adapters() == [] and mm.memory_report()["adapters_total"] == 0
    names = ["d", None, "b", "d", BASE, "b"]
    logits = mm(ids, attention_mask=mask, adapter_names=names).logits
    for i, name in enumerate(names):
        assert (logits[i] - alone[_key(name)][0][i]).abs().max() <= 1e-5, name
    assert sorted(mm.adapters()) == ["b", "d"] and mm.stats.loads == 2
    out = mm.generate(ids, attention_mask=mask, adapter_names=["a", "c", "a", BASE, "c", "b"],
                      max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    for i, name in enumerate(["a", "c", "a", BASE, "c", "b"]):
        assert torch.equal(out[i], alone[_key(name)][1][i]), name
    assert mm.stats.loads == 4 and mm.stats.evictions == 0
    with pytest.raises(UnknownAdapterError, match=r"\['zzz'\].*neither loaded nor under the adapter root"):
        mm(ids, adapter_names=["a", "zzz", None, None, None, None])


def test_eviction_keeps_the_budget_and_drops_the_least_recently_used(saved, sizes, alone, batch):
    ids, mask = batch
    budget = sizes["a"] + max(sizes["b"], sizes["c"])
    mm = _on_disk(saved, budget)
    for names in (["a"], ["b"], ["a"]):  # a and b fit; a is now the most recent
        mm(ids[:1], adapter_names=names)
    assert sorted(mm.adapters()) == ["a", "b"] and mm.stats.evictions == 0
    logits = mm(ids[:2], attention_mask=mask[:2], adapter_names=["c", "a"]).logits  # c does not fit as well: b goes
    assert sorted(mm.adapters()) == ["a", "c"] and mm.stats.evictions == 1
    assert mm.memory_report()["adapters_total"] <= budget and mm.stats.over_budget == 0
    assert (logits[0] - alone["c"][0][0]).abs().max() <= 1e-5 and (logits[1] - alone["a"][0][1]).abs().max() <= 1e-5
    mm(ids[:1], adapter_names=["b"])  # loaded again; the last call used c, then a (row order): c goes
    assert sorted(mm.adapters()) == ["a", "b"] and (mm.stats.loads, mm.stats.evictions) == (4, 2)
    assert mm.available() == sorted(CONFIGS), "evicted adapters stay available"


def test_a_call_over_the_budget_is_served_and_counted(saved, alone, batch, caplog):
    ids, mask = batch
    mm = _on_disk(saved, budget=0)
    mm.load_adapter("pinned", saved["d"])  # loaded explicitly: never evicted
    with caplog.at_level("WARNING", logger="moslora.serving"):
        logits = mm(ids[:2], attention_mask=mask[:2], adapter_names=["a", "b"]).logits
    assert "over the budget of 0" in caplog.text and mm.stats.over_budget >= 1
    for i, name in enumerate(["a", "b"]):
        assert (logits[i] - alone[name][0][i]).abs().max() <= 1e-5
    mm(ids[:1], adapter_names=["c"])  # the next call evicts what the last one needed
    assert sorted(mm.adapters()) == ["c", "pinned"] and "pinned" in mm.available()
    with pytest.raises(ValueError, match=">= 0"):
        MultiAdapterModel(tiny_llama(), adapter_root=saved["a"].parent, max_resident_bytes=-1)


def test_adapters_added_and_removed_while_serving(saved, alone, batch, tmp_path):
    ids, _ = batch
    shutil.copytree(saved["a"], tmp_path / "a")
    (tmp_path / "not-an-adapter").mkdir()
    (tmp_path / "bad.name").mkdir()
    shutil.copytree(saved["b"], tmp_path / "bad.name", dirs_exist_ok=True)
    mm = MultiAdapterModel(tiny_llama(), adapter_root=tmp_path)
    mm.root.ttl = 0.0
    assert mm.available() == ["a"]
    shutil.copytree(saved["b"], tmp_path / "b")
    assert mm.available() == ["a", "b"]
    assert (mm(ids[:1], adapter_names=["b"]).logits[0] - alone["b"][0][0]).abs().max() <= 1e-5
    shutil.rmtree(tmp_path / "b")
    assert mm.available() == ["a"]
    mm(ids[:1], adapter_names=["a"])
    assert mm.adapters() == ["a"], "a removed directory's adapter is unloaded at the next call"
    with pytest.raises(UnknownAdapterError, match=r"\['b'\]"):
        mm(ids[:1], adapter_names=["b"])

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{}")
    assert "broken" in mm.available()
    with pytest.raises(UnknownAdapterError, match="'broken' under the adapter root cannot be served"):
        mm(ids[:1], adapter_names=["broken"])
    assert mm.available() == ["a"], "a broken adapter is not offered again until its config changes"


def test_listing_is_reused_for_its_ttl(saved, tmp_path):
    shutil.copytree(saved["a"], tmp_path / "a")
    mm = MultiAdapterModel(tiny_llama(), adapter_root=tmp_path)
    mm.root.ttl = 3600.0
    assert mm.available() == ["a"]
    shutil.copytree(saved["b"], tmp_path / "b")
    assert mm.available() == ["a"]
    mm.root.ttl = 0.0
    assert mm.available() == ["a", "b"]
