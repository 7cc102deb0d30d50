"""The trainer end to end on the demo's curated output (curated by the real runner) with the tiny
MM1 (random weights: mechanics only): the loss falls in one process; two torchrun processes
(gloo, CPU) agree on the loss, and a NaN injected on one rank skips the step on both without a
hang, keeping non-finite weights out of the checkpoints, and their checkpoint resumes on one
process (the loader's epoch resharded from 2 slots to 1); a run killed after step 5 and resumed
from its step-3 checkpoint repeats the losses it logged before the kill exactly, and leaves one
series of steps in metrics.jsonl and TensorBoard. The run directory holds the resolved recipe.

Subprocesses run `python -m tools.cli train` (torchrun for two ranks); their metrics.jsonl
files are read back. Timeouts are generous bounds against hangs, not timings."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from train.recipe import load_train_recipe
from train.trainer import (EXIT_STOPPED, INJECT_NAN_ENV, STOP_AFTER_ENV, tensorboard_writer, trim_metrics,
                           write_recipe_copy)

ROOT = Path(__file__).resolve().parents[2]
DEMO_TRAIN = ROOT / "recipes" / "train" / "demo.yaml"
HANG = 420  # seconds: a bound against hangs on a shared 2-core machine, not a timing


def _overrides(curated, **extra) -> list[str]:
    out, tokenizer = curated
    pairs = {"data.outs": f"[{out}]", "data.tokenizer": str(tokenizer), **extra}
    return [f"{k}={v}" for k, v in pairs.items()]


def _mm1_train_start(curated, run_dir: Path, *, nproc: int = 1, env: dict | None = None, **extra) -> subprocess.Popen:
    """`python -m tools.cli train` (under torchrun for nproc > 1) started, not awaited."""
    args = ["-m", "tools.cli", "train", str(DEMO_TRAIN), "--run-dir", str(run_dir)]
    for o in _overrides(curated, **extra):
        args += ["--override", o]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + args
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=HANG)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _mm1_train(curated, run_dir: Path, *, nproc: int = 1, env: dict | None = None, **extra) -> subprocess.CompletedProcess:
    return _finish(_mm1_train_start(curated, run_dir, nproc=nproc, env=env, **extra))


def _records(path: Path) -> dict[int, dict]:
    """step -> its record (the last one written: a resumed run rewrites the steps it repeats)."""
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def _tensorboard_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of the run's TensorBoard events as TensorBoard's reader gives them (events a
    resume purged left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("loss")]


def _as_logged(records: dict[int, dict]) -> list[tuple[int, float]]:
    """metrics.jsonl's (step, loss) as TensorBoard stores them (float32)."""
    return [(step, float(np.float32(r["loss"]))) for step, r in sorted(records.items())]


def _lists_under(state, keys: tuple[str, ...]) -> list[list]:
    """The lists of items under `keys` anywhere in a loader slot's state (its packers' buffers,
    its pending chunks), or under a per-source dict there, whatever the nesting."""
    found = []
    if isinstance(state, dict):
        for k, v in state.items():
            if k in keys and isinstance(v, list):
                found.append(v)
            elif k in keys and isinstance(v, dict):
                found += [x for x in v.values() if isinstance(x, list)]
            else:
                found += _lists_under(v, keys)
    return found


