"""The training data path end to end on a real curated output (the demo's: pairs, WARC documents
and a text corpus, curated by the real runner) and its own byte-level BPE: the 45/45/10
mixture, ranks and workers that never overlap, labels and document ids, and an exact
continuation after save and restore through DataLoader worker processes."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from train.data.loader import Loader, LoaderConfig
from train.data.mixture import Mixture, MixtureConfig
from train.model.mm1 import text_labels


def _cfg(curated, **changes) -> MixtureConfig:
    out, tokenizer = curated
    base = dict(outs=(str(out),), tokenizer=str(tokenizer), seq_len=1024, n_image_tokens=16, buffer_size=16)
    base.update(changes)
    return MixtureConfig(**base)


def test_realised_mixture_and_sequence_invariants(curated):
    """1,500 mixed sequences: every source's share of the tokens within 1 point of 45/45/10 over
    every window of 1,000 sequences; sequences hold several kinds; every sequence has a loss token,
    labels never target an image placeholder or padding nor cross a sample, images match their
    placeholder runs, and each token's kind (collate's `token_kinds`) is its sample's."""
    from tools.bench.packing import window_deviation
    from train.data.loader import collate

    mixture = Mixture(_cfg(curated), slot=0, n_slots=1)
    image_id, pad_id = mixture.tok.image_id, mixture.tok.pad_id
    names = list(mixture.mixer.weights)
    rows, mixed = [], 0
    for packed in (next(mixture) for _ in range(1500)):
        mixed += packed.kind == "mixed"
        row = dict.fromkeys(names, 0)
        for name, (n, _) in zip(packed.sources, packed.sizes):
            row[name] += n
        rows.append([row[n] for n in names])
        tokens = torch.tensor([packed.tokens])
        doc_ids = torch.tensor([packed.doc_ids])
        labels = torch.tensor([packed.labels])
        assert (labels != -100).any()
        targets = labels[labels != -100]
        assert not ((targets == image_id) | (targets == pad_id)).any()
        assert torch.equal(labels, text_labels(tokens, image_id, doc_ids, pad_id=pad_id))
        assert int((tokens == image_id).sum()) == 16 * len(packed.images) and len(packed.images) <= 16
        assert sum(n for n, _ in packed.sizes) + packed.n_pad == 1024
    assert mixed > 1000
    weights = [mixture.mixer.weights[n] for n in names]
    assert window_deviation(rows, weights) <= 0.01, mixture.mixer.shares()
    token_kinds = collate([packed], lambda data: torch.zeros(3, 2, 2))["token_kinds"][0].tolist()
    assert [("pair", "doc", "text")[k] for k in token_kinds[:len(token_kinds) - packed.n_pad]] == [
        kind for kind, (n, _) in zip(packed.kinds, packed.sizes) for _ in range(n)]
    assert set(token_kinds[len(token_kinds) - packed.n_pad:]) <= {-1}


def test_per_kind_packing_keeps_one_source_a_sequence(curated):
    """`per_kind`: each sequence one source's samples; the shares still follow the weights."""
    mixture = Mixture(_cfg(curated, packing="per_kind"), slot=0, n_slots=1)
    sequences = [next(mixture) for _ in range(300)]
    assert all(len(set(p.sources)) == 1 and p.kind == p.source for p in sequences)
    assert {p.kind for p in sequences} == {"pair", "doc", "text"}
    for name, share in mixture.mixer.shares().items():
        assert abs(share - mixture.mixer.weights[name]) < 0.03, mixture.mixer.shares()


def _one_pass(cfg: MixtureConfig, rank: int, world: int, workers: int) -> list[dict]:
    loader = Loader(LoaderConfig(cfg, batch_size=2, workers=workers, image_size=56), rank=rank, world=world)
    return list(loader)


def test_one_pass_over_two_ranks_and_two_workers_sees_every_sample_once(curated):
    """repeat off: each slot reads its share of one pass; together they read every sample once."""
    cfg = _cfg(curated, repeat=False)
    seen: Counter[tuple] = Counter()
    for rank in range(2):
        for worker in range(2):
            mixture = Mixture(cfg, slot=rank * 2 + worker, n_slots=4)
            for packed in mixture:
                for ref in packed.samples:  # positional: [source, shard, row, chunk]
                    sample = mixture.sample_of(ref)
                    seen[(sample.kind, sample.key, ref[3])] += 1
    from train.data.shards import list_samples

    out = cfg.outs[0]
    expected = {(k, r.key) for k in ("pair", "doc", "text") for r in list_samples([out], k)}
    assert {(k, key) for k, key, _ in seen} == expected
    assert max(seen.values()) == 1


def test_restore_continues_exactly_through_worker_processes(curated):
    """Batches after a checkpoint at an arbitrary step equal those of the uninterrupted run, with
    2 DataLoader workers (forkserver processes) and the state through JSON."""
    cfg = LoaderConfig(_cfg(curated), batch_size=2, workers=2, image_size=56)
    batches, states = [], []
    with Loader(cfg) as loader:
        for batch in loader:
            batches.append(batch)
            states.append(json.loads(json.dumps(loader.state_dict())))
            if len(batches) == 9:
                break
    with Loader(cfg, state=states[4]) as resumed:  # after 5 batches: the next comes from worker 1
        again = [batch for batch, _ in zip(resumed, range(4))]
    assert len(again) == 4
    for expected, batch in zip(batches[5:], again):
        assert torch.equal(batch["tokens"], expected["tokens"])
        assert torch.equal(batch["labels"], expected["labels"])
        assert batch["kinds"] == expected["kinds"]
        assert (batch["images"] is None) == (expected["images"] is None)
        if batch["images"] is not None:
            assert torch.equal(batch["images"], expected["images"])
    with pytest.raises(ValueError, match="without every saved rank's state"):  # another layout needs them all
        Loader(cfg, rank=1, world=2, state={**states[4], "world": 2})


