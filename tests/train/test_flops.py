"""train/flops.py: attention pairs under document masks and padding, a step's FLOPs against a
hand computation, the per-unit counts against the registry's parameter counts and against
torch's FlopCounterMode on the meta device, and the peak table's names."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from train.flops import ModelFlops, batch_flops, causal_pairs, peak_flops
from train.model.mm1 import MM1
from train.model.registry import decoder_flops_per_token, decoder_param_counts, get_config, vit_param_count


def _brute_pairs(doc_ids: list[list[int]], mask: list[list[bool]]) -> int:
    """Pairs (i, j), j <= i, both real, in the same run of equal ids of a row."""
    total = 0
    for ids, real in zip(doc_ids, mask):
        run = list(itertools.accumulate(int(i > 0 and ids[i] != ids[i - 1]) for i in range(len(ids))))
        total += sum(1 for i in range(len(ids)) for j in range(i + 1)
                     if real[i] and real[j] and run[i] == run[j])
    return total


@pytest.mark.parametrize("doc_ids, mask, expected", [
    ([[0, 0, 0, 1, 1, 2]], None, 6 + 3 + 1),
    # the packer's padding: its own run (the next id), masked out
    ([[0, 0, 1, 1, 1, 2, 2]], [[True] * 5 + [False] * 2], 3 + 6),
    # padding inside a run counts for nothing; the run's real tokens still pair up
    ([[0, 0, 0, 0]], [[True, False, True, True]], 6),
    # a document is a run: one id twice is two documents
    ([[0, 0, 1, 0]], None, 3 + 1 + 1),
    # runs never cross rows, even when a row ends and the next starts with the same id
    ([[0, 0, 1], [1, 1, 2]], None, (3 + 1) * 2),
    # a row of padding only
    ([[0, 0, 0], [5, 5, 5]], [[True, True, True], [False, False, False]], 6),
])
def test_causal_pairs_by_hand(doc_ids, mask, expected):
    ids = torch.tensor(doc_ids)
    m = None if mask is None else torch.tensor(mask)
    assert causal_pairs(ids, m) == expected
    assert _brute_pairs(doc_ids, mask or [[True] * len(r) for r in doc_ids]) == expected


def test_causal_pairs_matches_brute_force_and_accepts_one_row():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, 3, (3, 17), generator=gen)
        mask = torch.rand(3, 17, generator=gen) > 0.2
        assert causal_pairs(ids, mask) == _brute_pairs(ids.tolist(), mask.tolist())
    one = torch.tensor([0] * 512 + [1] * 100)
    assert causal_pairs(one) == 512 * 513 // 2 + 100 * 101 // 2 == causal_pairs(one[None])
    assert causal_pairs(torch.zeros(0, 0, dtype=torch.long)) == 0
    with pytest.raises(ValueError, match="does not match"):
        causal_pairs(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool))


def _toy(trainable: bool = True) -> ModelFlops:
    return ModelFlops(dense_per_token=6.0, attention_per_pair=12.0, block_forward_per_token=2.0,
                      head_forward_per_token=1.0, tower_per_image=30.0 if trainable else 10.0,
                      tower_forward_per_image=10.0, connector_per_image=3.0, tower_trainable=trainable)


def test_batch_flops_by_hand():
    kw = {"real_tokens": 100, "causal_pairs": 50, "images": 2}
    model = 6 * 100 + 12 * 50 + 30 * 2 + 3 * 2  # 1266
    none = batch_flops(_toy(), **kw)
    assert none == {"model": model, "hardware": model + 1 * 100, "tower": 60, "decoder": 600, "attention": 600,
                    "connector": 6, "recompute": 100}
    # full: every block's forward again: 2 per token, a third of the attention, the tower's forward per image
    full = batch_flops(_toy(), **kw, recompute="full")
    assert full["model"] == model and full["hardware"] == model + 100 + (2 * 100 + 4 * 50) + 10 * 2
    sel = batch_flops(_toy(), **kw, recompute="selective", recompute_fraction=0.5, tower_recompute_fraction=0.25)
    assert sel["hardware"] == model + 100 + 0.5 * 400 + 0.25 * 20
    same = batch_flops(_toy(), **kw, recompute="selective", recompute_fraction=0.5)
    assert same["hardware"] == model + 100 + 0.5 * 400 + 0.5 * 20
    # a frozen tower: forward only (k = 1), and no backward, so nothing of it is recomputed
    frozen = batch_flops(_toy(trainable=False), **kw, recompute="full")
    assert frozen["tower"] == 20 and frozen["hardware"] == frozen["model"] + 100 + 400
    with pytest.raises(ValueError, match="not in"):
        batch_flops(_toy(), **kw, recompute="selective", recompute_fraction=1.5)
    with pytest.raises(ValueError, match="recompute must be"):
        batch_flops(_toy(), **kw, recompute="some")


def test_per_unit_counts_from_the_tiny_config_by_hand():
    cfg = get_config("tiny")  # 4 layers, dim 64, 4 heads / 2 kv heads of 16, FFN 128, vocab 512
    mf = ModelFlops.from_config(cfg, tower_trainable=True)
    block = (64 * 64 + 2 * 64 * 32 + 64 * 64) + 3 * 64 * 128 + 2 * 64  # attention, SwiGLU, two norms
    head = 512 * 64
    assert mf.dense_per_token == 6 * (4 * block + head + 64)  # + the final norm
    assert mf.block_forward_per_token == 2 * 4 * block and mf.head_forward_per_token == 2 * head
    assert mf.attention_per_pair == 12 * 4 * 64
    # the dense part is the registry's per-token count without its (full-square) attention term
    assert mf.dense_per_token == decoder_flops_per_token(cfg.decoder, 100) - 12 * 4 * 64 * 100
    # the tower: a 4 x 4 patch grid + CLS, width 64, 2 blocks; its parameters less the class and
    # positional embeddings (added, not multiplied)
    t = 4 * 4 + 1
    n_vit = vit_param_count(64, 2, 14, 4) - 64 - t * 64
    assert mf.tower_forward_per_image == 2 * n_vit * t + 4 * 2 * 64 * t * t
    assert mf.tower_per_image == 3 * mf.tower_forward_per_image
    frozen = ModelFlops.from_config(cfg, tower_trainable=False)
    assert frozen.tower_per_image == frozen.tower_forward_per_image == mf.tower_forward_per_image


def test_moe_counts_the_active_experts_only():
    cfg = get_config("tiny-moe")
    mf = ModelFlops.from_config(cfg, tower_trainable=False)
    counts = decoder_param_counts(cfg.decoder)
    assert counts["active"] < counts["total"]
    assert mf.dense_per_token == 6 * (counts["active"] - counts["embedding"])


def test_from_model_agrees_with_flop_counter_on_the_meta_device():
    """torch's own count of a forward, on the meta device (nothing computed): the tower and the
    decoder's matrix products agree with the analytic counts (which also charge LayerNorm
    weights and the patch projection for the CLS token: a few percent on this tiny tower, 0.2%
    on ViT-H); the connector's is FlopCounterMode's by construction."""
    with torch.device("meta"):
        model = MM1(get_config("tiny"))
    model.vision.requires_grad_(False)
    mf = ModelFlops.from_model(model)
    assert not mf.tower_trainable  # inferred from requires_grad
    v = model.vision
    with FlopCounterMode(display=False) as fc:
        v(torch.empty(1, 3, v.image_size, v.image_size, device="meta"))
    t, counts = v.n_patches + 1, {str(k): c for k, c in fc.get_flop_counts()["Global"].items()}
    assert counts["aten.bmm"] == 4 * 2 * v.width * t * t  # full attention: 2 blocks, t x t pairs
    assert fc.get_total_flops() == pytest.approx(mf.tower_forward_per_image, rel=0.04)
    seq = 32
    with FlopCounterMode(display=False) as fc:
        model.decoder(torch.zeros(1, seq, dtype=torch.long, device="meta"))
    counts = {str(k): c for k, c in fc.get_flop_counts()["Global"].items()}
    assert counts["aten.mm"] == pytest.approx((mf.block_forward_per_token + mf.head_forward_per_token) * seq, rel=0.005)
    # FlopCounterMode charges causal attention the full square; train/flops charges the computed half
    assert counts["aten.bmm"] == mf.attention_per_pair / 3 * seq * seq
    assert mf.attention_per_pair / 3 * causal_pairs(torch.zeros(1, seq, dtype=torch.long)) == \
        counts["aten.bmm"] * (seq + 1) / (2 * seq)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12),  # the SXM part, as nvidia-smi and torch name it
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.4e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA GeForce RTX 4090", None),
    ("cpu", None),
])
def test_peak_table(name, peak):
    assert peak_flops(name) == peak