def test_the_loss_falls_in_one_process(demo_trained):
    """The demo's own training run (tests/conftest.py `demo_trained`: recipes/train/demo.yaml in
    one process, 40 steps of batch 4 x 256 tokens, lr 3e-3, warmup 5): the mean loss of the last
    5 steps is below 0.8 x the first 5's (it lands near 0.74), the lr warms up and ends the cosine
    at 10% of the peak, and steps 20 and 40 are checkpointed. (Validation at its cadence:
    test_fsdp2_with_activation_checkpointing_on_cpu.) The run directory holds the resolved
    recipe, which loads back as the run's, under a header naming the overrides the demo gave,
    and TensorBoard events with metrics.jsonl's losses; the export's files are readable by all,
    as the umask lets any file be."""
    from tools.demo.run import TRAIN_RECIPE

    demo, final, _ = demo_trained
    run = demo.root / "run"
    losses = final["losses"]
    assert final["step"] == 40 and len(losses) == 40 and final["skipped"] == 0
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    records = _records(run / "metrics.jsonl")
    assert sorted(records) == list(range(1, 41))
    assert records[1]["lr"] == pytest.approx(3e-3 / 5) and records[5]["lr"] == pytest.approx(3e-3)
    assert records[40]["lr"] == pytest.approx(3e-4)  # the cosine ends at 10% of the peak
    assert records[10]["tokens_per_s"] > 0 and records[10]["memory_gib"] > 0
    assert sorted(p.name for p in run.glob("step-*")) == ["step-00000020", "step-00000040"]
    overrides = {"data.outs": [str(demo.out)], "data.tokenizer": str(demo.tokenizer)}
    assert load_train_recipe(run / "recipe.yaml") == load_train_recipe(TRAIN_RECIPE, overrides)
    header = (run / "recipe.yaml").read_text().splitlines()[1]  # the demo's overrides, as train_demo gave them
    assert header.startswith("# overrides: ") and yaml.safe_load(header[len("# overrides: "):]) == overrides
    assert _tensorboard_losses(run) == _as_logged(records)
    umask = os.umask(0)
    os.umask(umask)
    modes = {oct(f.stat().st_mode & 0o777) for f in (demo.root / "export").rglob("*") if f.is_file()}
    assert modes == {oct(0o666 & ~umask)}


def test_consecutive_non_finite_steps_stop_the_run(curated, tmp_path, monkeypatch):
    """NaN at steps 2 and 3 with max_bad_steps 2: `mm1 train` exits with EXIT_DIVERGED, and no
    checkpoint is written after a bad step."""
    from tools.cli import main
    from train.trainer import EXIT_DIVERGED

    monkeypatch.setenv(INJECT_NAN_ENV, "0:2-3")
    args = ["train", str(DEMO_TRAIN), "--run-dir", str(tmp_path / "run"), "--steps", "6"]
    for o in _overrides(curated, max_bad_steps=2, **{"checkpoint.every": 1, "data.workers": 0}):
        args += ["--override", o]
    assert main(args) == EXIT_DIVERGED
    assert [p.name for p in (tmp_path / "run").glob("step-*")] == ["step-00000001"]
    records = _records(tmp_path / "run" / "metrics.jsonl")
    assert sorted(records) == [1, 2, 3] and records[3]["skipped_total"] == 2


# One sequence per batch of one source (data.packing per_kind: mixed packing puts an image in
# nearly every sequence), pairs and texts half and half: with seed 0 a step occurs where one rank's
# sequence is text only. The two-rank run and its resume on one process read the same way.
TWO_RANK_DATA = {"data.batch_size": 1, "data.weights": "{pair: 0.5, text: 0.5}", "data.packing": "per_kind",
                 "parallel.activation_checkpointing": "full"}


@pytest.fixture(scope="module")
def two_ranks(curated, tmp_path_factory):
    """torchrun, 2 processes (FSDP2 over both: per block, vision tower, connector, root; full
    activation checkpointing; gloo on CPU), 6 steps, checkpoints every 2, validation every 4 on 2
    batches, rank 1's loss NaN at step 3. Read, never changed, by the tests below (a test that
    writes works on a copy)."""
    run_dir = tmp_path_factory.mktemp("two_ranks")
    proc = _mm1_train(curated, run_dir, nproc=2, env={INJECT_NAN_ENV: "1:3"}, steps=6, **{
        "checkpoint.every": 2, **TWO_RANK_DATA,
        "validation.outs": f"[{curated[0]}]", "validation.every": 4, "validation.batches": 2})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_two_ranks_take_steps_and_agree_on_the_loss(two_ranks):
    r0 = _records(two_ranks / "metrics.jsonl")
    r1 = _records(two_ranks / "metrics.rank1.jsonl")
    assert sorted(r0) == sorted(r1) == list(range(1, 7))
    assert len(list((two_ranks / "tensorboard").iterdir())) == 1  # rank 0's events only
    for step in (1, 2, 4, 5, 6):
        a, b = r0[step], r1[step]
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]  # one all-reduced value
        assert a["rank_loss"] != b["rank_loss"]  # each rank had its own data
        # the step's loss weighs every target token alike, over both ranks
        assert a["targets"] == a["rank_targets"] + b["rank_targets"]
        assert a["loss"] == pytest.approx((a["rank_loss"] * a["rank_targets"] + b["rank_loss"] * b["rank_targets"])
                                          / a["targets"])


