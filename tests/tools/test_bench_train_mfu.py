"""tools/bench/train_mfu.py on the tiny sizes on the CPU (random weights, fp32: mechanics only;
the numbers it exists for come from a GPU): the synthetic sequences have the pairs' layout, the
steps run with finite losses, and results are written."""

from __future__ import annotations

import json

import pytest
import torch

from tools.bench.train_mfu import main, synthetic_batch
from train.model.mm1 import IGNORE, MM1
from train.model.registry import get_config


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
    results = main(["--model", "tiny,tiny-moe", "--all", "--seq-len", "128", "--images", "4",
                    "--steps", "2", "--warmup", "1", "--json", str(out)])
    assert [r["model"] for r in results] == ["tiny", "tiny-moe"]
    for r in results:
        assert r["status"] == "ok" and r["losses_finite"] and r["tokens_per_s"] > 0 and r["tflops_per_s"] > 0
        assert r["mfu"] is None  # no GPU peak to divide by on the CPU
    assert json.loads(out.read_text()) == results
    # without --all, the first size that runs ends the search (the largest that fits goes first)
    assert [r["model"] for r in main(["--model", "tiny,tiny-moe", "--seq-len", "64", "--images", "2",
                                      "--steps", "1", "--warmup", "0"])] == ["tiny"]
