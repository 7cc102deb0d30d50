"""The index that scales (issue 20): samples assigned by shard, a small positional state that
resumes exactly on the same layout and continues the epoch on another, and bad samples that are
skipped and counted instead of stopping the run. On the session's curated demo output (its docs
are one shard, so slots share shards by key stride)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.contract import MANIFEST, read_manifest
from train.data import mixture as mixture_module
from train.data.loader import Loader, LoaderConfig
from train.data.mixture import Mixture, MixtureConfig, SkippedTooMany, source_shards
from train.data.shards import list_samples, shard_plan


def _cfg(out, tokenizer, **changes) -> MixtureConfig:
    base = dict(outs=(str(out),), tokenizer=str(tokenizer), seq_len=1024, n_image_tokens=16, buffer_size=2,
                shuffle_buffer=2, open_shards=1, repeat=False)
    base.update(changes)
    return MixtureConfig(**base)


def _all_samples(out) -> set[tuple[str, str]]:
    return {(k, r.key) for k in ("pair", "doc", "text") for r in list_samples([str(out)], k)}


def _seen(mixture: Mixture, packed, into: Counter) -> None:
    for ref in packed.samples:
        sample = mixture.sample_of(ref)
        into[(sample.kind, sample.key)] += 1


def test_shard_plan_covers_every_shard_once_or_shares_by_stride():
    for n_shards, n_slots in ((10, 4), (4, 4), (1, 4), (3, 4)):
        for epoch in (0, 1):
            plans = [shard_plan(n_shards, seed=5, epoch=epoch, slot=s, n_slots=n_slots) for s in range(n_slots)]
            assert all(plans), "every slot draws from every source"
            rows = Counter((j, r) for plan in plans for j, stride, start in plan for r in range(start, 12, stride))
            assert set(rows) == {(j, r) for j in range(n_shards) for r in range(12)} and max(rows.values()) == 1
    assert shard_plan(10, seed=5, epoch=0, slot=0, n_slots=4) != shard_plan(10, seed=5, epoch=1, slot=0, n_slots=4)


def test_the_demo_on_four_slots_draws_every_kind_on_every_slot(curated):
    out, tokenizer = curated
    cfg = _cfg(out, tokenizer)
    seen: Counter = Counter()
    for slot in range(4):
        mixture = Mixture(cfg, slot=slot, n_slots=4)
        kinds = Counter()
        for packed in mixture:
            kinds.update(packed.kinds)
            _seen(mixture, packed, seen)
        assert set(kinds) == {"pair", "doc", "text"}, (slot, kinds)
        assert len(json.dumps(mixture.state_dict())) < 4000  # positional: no token lists, no member lists
    assert set(seen) == _all_samples(out) and max(seen.values()) == 1


@pytest.mark.parametrize("new_slots", [3, 4, 1])
def test_state_of_two_by_two_continues_the_epoch_on_another_layout(curated, new_slots):
    """2 ranks x 2 workers read a while, then the epoch continues on `new_slots` slots (1 x 3, and
    4 x 1, which is the same number of slots: exact, nothing dropped): every sample of the epoch
    is seen once, except those counted as dropped from buffers."""
    out, tokenizer = curated
    cfg = _cfg(out, tokenizer)
    seen: Counter = Counter()
    states = []
    for slot in range(4):
        mixture = Mixture(cfg, slot=slot, n_slots=4)
        for _ in range(2):
            _seen(mixture, next(mixture), seen)
        states.append(json.loads(json.dumps(mixture.state_dict())))
    dropped = 0
    for slot in range(new_slots):
        mixture = Mixture(cfg, slot=slot, n_slots=new_slots)
        mixture.resume(states)
        for packed in mixture:
            _seen(mixture, packed, seen)
        dropped += mixture.stats["dropped_on_reshard"]
    assert max(seen.values()) == 1
    assert len(_all_samples(out) - set(seen)) == dropped and set(seen) <= _all_samples(out)
    if new_slots == 4:
        assert dropped == 0
    else:
        assert 0 < dropped < 20


def test_loader_resumes_two_ranks_on_one(curated):
    """Through the Loader (workers=0, the state as load_checkpoint hands it over)."""
    out, tokenizer = curated
    cfg = LoaderConfig(_cfg(out, tokenizer), batch_size=1, workers=0, image_size=32)
    ranks = []
    for rank in range(2):
        loader = Loader(cfg, rank=rank, world=2)
        for batch, _ in zip(loader, range(2)):
            pass
        ranks.append(json.loads(json.dumps(loader.state_dict())))
    resumed = Loader(cfg, rank=0, world=1, state={**ranks[0], "ranks": ranks})
    batches = list(resumed)
    assert batches and batches[-1]["dropped_on_reshard"] > 0
    assert resumed.stats()["dropped_on_reshard"] == batches[-1]["dropped_on_reshard"]


def _corrupt(out: Path) -> dict[str, str]:
    """In a copy of the demo: a pair's JPEG broken, a pair's tar member cut short (the shard's
    last sample), a doc's JSON broken. Returns kind -> the damaged key."""
    manifest = read_manifest(out)
    pair_shards = manifest["kinds"]["pair"]["shards"]
    hurt = {}
    # a corrupt JPEG: same size, the entropy-coded data zeroed after the header
    shard = pair_shards[0]
    row = pq.read_table(out / shard["sidecar"], columns=["key", "members"]).to_pylist()[0]
    image = next(m for m in row["members"] if m["name"].endswith((".jpg", ".jpeg", ".png", ".webp")))
    with open(out / shard["name"], "r+b") as f:
        f.seek(image["offset"] + 20)
        f.write(b"\0" * (image["size"] - 20))
    hurt["bad_image"] = row["key"]
    # a truncated member: the tar of the biggest other pair shard cut inside its last sample
    shard = max(pair_shards[1:], key=lambda s: s["count"])
    rows = pq.read_table(out / shard["sidecar"], columns=["key", "members"]).to_pylist()
    last = max(rows, key=lambda r: r["key"])
    first = min(last["members"], key=lambda m: m["offset"])
    with open(out / shard["name"], "r+b") as f:
        f.truncate(first["offset"] + first["size"] // 2)
    hurt["truncated"] = last["key"]
    # bad JSON: a doc's json member overwritten with the same number of bytes
    shard = manifest["kinds"]["doc"]["shards"][0]
    row = pq.read_table(out / shard["sidecar"], columns=["key", "members"]).to_pylist()[1]
    meta = next(m for m in row["members"] if m["name"].endswith(".json"))
    with open(out / shard["name"], "r+b") as f:
        f.seek(meta["offset"])
        f.write(b"{" * meta["size"])
    hurt["bad_json"] = row["key"]
    return hurt


def test_bad_samples_are_skipped_counted_and_logged(curated, tmp_path, caplog, monkeypatch):
    out, tokenizer = curated
    copy = tmp_path / "curated"
    shutil.copytree(out, copy)
    hurt = _corrupt(copy)
    cfg = LoaderConfig(_cfg(copy, tokenizer, buffer_size=4, shuffle_buffer=8), batch_size=2, workers=0,
                       image_size=32)
    with caplog.at_level("WARNING"):
        batches = list(Loader(cfg))  # the whole epoch: nothing stops it
    assert batches[-1]["skipped"] == {"doc/bad_json": 1, "pair/bad_image": 1, "pair/truncated": 1}
    for key in hurt.values():
        assert key in caplog.text

    # the recipe threshold: too many skipped samples stop the run with the field's name
    monkeypatch.setattr(mixture_module, "MIN_SAMPLES_FOR_SKIP_CHECK", 20)
    strict = Mixture(_cfg(copy, tokenizer, weights={"pair": 1.0}, repeat=True, max_skipped_fraction=0.01),
                     slot=0, n_slots=1)
    with pytest.raises(SkippedTooMany, match="data.max_skipped_fraction"):
        for _ in range(200):
            next(strict)


def test_bad_outputs_and_weights_fail_at_load(curated, tmp_path):
    out, tokenizer = curated
    copy = tmp_path / "curated"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["kinds"]["text"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"no text samples.*'text': 0"):
        source_shards(_cfg(copy, tokenizer, weights={"pair": 0.5, "text": 0.5}))
    with pytest.raises(ValueError, match="listed twice"):
        source_shards(_cfg(out, tokenizer, outs=(str(out), str(out) + "/")))
    with pytest.raises(FileNotFoundError, match="no manifest"):
        Loader(LoaderConfig(_cfg(tmp_path / "nowhere", tokenizer), workers=0))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MANIFEST).write_text('{"format_version": ')
    with pytest.raises(ValueError, match=f"{broken / MANIFEST}: manifest cannot be read"):
        Loader(LoaderConfig(_cfg(broken, tokenizer), workers=0))
    # a shard the manifest lists but the output lacks: fails at load, with its path (list_shards)
    (copy / manifest["kinds"]["doc"]["shards"][0]["name"]).unlink()
    with pytest.raises(FileNotFoundError, match="docs/00000.tar"):
        Loader(LoaderConfig(_cfg(copy, tokenizer, weights={"doc": 1.0}), workers=0))