def test_a_nan_on_one_rank_skips_the_step_on_both(two_ranks, tmp_path):
    """Rank 1's NaN at step 3: both ranks skip it (no update), neither hangs, training goes on,
    and the step-4 checkpoint holds finite weights (step 2's is pruned: keep 2)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    r0 = _records(two_ranks / "metrics.jsonl")
    r1 = _records(two_ranks / "metrics.rank1.jsonl")
    assert r0[3]["skipped"] and r1[3]["skipped"] and r0[6]["skipped_total"] == r1[6]["skipped_total"] == 1
    assert math.isfinite(r0[3]["rank_loss"]) and math.isnan(r1[3]["rank_loss"])
    assert all(math.isfinite(r0[s]["loss"]) for s in (4, 5, 6))
    assert sorted(p.name for p in two_ranks.glob("step-*")) == ["step-00000004", "step-00000006"]
    flat = tmp_path / "step4.pt"
    dcp_to_torch_save(two_ranks / "step-00000004", flat)
    state = torch.load(flat, weights_only=True)
    weights = {k: v for k, v in state["model"].items() if torch.is_tensor(v)}
    assert weights and all(torch.isfinite(v).all() for v in weights.values())


def test_a_two_rank_checkpoint_resumes_on_one_process(curated, two_ranks, tmp_path):
    """Issue 20: the 2-process run (2 ranks x 1 loader worker: 2 slots) continues from its step-6
    checkpoint in one process to step 8 (a copy: the tests above read the run as it was). It
    resumes, not restarts: steps 7-8 only are appended, the skipped step counted by the 2 ranks
    is carried. The loader continues the epoch on 1 slot and reports `data_dropped_on_reshard`:
    the samples both ranks' slots held in buffers at step 6 (shuffle buffers, packer buffers,
    pending chunks: what the new layout cannot place), bounded from the saved states without
    relying on the mixer's own layout of them. The lr follows the new schedule (8 steps) from
    step 7 on. Step 8 is checkpointed by the one rank."""
    from train.checkpoint import read_state

    run_dir = tmp_path / "run"
    shutil.copytree(two_ranks, run_dir)
    proc = _mm1_train(curated, run_dir, steps=8, **{"checkpoint.every": 2, **TWO_RANK_DATA})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {run_dir / 'step-00000006'} at step 6" in proc.stderr
    assert "loader resharded from 2 slots to 1" in proc.stderr

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6, 7, 8]  # 7 and 8 appended to rank 0's 1-6
    assert (run_dir / "metrics.rank1.jsonl").read_text() == (two_ranks / "metrics.rank1.jsonl").read_text()
    new = {r["step"]: r for r in lines[6:]}
    for r in new.values():
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and not r["skipped"]
        assert r["skipped_total"] == 1  # step 3, skipped on both ranks, comes from the checkpoint
        assert r["targets"] == r["rank_targets"]  # one rank now
    # the lr follows this run's 8-step schedule from the first resumed step (the checkpoint's
    # optimizer holds the 6-step cosine's value)
    from train.schedule import lr_lambda

    o = load_train_recipe(DEMO_TRAIN).optim
    for step in (7, 8):
        assert new[step]["lr"] == pytest.approx(o.lr * lr_lambda(step, o.warmup, 8, o.min_lr_ratio))

    # the count the loader logged and reported, against the two saved slots' states: at least the
    # positions in their shuffle buffers (never drawn), at most those plus every item of theirs
    # that waited in a packer buffer or pending (a sample counts once, and may have several items)
    logged = re.search(r"loader resharded from 2 slots to 1: (\d+) buffered samples dropped", proc.stderr)
    dropped = new[7]["data_dropped_on_reshard"]
    assert logged and int(logged[1]) == dropped == new[8]["data_dropped_on_reshard"]
    shuffled = waiting = 0
    for rank in (0, 1):
        extra = json.loads((run_dir / "step-00000006" / f"extra-rank{rank}.json").read_text())["extra"]
        slot = dict(extra["loader"]["workers"]["0"])  # 1 worker a rank: slot = rank
        shuffled += sum(len(stream["buffer"]) for stream in slot.pop("streams").values())
        waiting += sum(map(len, _lists_under(slot, ("buffer", "pending"))))
    assert 0 < shuffled <= dropped <= shuffled + waiting, (shuffled, dropped, waiting)
    assert all(r["data_dropped_on_reshard"] == 0 for r in lines[:6])

    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-00000006", "step-00000008"]  # keep 2
    final = run_dir / "step-00000008"
    assert read_state(final)["step"] == 8 and json.loads((final / "COMPLETE").read_text())["world_size"] == 1
    assert not (final / "extra-rank1.json").exists()
    loader = json.loads((final / "extra-rank0.json").read_text())["extra"]["loader"]
    assert (loader["world"], loader["batches"]) == (1, 8) and "reshard_from" not in loader
    assert loader["workers"]["0"]["stats"]["dropped_on_reshard"] == dropped  # the count survives the next resume


def test_fsdp2_with_activation_checkpointing_on_cpu(two_ranks):
    """The two-rank run is FSDP2 with activation checkpointing on CPU with gloo (torch 2.14): both
    ranks take steps with one finite, agreed loss, and checkpoint; a step where one rank's
    sequence is text only (no image) does not hang the vision groups; validation runs at its
    cadence, the same on both ranks."""
    r0, r1 = _records(two_ranks / "metrics.jsonl"), _records(two_ranks / "metrics.rank1.jsonl")
    assert sorted(r0) == sorted(r1) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r0[s]["loss"]) and r0[s]["loss"] == r1[s]["loss"] for s in r0 if s != 3)  # 3: the NaN
    assert any((r0[s]["rank_images"] == 0) != (r1[s]["rank_images"] == 0) for s in r0)
    # validation: mean loss per kind over 2 batches of one pass, at its cadence only (every 4)
    assert math.isfinite(r0[4]["val/pair"]) and r0[4]["val/text"] == r1[4]["val/text"]
    assert not any(k.startswith("val/") for s in (1, 2, 3, 5) for k in r0[s])
    assert (two_ranks / "step-00000006").is_dir()


def test_a_sharded_checkpoint_exports_in_one_process(two_ranks, tmp_path):
    """The checkpoint the two FSDP ranks wrote exports in this one process: whole tensors equal to
    torch's own reassembly (dcp_to_torch_save), and the exported model runs."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from train.export import export_checkpoint, load_exported

    summary = export_checkpoint(two_ranks, tmp_path / "export", hf_decoder=False)
    assert Path(summary["checkpoint"]).name == "step-00000006"
    dcp_to_torch_save(two_ranks / "step-00000006", tmp_path / "flat.pt")
    reference = torch.load(tmp_path / "flat.pt", weights_only=True)["model"]
    exported = load_exported(tmp_path / "export").eval()
    ours = exported.state_dict()
    assert set(ours) == {k for k, v in reference.items() if torch.is_tensor(v)}
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    with torch.no_grad():
        assert torch.isfinite(exported(torch.tensor([[5, 6, 7]])).logits).all()


