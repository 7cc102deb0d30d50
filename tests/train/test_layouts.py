"""The same training, whatever the layout (CPU, gloo, fp32, deterministic mode; random weights:
mechanics only). Every layout loads one saved fp32 state dict and is fed the same fixed
micro-batches through the trainer's step function (no loader), 3 steps (step 3 is the first whose
update carries the optimizer's moments of two steps): step 1's loss and gradient norm agree with
one process within 1e-6 relative, steps 2-3 within 1e-5.

- dense `tiny`: 1 process x accumulation 4; 2 ranks x 2 (FSDP); 4 x 1 (FSDP), HSDP 2 x 2 with
  selective activation checkpointing, and 4 replicas (no sharding);
- `tiny-moe`, dropless and at capacity factor 1.25: 1 process; ep=2 over 2 processes; ep=2 under
  HSDP 2 x 2; and dropless, ep=2 over 4 (dp_shard=4) (with accumulation 1 and 2). On 4 ranks the
  2 replicas of each expert shard also split it (and, with accumulation 2, hold its gradients
  until the last backward). The routing of every micro-batch of the last step equals one
  process's (flips counted, expected 0).

The micro-batches spread kinds unevenly (a text sequence with ~60 targets beside pair sequences
with ~10 and heavy padding), so a per-micro-batch mean would weigh tokens differently per layout.
Two torchrun launches (2 and 4 processes), side by side, each paying its imports once
(tests/train/layouts_worker.py): the 2-process launch's rank 0 first runs the one-process layouts
before it joins the group; the 4-process launch then runs the `mm1 train` meshes of the last test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HANG = 600  # seconds: a bound against hangs on a shared 2-core machine, not a timing
SEQ, IMAGE_ID, PAD, N_IMG = 64, 511, 0, 4
STEPS = 3
# `mm1 train` on 4 ranks, the recipe's mesh: FSDP over 4, and HSDP 2 x 2 with ep=2
CLI_MESHES = {"fsdp4": {"parallel.dp_shard": 4},
              "hsdp-ep2": {"parallel.dp_replicate": 2, "parallel.dp_shard": 2, "parallel.ep": 2}}

MOE = [{"model": "tiny-moe", "capacity_factor": cf, "tag": tag} for cf, tag in ((None, "dropless"), (1.25, "cap"))]
LAYOUTS = {
    1: [{"name": "dense", "model": "tiny"}] + [{"name": f"moe-{m['tag']}", **m} for m in MOE]
       + [{"name": "moe-dropless-global8", "global": 8, **MOE[0]}],
    2: [{"name": "dense-fsdp2", "model": "tiny", "dp_shard": 2}]
       + [{"name": f"moe-{m['tag']}-ep2", "dp_shard": 2, "ep": 2, **m} for m in MOE],
    4: [{"name": "dense-fsdp4", "model": "tiny", "dp_shard": 4},
        {"name": "dense-hsdp", "model": "tiny", "dp_replicate": 2, "dp_shard": 2,
         "activation_checkpointing": "selective"},
        {"name": "dense-replicated", "model": "tiny", "dp_replicate": -1, "dp_shard": 1}]
       # (capacity routing over 4 ranks: under HSDP; ep=2 over dp_shard=4: dropless)
       + [{"name": "moe-dropless-ep2-fsdp4", "dp_shard": 4, "ep": 2, **MOE[0]}]
       + [{"name": f"moe-{m['tag']}-ep2-hsdp", "dp_replicate": 2, "dp_shard": 2, "ep": 2, **m} for m in MOE]
       # accumulation with experts split over their replicas: gradients held until the last backward
       + [{"name": "moe-dropless-ep2-fsdp4-accum2", "dp_shard": 4, "ep": 2, "global": 8, **MOE[0]}],
}


def _sequence(kind: str, gen: torch.Generator) -> dict:
    """One packed sequence of `kind`: its tokens, doc ids, labels, token mask and images."""
    from train.model.mm1 import text_labels

    def text(n):
        return torch.randint(1, IMAGE_ID, (n,), generator=gen).tolist()

    docs = {"text": [text(SEQ)],
            "pair": [[IMAGE_ID] * N_IMG + text(6), [IMAGE_ID] * N_IMG + text(5)],
            "doc": [text(10) + [IMAGE_ID] * N_IMG + text(20) + [IMAGE_ID] * N_IMG + text(10)]}[kind]
    tokens, doc_ids = [], []
    for i, d in enumerate(docs):
        tokens += d
        doc_ids += [i] * len(d)
    n_pad = SEQ - len(tokens)
    tokens += [PAD] * n_pad
    doc_ids += [len(docs)] * n_pad
    t, ids = torch.tensor([tokens]), torch.tensor([doc_ids])
    n_images = sum(d.count(IMAGE_ID) for d in docs) // N_IMG
    return {"tokens": t, "doc_ids": ids, "labels": text_labels(t, IMAGE_ID, ids, PAD),
            "token_mask": torch.tensor([[True] * (SEQ - n_pad) + [False] * n_pad]),
            "images": torch.randn(n_images, 3, 56, 56, generator=gen) if n_images else None}


def _micro_batches(steps: int) -> list[dict]:
    kinds = ["text", "pair", "pair", "doc", "pair", "text", "doc", "pair"]
    gen = torch.Generator().manual_seed(1)
    return [_sequence(kinds[(i * 3) % len(kinds)], gen) for i in range(4 * steps)]


@pytest.fixture(scope="module")
def launches(curated, tmp_path_factory):
    """(the layouts' results by name, the folder of the `mm1 train` runs, one per CLI_MESHES name)."""
    from train.model.mm1 import MM1
    from tests.train.layouts_worker import model_cfg, recipe_for
    from tests.train.test_trainer import DEMO_TRAIN, _overrides

    tmp = tmp_path_factory.mktemp("layouts")
    spec = {"steps": STEPS, "state": {}, "batches": {}}
    for name in ("tiny", "tiny-moe"):
        torch.manual_seed(7)
        layout = {"name": name, "model": name}
        model = MM1(model_cfg(recipe_for(layout), layout))
        torch.save({k: v.float() for k, v in model.state_dict().items()}, tmp / f"{name}.pt")
        spec["state"][name] = str(tmp / f"{name}.pt")
        torch.manual_seed(0)
        torch.save(_micro_batches(2 * STEPS), tmp / f"{name}-batches.pt")  # global 8: 2 x 4 a step
        spec["batches"][name] = str(tmp / f"{name}-batches.pt")
    cli = []
    for name, mesh in CLI_MESHES.items():
        argv = ["train", str(DEMO_TRAIN), "--run-dir", str(tmp / "cli" / name)]
        for o in _overrides(curated, steps=5, deterministic="true",
                            **{"model.name": "tiny-moe", "data.workers": 0, "data.batch_size": 1}, **mesh):
            argv += ["--override", o]
        cli.append({"name": name, "argv": argv})
    extra = {2: {"alone": LAYOUTS[1]}, 4: {"cli": cli}}
    procs = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for world in (2, 4):
        (tmp / f"spec{world}.json").write_text(json.dumps({**spec, "layouts": LAYOUTS[world], **extra[world]}))
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                  "-m", "tests.train.layouts_worker"]
        procs[world] = subprocess.Popen(launch + [str(tmp / f"spec{world}.json"), str(tmp / f"out{world}.json")],
                                        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for world, proc in procs.items():
        out, _ = proc.communicate(timeout=HANG)
        assert proc.returncode == 0, f"world {world}:\n{out[-5000:]}"
        results.update(json.loads((tmp / f"out{world}.json").read_text()))
    return results, tmp / "cli"


@pytest.fixture(scope="module")
def layouts(launches):
    return launches[0]


def _close(a: list[float], b: list[float]) -> None:
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        tol = 1e-6 if step == 0 else 1e-5
        assert abs(x - y) <= tol * abs(y), f"step {step + 1}: {x} vs {y} (rel {abs(x - y) / abs(y):.2e})"


@pytest.mark.parametrize("name", [l["name"] for w in (2, 4) for l in LAYOUTS[w] if l["model"] == "tiny"])
def test_dense_layouts_train_as_one_process(layouts, name):
    ref = layouts["dense"]
    _close(layouts[name]["loss"], ref["loss"])
    _close(layouts[name]["grad_norm"], ref["grad_norm"])


@pytest.mark.parametrize("name", [l["name"] for w in (2, 4) for l in LAYOUTS[w] if l["model"] == "tiny-moe"])
def test_expert_parallel_layouts_train_as_one_process(layouts, name):
    ref = layouts["moe-dropless-global8" if name.endswith("accum2") else "moe-" + ("dropless" if "dropless" in name
                                                                                 else "cap")]
    got = layouts[name]
    _close(got["loss"], ref["loss"])
    _close(got["grad_norm"], ref["grad_norm"])
    flips = sum(a != b for mb, rb in zip(got["routing"], ref["routing"], strict=True)
                for la, lb in zip(mb, rb, strict=True) for ta, tb in zip(la, lb, strict=True) for a, b in zip(ta, tb))
    assert len(got["routing"]) == len(ref["routing"]) and flips == 0
    # tiny-moe's w1 is [4 experts, 128, 64]: ep=2 keeps 2 experts a rank; on 4 ranks the 2 replicas
    # of each expert shard split it along dim 1 too (a rank holds 1/4 of the experts' weights)
    four_ranks = name.endswith(("fsdp4", "hsdp", "accum2"))
    assert got["expert_local_shape"] == ([2, 64, 64] if four_ranks else [2, 128, 64])
    assert ("Shard(dim=1)" in got["expert_placements"]) == four_ranks


def test_the_loss_weighs_every_target_token_alike(layouts, tmp_path):
    """Step 1's loss is the cross-entropy summed over the 4 micro-batches' targets / their count,
    recomputed here from the saved weights; the mean of per-micro-batch means differs from it."""
    import torch.nn.functional as F

    from train.model.mm1 import IGNORE, MM1
    from tests.train.layouts_worker import model_cfg, recipe_for

    layout = {"name": "tiny", "model": "tiny"}
    torch.manual_seed(7)
    model = MM1(model_cfg(recipe_for(layout), layout))
    torch.manual_seed(0)
    sums, counts = [], []
    with torch.no_grad():
        for mb in _micro_batches(1):
            logits = model(mb["tokens"], mb["images"], doc_ids=mb["doc_ids"]).logits
            sums.append(float(F.cross_entropy(logits[0], mb["labels"][0], ignore_index=IGNORE, reduction="sum")))
            counts.append(int((mb["labels"] != IGNORE).sum()))
    weighted = sum(sums) / sum(counts)
    per_batch_mean = sum(s / c for s, c in zip(sums, counts)) / 4
    assert abs(layouts["dense"]["loss"][0] - weighted) <= 1e-5 * weighted
    assert max(counts) > 3 * min(counts) and abs(per_batch_mean - weighted) > 1e-4 * weighted


def test_moe_meshes_through_the_cli_write_the_same_losses(launches):
    """`mm1 train` on 4 processes (torchrun; the CLI's `main` in the ranks of the 4-process launch
    above), the demo recipe with tiny-moe, no loader workers, deterministic, 5 steps, on the two
    CLI_MESHES one after the other: FSDP over 4, and HSDP 2 x 2 with ep=2 (the recipe's mesh
    through the CLI, the loader, an expert-sharded checkpoint). Same data (same world), same
    initial weights (drawn once on rank 0): per-step losses equal within 1e-4 relative, and each
    run's last checkpoint is committed. (ep=2 under FSDP over 4 is trained by the layouts above,
    through the same mesh and model building.)"""
    from tests.train.test_trainer import _records

    runs = launches[1]
    losses = {}
    for name in CLI_MESHES:
        records = _records(runs / name / "metrics.jsonl")
        assert sorted(records) == [1, 2, 3, 4, 5] and not any(r["skipped"] for r in records.values())
        losses[name] = [records[s]["loss"] for s in range(1, 6)]
        assert (runs / name / "step-00000005").is_dir()
    for a, b in zip(losses["hsdp-ep2"], losses["fsdp4"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(b), (losses["hsdp-ep2"], losses["fsdp4"])