def test_a_loader_stopped_mid_prefetch_ends_its_workers_cleanly(curated):
    """Closing while both workers are still sending batches: every worker exits with code 0.
    With spawned workers this failed in most rounds (SIGABRT from a feeder thread cut down at
    interpreter exit; loader.py says why), and the DataLoader raised it as a crashed worker. The
    worker list is torch's private attribute: if torch renames it this test fails, not passes."""
    cfg = LoaderConfig(_cfg(curated), batch_size=2, workers=2, image_size=56)
    for _ in range(4):
        loader = Loader(cfg)
        batches = iter(loader)
        for _ in range(3):
            next(batches)
        workers = list(loader._iterator._workers)
        assert len(workers) == 2
        loader.close()
        assert [w.exitcode for w in workers] == [0, 0]


def test_every_rank_yields_the_same_number_of_batches(curated):
    """With a step budget, ranks whose shares differ in size still yield equally many batches."""
    counts = []
    for rank in range(2):
        cfg = LoaderConfig(_cfg(curated), batch_size=2, workers=0, image_size=56, steps=7)
        with Loader(cfg, rank=rank, world=2) as loader:
            counts.append(sum(1 for _ in loader))
    assert counts == [7, 7]


def test_corrupt_samples_are_counted_and_skipped(curated, tmp_path):
    """A pair shard damaged inside a member header: its samples are skipped and counted, the
    others still come, the stream goes on."""
    import shutil

    from curate.contract import read_manifest

    out, tokenizer = curated
    copy = tmp_path / "curated"
    shutil.copytree(out, copy)
    import pyarrow.parquet as pq

    shard = read_manifest(copy)["kinds"]["pair"]["shards"][0]
    tar = copy / shard["name"]
    second = pq.read_table(copy / shard["sidecar"], columns=["members"]).column("members")[1].as_py()
    header = second[0]["offset"] - 512  # the tar header of the second sample's first member
    data = bytearray(tar.read_bytes())
    data[header:header + 100] = bytes([0xFF]) * 100  # its name field
    tar.write_bytes(bytes(data))
    mixture = Mixture(_cfg(curated, outs=(str(copy),), weights={"pair": 1.0}), slot=0, n_slots=1)
    sequences = [next(mixture) for _ in range(6)]
    assert all(p.kind == "pair" for p in sequences)
    assert mixture.skipped()["pair/sidecar_mismatch"] >= 1  # the damaged sample, once per pass
    assert mixture.streams["pair"].stats["read"] > mixture.skipped()["pair/sidecar_mismatch"]


def test_throughput_benchmark_runs_at_toy_size(curated):
    """tools/bench/loader_throughput.py's three sides, on a few thousand tokens (mechanics only)."""
    from tools.bench.loader_throughput import ours, webdataset_side

    out, tokenizer = curated
    mine = ours(out, tokenizer, 5000, 1024, 16, 56)
    assert mine["tokens"] >= 5000 and 0 < mine["efficiency"] <= 1
    for work in (False, True):
        peer = webdataset_side(out, tokenizer, 5000, 16, 56, work=work)
        assert peer["tokens"] >= 5000 and peer["samples"] > 0


def test_weights_per_source(curated):
    """'<kind>:<output>' weighs one output's samples of a kind; a bad key fails at once."""
    out = str(curated[0])
    mixture = Mixture(_cfg(curated, weights={f"pair:{out}": 0.5, "text": 0.5}), slot=0, n_slots=1)
    sources = Counter(name for _ in range(200) for name in next(mixture).sources)
    assert set(sources) == {f"pair:{out}", "text"}
    assert abs(mixture.mixer.shares()["text"] - 0.5) < 0.02
    with pytest.raises(ValueError, match="is not one of the outputs"):
        Mixture(_cfg(curated, weights={"pair:elsewhere": 1.0}), slot=0, n_slots=1)
    with pytest.raises(ValueError, match="expected one of"):
        Mixture(_cfg(curated, weights={"pairs": 1.0}), slot=0, n_slots=1)


def test_the_loader_takes_the_towers_preprocessing():
    """Size, resize mode, interpolation, mean and std come from the tower's open_clip
    preprocess_cfg (DFN-5B's ViT-H-14-378 squashes; open_clip's default crops the shortest side);
    images travel as uint8 for the tower to normalise on the device."""
    import open_clip

    from train.data.loader import LoaderConfig
    from train.data.mixture import MixtureConfig

    mix = MixtureConfig(outs=("unused",), tokenizer="unused", seq_len=64, n_image_tokens=4)
    dfn = open_clip.get_pretrained_cfg("ViT-H-14-378-quickgelu", "dfn5b")
    cfg = LoaderConfig.for_tower(mix, {**dfn, "size": (378, 378)}, batch_size=2)
    assert (cfg.image_size, cfg.resize_mode, cfg.interpolation, cfg.uint8, cfg.batch_size) == \
        (378, "squash", "bicubic", True, 2)
    assert cfg.image_mean == tuple(dfn["mean"])
    default = {"size": (56, 56), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
               "resize_mode": "shortest"}
    assert LoaderConfig.for_tower(mix, default).resize_mode == "shortest_crop"
    with pytest.raises(ValueError, match="resize_mode 'longest' is not supported"):
        LoaderConfig.for_tower(mix, {**default, "resize_mode": "longest"})