def test_a_killed_run_resumes_with_the_same_losses(curated, tmp_path):
    """Deterministic mode, 2 loader workers, 6 steps, checkpoints every 3: killed (os._exit)
    after step 5, resumed from step 3; steps 4-5 repeat the losses and lrs the run logged before
    the kill (up to it the run is an uninterrupted one), and step 6 follows. The resumed run's
    steps 4-5 replace the killed run's in metrics.jsonl and in TensorBoard (flushed at the kill):
    one series, 1 to 6. recipe.yaml holds the resolved recipe and the overrides given; the
    resume, with the same recipe, rewrites it and keeps no other copy."""
    run = tmp_path / "run"
    common = {"steps": 6, "checkpoint.every": 3, "deterministic": "true", "data.workers": 2}
    killed = _mm1_train(curated, run, env={STOP_AFTER_ENV: "5"}, **common)
    assert killed.returncode == EXIT_STOPPED, killed.stderr[-4000:]
    assert [p.name for p in run.glob("step-*")] == ["step-00000003"]
    expected = _records(run / "metrics.jsonl")
    assert sorted(expected) == [1, 2, 3, 4, 5]  # step 5 ran, then the kill
    assert _tensorboard_losses(run) == _as_logged(expected)
    overrides = dict(o.split("=", 1) for o in _overrides(curated, **common))
    header = (run / "recipe.yaml").read_text().splitlines()[1]
    assert yaml.safe_load(header.removeprefix("# overrides: ")) == {k: yaml.safe_load(v) for k, v in overrides.items()}
    recipe = load_train_recipe(DEMO_TRAIN, {k: yaml.safe_load(v) for k, v in overrides.items()})
    assert load_train_recipe(run / "recipe.yaml") == recipe
    resumed = _mm1_train(curated, tmp_path / "run", **common)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {tmp_path / 'run' / 'step-00000003'} at step 3" in resumed.stderr

    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the resumed run's 4-5 replaced the killed run's
    got = _records(run / "metrics.jsonl")
    for step in (4, 5):
        assert got[step]["loss"] == expected[step]["loss"], step
        assert got[step]["lr"] == expected[step]["lr"]
    assert math.isfinite(got[6]["loss"]) and not got[6]["skipped"]
    assert _tensorboard_losses(run) == _as_logged(got)
    assert "resumed from step 3" in (run / "recipe.yaml").read_text()
    assert load_train_recipe(run / "recipe.yaml") == recipe and not list(run.glob("recipe.until-*"))


