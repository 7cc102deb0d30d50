"""The size registry: every entry builds on the meta device (no memory) with exactly the
parameter count the registry computes, the counts land near MM1's names, and the FLOPs per
token follow 6 x active parameters plus the attention term."""

from __future__ import annotations

import pytest
import torch

from train.model.registry import (
    REGISTRY,
    decoder_flops_per_token,
    decoder_param_counts,
    get_config,
    image_flops,
    train_flops_per_token,
    vit_param_count,
)

# (total, active) in billions, and the tolerance around them: the paper's names
EXPECTED = {
    "mm1-3b": (3.0, 3.0, 0.1),
    "mm1-7b": (7.0, 7.0, 0.05),
    "mm1-30b": (30.0, 30.0, 0.05),
    "mm1-3b-moe": (64.0, 3.9, 0.05),   # MM1 §3.5: "about 64B" in all
    "mm1-7b-moe": (47.0, 8.3, 0.05),   # MM1 §3.5: "about 47B" in all
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_entry_builds_on_meta_with_the_registry_count(name):
    from train.model.decoder import Decoder

    cfg = get_config(name)
    with torch.device("meta"):
        decoder = Decoder(cfg.decoder)
    counts = decoder_param_counts(cfg.decoder)
    assert _count(decoder) == counts["total"]
    if name in EXPECTED:
        total, active, tol = EXPECTED[name]
        assert abs(counts["total"] / 1e9 - total) <= tol * total, counts
        assert abs(counts["active"] / 1e9 - active) <= tol * active, counts
    if cfg.decoder.moe is not None:
        assert counts["active"] < counts["total"]


@pytest.mark.parametrize("name", ["mm1-3b", "tiny"])
def test_vision_tower_and_connector_counts(name):
    from train.model.connector import build_connector
    from train.model.vision import VisionEncoder

    cfg = get_config(name)
    with torch.device("meta"):
        vision = VisionEncoder(cfg.vision)
        connector = build_connector(cfg.connector, vision.width, vision.grid, cfg.decoder.dim)
    if name == "mm1-3b":  # ViT-H/14 at 378 px: a 27 x 27 grid of width 1280, 32 blocks
        assert (vision.grid, vision.width) == (27, 1280)
        assert _count(vision) == vit_param_count(1280, 32, 14, 27) == 631_371_520
    x = torch.empty(2, vision.grid ** 2, vision.width, device="meta")
    assert connector(x).shape == (2, cfg.connector.n_tokens, cfg.decoder.dim)


def test_unknown_size_names_the_known_ones():
    with pytest.raises(KeyError, match="mm1-7b"):
        get_config("mm1-8b")


def test_flops_per_token():
    cfg = get_config("mm1-7b").decoder
    counts = decoder_param_counts(cfg)
    expected = 6 * (counts["active"] - counts["embedding"]) + 12 * cfg.n_layers * cfg.dim * 4096
    assert decoder_flops_per_token(cfg, 4096) == expected
    moe = get_config("mm1-7b-moe").decoder
    assert decoder_flops_per_token(moe, 4096) < 6 * decoder_param_counts(moe)["total"]  # active, not total
    per_image = image_flops(631_371_520, 32, 1280, 729, 10_000_000, trainable_vision=True)
    frozen = image_flops(631_371_520, 32, 1280, 729, 10_000_000, trainable_vision=False)
    assert frozen < per_image
    text_only = train_flops_per_token(expected, per_image, 144, 0.0)
    assert text_only == expected < train_flops_per_token(expected, per_image, 144, 0.5)


def test_counts_follow_the_config_options():
    """Biases on q/k/v (Qwen2), tied embeddings and MoE every layer: the analytic count is the
    built module's."""
    from dataclasses import replace

    from train.model.config import MoEConfig
    from train.model.decoder import Decoder

    base = get_config("tiny").decoder
    for cfg in (replace(base, qkv_bias=True), replace(base, tie_embeddings=True),
                replace(base, moe=MoEConfig(n_experts=3, top_k=2, every=1, expert_hidden=32))):
        with torch.device("meta"):
            assert _count(Decoder(cfg)) == decoder_param_counts(cfg)["total"]
