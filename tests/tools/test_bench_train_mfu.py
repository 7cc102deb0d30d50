"""tools/bench/train_mfu.py on the tiny sizes on the CPU (random weights, fp32: mechanics only;
the numbers it exists for come from a GPU): the synthetic sequences have the pairs' layout, the
steps run with finite losses, each row carries what the report needs, the FLOPs are
train/flops.py's, and a batch that runs out of memory falls back to the next."""

from __future__ import annotations

import json

import pytest
import torch

from tools.bench import train_mfu
from tools.bench.train_mfu import main, synthetic_batch
from train.flops import ModelFlops, batch_flops, causal_pairs
from train.model.mm1 import IGNORE, MM1
from train.model.registry import get_config

ROW_KEYS = {"model", "tower", "batch", "accum", "seq_len", "compile", "activation_checkpointing", "tokens_per_s",
            "mfu", "hfu", "tower_share", "memory_gib", "step_flops", "recompute_fraction", "tower_recompute_fraction"}


def test_synthetic_sequences_have_the_pair_layout():
    model = MM1(get_config("tiny"))
    b = synthetic_batch(model, 2, 64, 4, torch.Generator().manual_seed(0))
    tokens, doc_ids, labels = b["tokens"], b["doc_ids"], b["labels"]
    assert tokens.shape == doc_ids.shape == labels.shape == (2, 64)
    assert b["images"].shape == (8, 3, model.vision.image_size, model.vision.image_size)
    assert int((tokens == model.image_token_id).sum()) == 8 * model.n_image_tokens
    assert doc_ids[0].tolist() == [i // 16 for i in range(64)]  # four samples of 16 tokens
    targets = labels[labels != IGNORE]
    assert targets.numel() > 0 and not (targets == model.image_token_id).any()
    with pytest.raises(ValueError, match="do not fit"):
        synthetic_batch(model, 1, 16, 4, torch.Generator())


def test_every_size_asked_for_runs_and_is_recorded(tmp_path):
    out = tmp_path / "mfu.json"
    results = main(["--model", "tiny,tiny-moe", "--all", "--seq-len", "128", "--images", "4", "--batch", "2",
                    "--accum", "2", "--ac", "selective", "--tower", "trained", "--steps", "2", "--warmup", "1",
                    "--json", str(out)])
    assert [r["model"] for r in results] == ["tiny", "tiny-moe"]
    for r in results:
        assert ROW_KEYS <= set(r)
        assert r["status"] == "ok" and r["losses_finite"] and r["tokens_per_s"] > 0 and r["model_tflops_per_s"] > 0
        assert r["mfu"] is None and r["hfu"] is None  # no GPU peak to divide by on the CPU
        assert (r["tower"], r["batch"], r["accum"], r["activation_checkpointing"]) == ("trained", 2, 2, "selective")
        assert r["recompute_fraction"] == 0.5 and r["tower_recompute_fraction"] == 0.5  # 2 of 4 blocks, 1 of 2
        assert r["step_flops"]["hardware"] > r["step_flops"]["model"] > 0 and 0 < r["tower_share"] < 1
    # the step's FLOPs: 2 micro-batches of 2 sequences of 128 tokens in 4 documents, 8 images each
    mf = ModelFlops.from_config(get_config("tiny"), tower_trainable=True)
    pairs = causal_pairs(torch.arange(4).repeat_interleave(32).expand(2, -1))
    assert results[0]["step_flops"] == batch_flops(mf, real_tokens=2 * 2 * 128, causal_pairs=2 * pairs, images=2 * 8,
                                                   recompute="selective", recompute_fraction=0.5)
    assert json.loads(out.read_text()) == results
    # without --all, the first size that runs ends the search (the largest that fits goes first)
    assert [r["model"] for r in main(["--model", "tiny,tiny-moe", "--seq-len", "64", "--images", "2",
                                      "--steps", "1", "--warmup", "0"])] == ["tiny"]


def test_full_checkpointing_recomputes_every_block():
    (r,) = main(["--model", "tiny", "--seq-len", "64", "--images", "2", "--ac", "full", "--tower", "frozen",
                 "--steps", "1", "--warmup", "0"])
    assert r["status"] == "ok" and r["recompute_fraction"] == r["tower_recompute_fraction"] == 1.0
    assert r["tower"] == "frozen" and r["step_flops"]["hardware"] > r["step_flops"]["model"]


def test_a_batch_out_of_memory_falls_back_to_the_next(monkeypatch):
    tried = []

    def fake(name, *, batch, **kwargs):
        tried.append((name, batch))
        if batch > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"model": name, "status": "ok", "batch": batch}

    monkeypatch.setattr(train_mfu, "measure", fake)
    results = main(["--model", "big,small", "--batch", "4,2,1"])
    assert tried == [("big", 4), ("big", 2), ("big", 1)]
    assert [(r["status"], r["batch"]) for r in results] == [("out of memory", 4), ("out of memory", 2), ("ok", 1)]
    assert results[0]["detail"].startswith("CUDA out of memory")
