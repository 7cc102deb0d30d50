"""Checkpoints of the tiny MM1 (random weights: mechanics only): an exact round trip of parameters,
AdamW state, LambdaLR, RNG and per-rank extra; a save that died before its marker is never
trusted and is cleaned later; `keep` prunes; hostile files (a pickle with a payload as `.metadata`,
pickle bytes where JSON belongs, a stray `.pt`) are refused without running anything; and a real
2-rank torchrun (gloo, FSDP2-sharded model) saves and resumes with each rank's own extra."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from train.checkpoint import (CheckpointError, capture_rng, latest_checkpoint, load_checkpoint, restore_rng,
                              save_checkpoint)
from train.model.mm1 import MM1
from train.model.registry import get_config

REPO = Path(__file__).resolve().parents[2]


def _build(seed: int) -> tuple[MM1, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = MM1(get_config("tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    return model, optimizer, scheduler


def _train(model: MM1, optimizer: torch.optim.Optimizer, scheduler, steps: int) -> None:
    """Steps on random gradients: enough to give AdamW moments and the schedule a position."""
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
        scheduler.step()


@pytest.fixture(scope="module")
def trained():
    model, optimizer, scheduler = _build(0)
    _train(model, optimizer, scheduler, 3)
    return model, optimizer, scheduler


def _save(run_dir: Path, step: int, trained, keep: int = 3) -> Path:
    model, optimizer, scheduler = trained
    return save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                           extra={"loader": {"step": step, "streams": [1, 2]}}, keep=keep)


def _load(path: Path) -> dict:
    model, optimizer, scheduler = _build(1)
    return load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)


def _draws() -> tuple:
    return random.random(), np.random.rand(), np.random.randn(), torch.rand(4)


def test_round_trip_is_exact(tmp_path, trained):
    model, optimizer, scheduler = trained
    path = _save(tmp_path, 3, trained)
    after_save = _draws()  # the save itself must not have drawn from any generator
    assert latest_checkpoint(tmp_path) == path == tmp_path / "step-00000003"
    assert json.loads((path / "COMPLETE").read_text())["step"] == 3

    model2, optimizer2, scheduler2 = _build(1)
    assert not torch.equal(model2.decoder.output.weight, model.decoder.output.weight)
    extra = load_checkpoint(path, model=model2, optimizer=optimizer2, scheduler=scheduler2)
    after_load = _draws()

    assert extra == {"loader": {"step": 3, "streams": [1, 2], "ranks": [{"step": 3, "streams": [1, 2]}]}}
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    s1, s2 = optimizer.state_dict(), optimizer2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for i in s1["state"]:
        for name, value in s1["state"][i].items():
            assert torch.equal(value, s2["state"][i][name]), (i, name)
    assert scheduler.state_dict() == scheduler2.state_dict()
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert after_save[:3] == after_load[:3] and torch.equal(after_save[3], after_load[3])


def test_rng_capture_is_json_and_restores(tmp_path):
    np.random.randn()  # leave a cached Gaussian in NumPy's state
    state = json.loads(json.dumps(capture_rng()))
    first = _draws()
    restore_rng(state)
    again = _draws()
    assert first[:3] == again[:3] and torch.equal(first[3], again[3])


def test_unfinished_saves_are_ignored_and_cleaned(tmp_path, trained):
    good = _save(tmp_path, 1, trained)
    # A save killed after DCP wrote (before the rename): a tmp folder with everything but the marker.
    killed = _save(tmp_path / "scratch", 2, trained)
    (killed / "COMPLETE").unlink()
    tmp_left = tmp_path / "step-00000002.tmp-0123abcd"
    shutil.move(killed, tmp_left)
    # A save killed between the rename and the marker: the final name, no marker.
    renamed = tmp_path / "step-00000003"
    shutil.copytree(tmp_left, renamed)
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        _load(renamed)

    # A save that fails on every rank before writing leaves nothing new.
    model, optimizer, _ = trained
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path, 4, model=model, optimizer=optimizer, scheduler=None, extra={"bad": object()})
    assert latest_checkpoint(tmp_path) == good

    _save(tmp_path, 5, trained)
    assert not tmp_left.exists() and not renamed.exists()  # the next successful save removes leftovers
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000005"


def test_keep_prunes_oldest(tmp_path, trained):
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, trained, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000030", "step-00000040"]


def test_resaving_a_step_replaces_it(tmp_path, trained):
    _save(tmp_path, 7, trained)
    path = _save(tmp_path, 7, trained)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000007"]
    assert _load(path)["loader"]["step"] == 7


def _consistent_marker(path: Path) -> None:
    """Rewrite the marker's sizes, as an attacker who controls the folder would."""
    marker = json.loads((path / "COMPLETE").read_text())
    marker["files"] = {f.name: f.stat().st_size for f in path.iterdir() if f.name != "COMPLETE"}
    (path / "COMPLETE").write_text(json.dumps(marker))


class _Payload:
    """Unpickling this calls print: a harmless stand-in for os.system."""

    def __reduce__(self):
        return (print, ("PAYLOAD RAN",))