def test_a_stream_of_only_unreadable_samples_stops_instead_of_spinning(curated, tmp_path):
    from train.data.shards import EMPTY_PASSES, ShardStream, list_shards

    out, _ = curated
    copy = tmp_path / "curated"
    shutil.copytree(out, copy)
    shards, withdrawn = list_shards([str(copy)], "text")
    for s in shards:
        (copy / s.name).write_bytes(b"")
    stream = ShardStream(shards, withdrawn, seed=0, slot=0, n_slots=1, repeat=True)
    assert list(stream) == []
    assert stream.stats["skipped/truncated"] == EMPTY_PASSES * sum(s.count for s in shards)


def test_mm1_train_resumes_on_another_worker_count(curated, tmp_path, caplog):
    """The whole path (`mm1 train`'s main, run in this process: checkpoint -> load_checkpoint ->
    Loader), on a copy of the demo with a corrupt JPEG, a truncated member and bad JSON: a run
    saved with 2 loader workers continues with 1 and trains to its last step (the epoch
    continues; buffers are counted), the bad pairs skipped and counted in metrics.jsonl."""
    from tests.train.test_trainer import DEMO_TRAIN, _overrides, _records
    from tools.cli import main

    out, tokenizer = curated
    copy = tmp_path / "curated"
    shutil.copytree(out, copy)
    _corrupt(copy)

    def mm1_train(**extra) -> int:
        args = ["train", str(DEMO_TRAIN), "--run-dir", str(tmp_path / "run")]
        for o in _overrides((copy, tokenizer), **{"checkpoint.every": 2, **extra}):
            args += ["--override", o]
        return main(args)

    assert mm1_train(steps=2, **{"data.workers": 2}) == 0
    caplog.clear()
    with caplog.at_level("INFO"):
        assert mm1_train(steps=4, **{"data.workers": 0}) == 0
    assert "resumed from" in caplog.text and "loader resharded from 2 slots to 1" in caplog.text
    records = _records(tmp_path / "run" / "metrics.jsonl")
    assert sorted(records) == [1, 2, 3, 4]
    skipped = records[4]["data_skipped"]  # every pair is read within 4 steps; docs maybe not yet
    assert skipped.get("pair/bad_image", 0) >= 1 and skipped.get("pair/truncated", 0) >= 1, skipped
    assert set(skipped) <= {"pair/bad_image", "pair/truncated", "doc/bad_json"}


