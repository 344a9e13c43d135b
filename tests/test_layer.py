import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from moslora import MoSConfig, MoSLinear, ShardPools, solve_pools
from moslora.pools import kind_generator


def wrap(base: nn.Module, d_in: int, d_out: int, layers: int = 3, **kw) -> MoSLinear:
    cfg = MoSConfig(**{"rank": 4, "budget_rank": 2, "private_rank": 1, "alpha": 8.0, **kw})
    pools = ShardPools(solve_pools(cfg, layers, d_in, d_out), cfg, kind_generator(0, "k"))
    with torch.no_grad():
        for p in pools.parameters():
            p.normal_(std=0.1)
    return MoSLinear(base, pools, layer_idx=1, scaling=cfg.scaling, dropout=cfg.dropout)


def test_forward_is_base_plus_scaled_update():
    base = nn.Linear(12, 8)
    layer = wrap(base, 12, 8)
    x = torch.randn(2, 5, 12)
    a, b = layer.factors()
    expected = base(x) + 2.0 * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected)


def test_conv1d_forward_and_merge():
    base = Conv1D(8, 12)  # nf=d_out=8, nx=d_in=12: weight is (d_in, d_out)
    layer = wrap(base, 12, 8)
    assert (layer.d_in, layer.d_out) == (12, 8)
    x = torch.randn(3, 12)
    y = layer(x)
    a, b = layer.factors()
    torch.testing.assert_close(y, base(x) + 2.0 * (x @ a.T @ b.T))
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)


def test_merge_unmerge_restores_weights():
    base = nn.Linear(12, 8)
    w0 = base.weight.detach().clone()
    layer = wrap(base, 12, 8)
    x = torch.randn(4, 12)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)
    torch.testing.assert_close(base.weight.detach(), w0 + layer.delta_weight(), atol=1e-6, rtol=0)
    layer.unmerge()
    assert not layer.merged
    assert (base.weight.detach() - w0).abs().max() <= 1e-6
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_dropout_only_in_training():
    layer = wrap(nn.Linear(12, 8), 12, 8, dropout=0.5)
    x = torch.randn(64, 12)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_unsupported_module_is_rejected():
    with pytest.raises(TypeError, match="nn.Linear"):
        wrap(nn.Conv2d(3, 3, 1), 3, 3)


def test_pools_of_another_shape_are_rejected():
    cfg = MoSConfig(rank=2, budget_rank=2)
    pools = ShardPools(solve_pools(cfg, 2, 12, 8), cfg, kind_generator(0, "k"))
    with pytest.raises(ValueError, match="12->8"):
        MoSLinear(nn.Linear(8, 12), pools, 0, 1.0)


def test_linear4bit_forward_backward_and_merge_error():
    import bitsandbytes as bnb  # a test extra: its absence must fail, not skip
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compute_dtype=torch.float32)
    q.load_state_dict(dense.state_dict())
    q = q.to("cpu")
    layer = wrap(q, 64, 32)
    x = torch.randn(4, 64)
    y = layer(x)
    y.square().sum().backward()
    assert layer.pools.pool_A.grad is not None and layer.pools.pool_A.grad.abs().sum() > 0
    layer.eval()
    with torch.no_grad():
        y = layer(x)
        layer.merge()  # dense: exact
        assert isinstance(layer.base_layer, nn.Linear) and layer.merge_error == 0
        assert (layer(x) - y).abs().max() <= 1e-4
        layer.unmerge()
        assert layer.base_layer is q
        layer.merge(requantize=True)  # stays 4-bit: lossy, error reported
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and 0 < layer.merge_error < 0.5