def test_malicious_metadata_is_refused_not_run(tmp_path, trained, capsys):
    path = _save(tmp_path, 1, trained)
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    metadata = FileSystemReader(str(path)).read_metadata()  # our own trusted file, to embed a payload in
    metadata.planner_data = {"x": _Payload()}
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    _consistent_marker(path)
    with pytest.raises(CheckpointError, match="builtins.print"):
        _load(path)
    (path / ".metadata").write_bytes(pickle.dumps(_Payload()))
    _consistent_marker(path)
    with pytest.raises(CheckpointError, match="refused"):
        _load(path)
    assert "PAYLOAD RAN" not in capsys.readouterr().out


def test_pickled_object_among_tensors_is_refused(tmp_path, trained, capsys):
    """DCP stores non-tensor values (optimizer hyperparameters) as torch.save bytes and its own
    planner loads them with weights_only=False; ours must not."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    path = _save(tmp_path, 1, trained)
    model, optimizer, _ = trained
    model_sd, optim_sd = get_state_dict(model, optimizer)
    optim_sd["param_groups"][0]["lr"] = _Payload()
    for f in (".metadata", "__0_0.distcp"):
        (path / f).unlink()
    dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=dcp.FileSystemWriter(str(path)))
    _consistent_marker(path)
    with pytest.raises(CheckpointError, match="refused"):
        _load(path)
    assert "PAYLOAD RAN" not in capsys.readouterr().out


def test_loader_json_replaced_by_pickle_is_refused(tmp_path, trained, capsys):
    path = _save(tmp_path, 1, trained)
    (path / "extra-rank0.json").write_bytes(pickle.dumps({"loader": _Payload()}))
    with pytest.raises(CheckpointError, match="extra-rank0.json holds a pickle"):
        _load(path)
    assert "PAYLOAD RAN" not in capsys.readouterr().out


def test_foreign_files_and_truncation_are_refused(tmp_path, trained):
    path = _save(tmp_path, 1, trained)
    (path / "model.pt").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError, match="unexpected 'model.pt'"):
        _load(path)
    (path / "model.pt").unlink()
    shard = path / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="size"):
        _load(path)


_SCRIPT = """
import sys
from pathlib import Path
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from train.checkpoint import save_checkpoint, load_checkpoint, latest_checkpoint
from train.model.mm1 import MM1
from train.model.registry import get_config

def build(seed):
    torch.manual_seed(seed)
    model = MM1(get_config("tiny"))
    for layer in model.decoder.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)
    return model, optimizer, scheduler

def dump(mode, model, optimizer, scheduler):
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    moments = [optimizer.state[p]["exp_avg"].full_tensor() for p in model.parameters()]
    draw = torch.rand(3)  # per rank: each rank's own RNG must come back
    torch.save({"model": full, "moments": moments, "draw": draw, "lr": scheduler.get_last_lr()},
               run_dir / f"{mode}-{rank}.pt")

run_dir = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
model, optimizer, scheduler = build(0)
torch.manual_seed(rank)
for p in model.parameters():
    p.grad = torch.randn_like(p)
optimizer.step()
scheduler.step()
save_checkpoint(run_dir, 1, model=model, optimizer=optimizer, scheduler=scheduler,
                extra={"loader": {"rank": rank}})
dump("save", model, optimizer, scheduler)
del model, optimizer, scheduler
# the resume: a model built again from other weights (drawing them moves the RNG), no optimizer
# state yet, all of it read back from disk
model, optimizer, scheduler = build(123)
extra = load_checkpoint(latest_checkpoint(run_dir), model=model, optimizer=optimizer, scheduler=scheduler)
assert extra == {"loader": {"rank": rank, "ranks": [{"rank": 0}, {"rank": 1}]}}, extra
dump("load", model, optimizer, scheduler)
dist.destroy_process_group()
"""


def _torchrun(script: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), *args]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_ranks_fsdp2_save_and_resume(tmp_path):
    """One torchrun launch: each rank saves its shards, its RNG and its own extra, then builds the
    model again from other weights and loads the checkpoint back from disk (a resume in a fresh
    process: the trainer's tests, test_trainer.py)."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    run_dir = tmp_path / "run"
    _torchrun(script, str(run_dir))
    path = latest_checkpoint(run_dir)
    assert path is not None
    assert {f.name for f in path.iterdir()} >= {"__0_0.distcp", "__1_0.distcp", "extra-rank0.json",
                                                 "extra-rank1.json", "COMPLETE"}
    for rank in (0, 1):
        saved = torch.load(run_dir / f"save-{rank}.pt", weights_only=True)
        loaded = torch.load(run_dir / f"load-{rank}.pt", weights_only=True)
        assert all(torch.equal(saved["model"][k], loaded["model"][k]) for k in saved["model"])
        assert all(torch.equal(a, b) for a, b in zip(saved["moments"], loaded["moments"]))
        assert torch.equal(saved["draw"], loaded["draw"]) and saved["lr"] == loaded["lr"]
    assert not torch.equal(torch.load(run_dir / "save-0.pt")["draw"], torch.load(run_dir / "save-1.pt")["draw"])

    # Another world size loads too (DCP reshards the tensors); the loader gets every saved rank's
    # state to redistribute, the step and the rest come from rank 0.
    model, optimizer, scheduler = _build(1)
    extra = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    assert extra == {"loader": {"rank": 0, "ranks": [{"rank": 0}, {"rank": 1}]}}
    saved = torch.load(run_dir / "save-0.pt", weights_only=True)
    assert all(torch.equal(saved["model"][k], v) for k, v in model.state_dict().items())
