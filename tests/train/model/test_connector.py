"""The connectors with random weights: shapes, gradients, validation and parameter counts (the
mechanics; what they learn is not tested here). MM1 sizes are built on the meta device."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from train.model.config import ConnectorConfig
from train.model.connector import AttnPoolConnector, AvgPoolConnector, CAbstractor, build_connector

KINDS = ["c_abstractor", "avg_pool", "attn_pool"]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_maps_patches_to_tokens_and_gradients_flow(kind):
    torch.manual_seed(0)
    cfg = ConnectorConfig(kind=kind, n_tokens=4, depth=2, hidden=24, mlp_depth=2)
    conn = build_connector(cfg, vision_width=16, grid=4, llm_dim=40)
    assert conn.n_tokens == 4
    x = torch.randn(2, 16, 16, requires_grad=True)
    y = conn(x)
    assert y.shape == (2, 4, 40) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in conn.parameters())
    # images are independent: one image's tokens do not depend on another's patches
    with torch.no_grad():
        alone = conn(x[:1])
    torch.testing.assert_close(alone, y[:1].detach(), rtol=1e-5, atol=1e-5)


def test_c_abstractor_at_mm1_grid_gives_144_tokens():
    torch.manual_seed(0)
    cfg = ConnectorConfig(n_tokens=144, depth=1, hidden=32, mlp_depth=2)
    conn = build_connector(cfg, vision_width=32, grid=27, llm_dim=48)
    assert isinstance(conn, CAbstractor)
    assert conn(torch.randn(2, 27 * 27, 32)).shape == (2, 144, 48)
    with pytest.raises(ValueError, match="729"):
        conn(torch.randn(2, 28 * 28, 32))


def test_c_abstractor_keeps_locality():
    """A patch changed in the top-left corner moves the top-left token far more than the opposite
    corner's: the convolutions see 3x3 neighbourhoods; only squeeze-excitation's channel gates
    carry anything across the whole image (so the far token moves a little, not zero)."""
    torch.manual_seed(0)
    conn = build_connector(ConnectorConfig(n_tokens=16, depth=1, hidden=16), 16, 8, 16)
    x = torch.randn(1, 64, 16)
    x2 = x.clone()
    x2[0, 0] += 10.0
    with torch.no_grad():
        d = (conn(x2) - conn(x)).norm(dim=-1)[0]  # [16] token changes, 4x4 row-major
    assert d[0] > 5 * d[15]


@pytest.mark.parametrize("kind", ["c_abstractor", "avg_pool"])
@pytest.mark.parametrize("n_tokens", [0, 10, 143])
def test_pooling_kinds_need_a_square_token_count(kind, n_tokens):
    with pytest.raises(ValueError, match="square"):
        build_connector(ConnectorConfig(kind=kind, n_tokens=n_tokens), 16, 27, 32)


def test_other_build_errors():
    with pytest.raises(ValueError, match="upsample"):
        build_connector(ConnectorConfig(kind="avg_pool", n_tokens=25), 16, 4, 32)
    with pytest.raises(ValueError, match="positive"):
        build_connector(ConnectorConfig(kind="attn_pool", n_tokens=0), 16, 4, 32)
    with pytest.raises(ValueError, match="mlp_depth"):
        build_connector(ConnectorConfig(mlp_depth=0, n_tokens=4), 16, 4, 32)
    with pytest.raises(ValueError, match="unknown connector"):
        unknown = dataclasses.replace(ConnectorConfig(), kind="perceiver")  # type: ignore[arg-type]
        build_connector(unknown, 16, 4, 32)
    # attention pooling takes any count: it is not tied to a grid
    conn = build_connector(ConnectorConfig(kind="attn_pool", n_tokens=5), 16, 4, 32)
    assert conn(torch.randn(1, 16, 16)).shape == (1, 5, 32)


def test_c_abstractor_depth_zero_is_pool_and_readout():
    conn = build_connector(ConnectorConfig(n_tokens=4, depth=0, mlp_depth=1), 16, 4, 8)
    assert conn(torch.randn(2, 16, 16)).shape == (2, 4, 8)
    assert _count(conn) == 16 * 16 + 16 * 8 + 8  # positional embedding + one linear layer


@pytest.mark.parametrize("kind", KINDS)
def test_meta_build_then_init_weights(kind):
    cfg = ConnectorConfig(kind=kind, n_tokens=4, depth=1, hidden=16)
    with torch.device("meta"):
        conn = build_connector(cfg, 16, 4, 8)
    assert all(p.is_meta for p in conn.parameters())
    conn.to_empty(device="cpu")
    torch.manual_seed(0)
    conn.init_weights()
    y = conn(torch.randn(2, 16, 16))
    assert y.shape == (2, 4, 8) and torch.isfinite(y).all()
    # the layer norms start as identities, as at a normal build (to_empty left garbage in them)
    norms = [m for m in conn.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in norms)
    assert bool(norms) == (kind != "avg_pool")


def test_parameter_counts_at_mm1_size():
    """ViT-H width 1280, 27x27 grid, 144 tokens, a 3072-wide decoder (MM1-3B), depth 3, mlp 2."""
    counts = {}
    for kind in KINDS:
        with torch.device("meta"):
            counts[kind] = _count(build_connector(ConnectorConfig(kind=kind), 1280, 27, 3072))
    readout = 1280 * 3072 + 3072 + 3072 * 3072 + 3072
    assert counts["avg_pool"] == readout == 13_375_488
    # six 1280-wide RegNet bottlenecks (~4.1M each) + the 729x1280 positional embedding + readout
    assert counts["c_abstractor"] == 39_009_408
    assert counts["attn_pool"] == 20_123_648
    with torch.device("meta"):
        assert isinstance(build_connector(ConnectorConfig(kind="avg_pool"), 1280, 27, 3072), AvgPoolConnector)
        attn = build_connector(ConnectorConfig(kind="attn_pool"), 1280, 27, 3072)
    assert isinstance(attn, AttnPoolConnector) and attn.n_heads == 16