def test_the_run_directory_keeps_the_recipe_that_trained_each_kept_step(tmp_path, caplog):
    """A resume with another recipe keeps the one that trained the steps up to the resume point
    as recipe.until-step-<N>.yaml; a second resume from the same step keeps that one, not the
    recipe whose steps were discarded. Metrics past the resume point go, and so does a line a
    crash cut short. Without the tensorboard package the run logs how to get it, once."""
    a, b, c = (load_train_recipe(DEMO_TRAIN, {"steps": n}) for n in (6, 8, 10))
    write_recipe_copy(tmp_path, a, {"steps": 6}, 0)
    write_recipe_copy(tmp_path, b, {"steps": 8}, 3)
    write_recipe_copy(tmp_path, c, None, 3)
    assert load_train_recipe(tmp_path / "recipe.yaml") == c
    assert load_train_recipe(tmp_path / "recipe.until-step-00000003.yaml") == a
    assert (tmp_path / "recipe.yaml").read_text().splitlines()[1] == "# overrides: {}"

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert trim_metrics(metrics, 3) == 3
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3]

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
        with caplog.at_level("INFO", logger="mm1.train"):
            assert tensorboard_writer(tmp_path, a, 0) is None
    assert [r.getMessage() for r in caplog.records if "tensorboard" in r.getMessage()] == [
        "no TensorBoard logging: the tensorboard package is not installed "
        "(pip install 'mm1-pipeline[tensorboard]'; log.tensorboard: false silences this)"]
    assert not (tmp_path / "tensorboard").exists()