def test_skip_logs_are_rate_limited_per_reason(caplog):
    import logging

    from train.data.shards import RateLimitedLog

    limited = RateLimitedLog(logging.getLogger("test.rate"), first=2, every=5)
    with caplog.at_level("WARNING", logger="test.rate"):
        for i in range(12):
            limited("truncated", "sample %d", i)
        limited("bad_json", "sample %d", 99)
    assert [r.getMessage() for r in caplog.records] == [
        "[truncated #1] sample 0", "[truncated #2] sample 1", "[truncated #5] sample 4",
        "[truncated #10] sample 9", "[bad_json #1] sample 99"]


def test_reshard_when_slots_are_in_different_passes(curated):
    """repeat on: slots of the old layout may be in different epochs; the oldest pass continues,
    and what a slot already read of a later pass is counted as replayed."""
    out, tokenizer = curated
    cfg = _cfg(out, tokenizer, repeat=True, weights={"text": 1.0})
    states = []
    for slot in range(4):
        mixture = Mixture(cfg, slot=slot, n_slots=4)
        for _ in range(3 + 4 * slot):
            next(mixture)
        states.append(json.loads(json.dumps(mixture.state_dict())))
    epochs = {s["streams"]["text"]["epoch"] for s in states}
    assert len(epochs) > 1
    first = Mixture(cfg, slot=0, n_slots=3)
    first.resume(states)
    assert first.streams["text"].epoch == min(epochs)
    assert first.stats["replayed_on_reshard"] > 0
    for slot in range(3):
        mixture = Mixture(cfg, slot=slot, n_slots=3)
        mixture.resume(states)
        assert all(p.kind == "text" for p in (next(mixture) for _ in range(10)))
