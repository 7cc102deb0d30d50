"""The shard reader on a small real curated output: shards written by curate's own ShardWriter
(2 pair shards, 1 doc shard, 1 text shard) plus a manifest, as tests/tools/conftest.py does."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from curate.engine.commit import Storage
from curate.contract import FORMAT_VERSION, MANIFEST, image_digest, read_sidecars, record_schema
from curate.engine.pack import ShardWriter
from train.data.shards import (
    MISSING_NAMED, CorruptSample, SampleRef, SampleStream, ShardStream, assign, list_samples, list_shards,
    read_sample,
)

PAIR_SHARDS = [4, 3]  # samples per pair shard
N_DOCS, N_TEXTS = 3, 4


def _image(seed: int, size: tuple[int, int], fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format={"jpg": "JPEG", "png": "PNG"}[fmt])
    return buf.getvalue()


def build_output(out: Path) -> Path:
    """A finished curation output with all three kinds; returns `out`."""
    storage = Storage()
    kinds: dict[str, list[dict[str, Any]]] = {"pair": [], "doc": [], "text": []}
    n = 0
    for shard, count in enumerate(PAIR_SHARDS):
        writer = ShardWriter(storage, out, "pair", shard, record_schema("pair"))
        for _ in range(count):
            fmt = "png" if n % 3 == 2 else "jpg"
            image = _image(n, (24 + n, 16 + n), fmt)
            writer.write({"id": f"src:{n}", "source": "src", "url": f"https://img.example.com/{n}.{fmt}",
                          "attempts": 1, "caption": f"caption number {n}", "image": image,
                          "image_format": fmt,
                          "image_sha256": image_digest(image), "image_nbytes": len(image),
                          "width": 24 + n, "height": 16 + n})
            n += 1
        kinds["pair"].append(writer.close())

    writer = ShardWriter(storage, out, "doc", 0, record_schema("doc"))
    for d in range(N_DOCS):
        images = [_image(100 + d * 10 + i, (20, 20 + i), "jpg" if i % 2 == 0 else "png") for i in range(d)]
        segments = [{"type": "text", "text": f"doc {d} opens."}]
        for i in range(d):
            segments += [{"type": "image", "image": i}, {"type": "text", "text": f"after image {i}"}]
        writer.write({"id": f"warc:{d}", "source": "warc", "url": f"https://news.example.com/{d}",
                      "attempts": 1, "segments": json.dumps(segments), "images": images,
                      "image_formats": ["jpg" if i % 2 == 0 else "png" for i in range(d)],
                      "image_sha256s": [image_digest(b) for b in images],
                      "image_nbytes_list": [len(b) for b in images], "segment_drops": "[]"})
    kinds["doc"].append(writer.close())

    writer = ShardWriter(storage, out, "text", 0, record_schema("text"))
    for t in range(N_TEXTS):
        writer.write({"id": f"corpus:{t}", "source": "corpus", "attempts": 1,
                      "text": f"text number {t} " * (t + 1)})
    kinds["text"].append(writer.close())

    manifest = {
        "format_version": FORMAT_VERSION, "name": "shards-test", "code_version": "test", "recipe": {},
        "recipe_hash": "0" * 16, "input_fingerprint": "f" * 16,
        "kinds": {k: {"shards": s, "count": sum(x["count"] for x in s), "bytes": sum(x["bytes"] for x in s)}
                  for k, s in kinds.items()},
        "ledger": [], "counts": {}, "drops": {}, "global": {},
    }
    storage.write_json(out / MANIFEST, manifest)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per module; tests that damage it work on `output`, a fresh copy."""
    return build_output(tmp_path_factory.mktemp("shards") / "out")


@pytest.fixture
def output(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "out"))


def _edit_manifest(out: Path, change) -> None:
    manifest = json.loads((out / MANIFEST).read_text())
    change(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))


def _stock_webdataset(tar: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, as the stock webdataset reader (no decoding) sees the tar."""
    samples = {}
    for sample in wds.WebDataset(str(tar), shardshuffle=False):
        samples[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return samples


# ---------------------------------------------------------------------------------------------
# list_samples
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pair", "doc", "text"])
def test_list_samples_matches_the_sidecars(built: Path, kind: str) -> None:
    table = read_sidecars(built, kind, columns=["key", "members"]).to_pylist()
    refs = list_samples([str(built)], kind)
    assert [r.key for r in refs] == [row["key"] for row in table]
    assert [r.key for r in refs] == sorted(r.key for r in refs)  # shard-major keys: shard then key order
    for ref, row in zip(refs, table):
        assert ref.kind == kind and ref.out == str(built)
        assert ref.members == tuple((m["name"], m["offset"], m["size"]) for m in row["members"])
    manifest = json.loads((built / MANIFEST).read_text())
    shards = [s["name"] for s in manifest["kinds"][kind]["shards"]]
    assert [r.shard for r in refs] == [s for s in shards for _ in range(
        next(x["count"] for x in manifest["kinds"][kind]["shards"] if x["name"] == s))]
    # JSON round trip (what the mixture's state stores)
    assert [SampleRef.from_dict(json.loads(json.dumps(asdict(r)))) for r in refs] == refs


def test_list_samples_skips_withdrawn_keys_and_keeps_output_order(output: Path, built: Path) -> None:
    pairs = list_samples([str(output)], "pair")
    gone = [pairs[1], pairs[5]]  # one in each pair shard

    def withdraw(m: dict[str, Any]) -> None:
        m["kinds"]["pair"]["withdrawn"] = [{"shard": r.shard, "key": r.key, "id": f"src:{i}"}
                                           for i, r in enumerate(gone)]
        m["kinds"]["text"]["withdrawn"] = [{"shard": "text/00000.tar", "key": "0000000002", "id": "corpus:2"}]

    _edit_manifest(output, withdraw)
    after = list_samples([str(output)], "pair")
    assert after == [r for r in pairs if r not in gone]
    assert [r.key for r in list_samples([str(output)], "text")] == ["0000000000", "0000000001", "0000000003"]
    # several outputs: one after the other, each in its own order
    both = list_samples([str(built), str(output)], "pair")
    assert [(r.out, r.key) for r in both] == [(str(built), r.key) for r in pairs] + [
        (str(output), r.key) for r in after]


def test_list_samples_refuses_a_tar_outside_the_output(output: Path) -> None:
    _edit_manifest(output, lambda m: m["kinds"]["text"]["shards"][0].update(name="../elsewhere.tar"))
    with pytest.raises(ValueError, match="outside the output"):
        list_samples([str(output)], "text")


# ---------------------------------------------------------------------------------------------
# list_shards: a tar or sidecar the manifest lists but the output lacks fails at list time
# ---------------------------------------------------------------------------------------------


def test_list_shards_names_a_missing_tar_and_a_missing_sidecar(output: Path) -> None:
    (output / "pairs" / "00000.tar").unlink()
    (output / "pairs" / "00001.parquet").unlink()
    for out in (str(output), output.resolve().as_uri()):  # a folder; the same folder as a file:// URL
        with pytest.raises(FileNotFoundError) as err:
            list_shards([out], "pair")
        message = str(err.value)
        assert message.startswith(f"{out}: 2 of the 4 pair shard files")
        assert f"{out}/pairs/00000.tar," in message and message.count(f"{out}/pairs/00001.parquet") == 1
        assert f"{out}/pairs/00001.tar" not in message and "more" not in message
    assert sum(s.count for s in list_shards([str(output)], "text")[0]) == N_TEXTS  # other kinds still list
    shutil.rmtree(output / "docs")
    with pytest.raises(FileNotFoundError, match=r"2 of the 2 doc shard files.*docs/00000\.tar, .*docs/00000\.parquet"):
        list_shards([str(output)], "doc")


def test_list_shards_names_the_first_missing_files_and_counts_the_rest(output: Path) -> None:
    extra = [{"name": f"text/{k:05d}.tar", "sidecar": f"text/{k:05d}.parquet", "count": 1, "bytes": 1}
             for k in range(100, 107)]
    _edit_manifest(output, lambda m: m["kinds"]["text"]["shards"].extend(extra))
    with pytest.raises(FileNotFoundError) as err:
        list_shards([str(output)], "text")
    message = str(err.value)
    assert "14 of the 16 text shard files" in message and f"and {14 - MISSING_NAMED} more" in message
    assert message.count(str(output / "text")) == MISSING_NAMED


def test_a_shard_lost_after_listing_still_fails_with_its_path_when_opened(output: Path) -> None:
    listed = list_shards([str(output)], "pair")
    (output / "pairs" / "00000.parquet").unlink()
    (output / "pairs" / "00001.tar").unlink()
    for j, missing in ((0, "pairs/00000.parquet: sidecar of pairs/00000.tar"), (1, "pairs/00001.tar: shard listed")):
        stream = ShardStream(*listed, seed=0, slot=j, n_slots=2, shuffle=False)
        with pytest.raises(FileNotFoundError, match=missing):
            next(stream)


# ---------------------------------------------------------------------------------------------
# assign
# ---------------------------------------------------------------------------------------------


def test_assign_covers_every_sample_once_over_ranks_and_workers(built: Path) -> None:
    real = [r for kind in ("pair", "doc", "text") for r in list_samples([str(built)], kind)]
    # plus a larger list of refs (values, not files) so the split is not trivially small
    many = [SampleRef("text", "o", "text/00000.tar", f"{i:010d}", ()) for i in range(103)]
    ranks, workers = 2, 2
    for refs in (real, many):
        for epoch in (0, 1):
            slots = [assign(refs, seed=7, epoch=epoch, slot=rank * workers + worker, n_slots=ranks * workers)
                     for rank in range(ranks) for worker in range(workers)]
            flat = [r for s in slots for r in s]
            assert sorted(flat, key=lambda r: (r.kind, r.key)) == sorted(refs, key=lambda r: (r.kind, r.key))
            assert len(flat) == len(set(flat))
            assert max(map(len, slots)) - min(map(len, slots)) <= 1
        # the same on every rank: a pure function of (seed, epoch)
        assert assign(refs, seed=7, epoch=0, slot=1, n_slots=4) == assign(list(refs), seed=7, epoch=0, slot=1,
                                                                        n_slots=4)
    assert assign(many, seed=7, epoch=0, slot=0, n_slots=4) != assign(many, seed=7, epoch=1, slot=0, n_slots=4)
    assert assign(many, seed=7, epoch=0, slot=0, n_slots=4) != assign(many, seed=8, epoch=0, slot=0, n_slots=4)
    assert assign(many, seed=7, epoch=3, slot=2, n_slots=4, shuffle=False) == many[2::4]
    with pytest.raises(ValueError):
        assign(many, seed=0, epoch=0, slot=4, n_slots=4)


# ---------------------------------------------------------------------------------------------
# read_sample
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pair", "doc", "text"])
def test_read_sample_returns_what_stock_webdataset_reads(built: Path, kind: str) -> None:
    refs = list_samples([str(built)], kind)
    stock: dict[str, dict[str, bytes]] = {}
    for shard in sorted({r.shard for r in refs}):
        stock.update(_stock_webdataset(built / shard))
    assert sorted(stock) == [r.key for r in refs]
    for ref in refs:
        assert read_sample(ref) == stock[ref.key]
    if kind == "doc":  # the doc with two images carries KEY.0.jpg and KEY.1.png
        assert set(read_sample(refs[2])) == {"json", "0.jpg", "1.png"}


def test_read_sample_through_an_fsspec_url(built: Path) -> None:
    url = built.resolve().as_uri()  # file:///...: the fsspec (range read) path, no network
    for kind in ("pair", "doc"):
        local, remote = list_samples([str(built)], kind), list_samples([url], kind)
        assert [r.key for r in remote] == [r.key for r in local] and remote[0].out == url
        for a, b in zip(local, remote):
            assert read_sample(b) == read_sample(a)


def test_read_sample_returns_only_image_text_and_json_members(tmp_path: Path) -> None:
    members = {"k1.jpg": b"jpeg", "k1.pth": b"\x80\x04pickle", "k1.txt": b"hi", "k1.2.webp": b"webp",
               "k1.pyd": b"pickle", "k1.json": b"{}"}
    with tarfile.open(tmp_path / "t.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "t.tar") as tar:
        index = tuple((m.name, m.offset_data, m.size) for m in tar.getmembers())
    ref = SampleRef("pair", str(tmp_path), "t.tar", "k1", index)
    assert read_sample(ref) == {"jpg": b"jpeg", "txt": b"hi", "2.webp": b"webp", "json": b"{}"}


# ---------------------------------------------------------------------------------------------
# corruption
# ---------------------------------------------------------------------------------------------


def _overwrite(path: Path, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def test_sidecar_that_disagrees_with_the_tar_is_corrupt(built: Path) -> None:
    ref = list_samples([str(built)], "text")[1]
    (name, offset, size), *rest = ref.members
    with pytest.raises(CorruptSample, match="names"):  # points at the next member's header
        read_sample(replace(ref, members=((name, offset + 1024, size), *rest)))
    with pytest.raises(CorruptSample, match="size"):
        read_sample(replace(ref, members=((name, offset, size - 1), *rest)))
    with pytest.raises(CorruptSample, match="not a member of key"):
        read_sample(replace(ref, key="0000000000"))
    with pytest.raises(CorruptSample, match="missing"):
        read_sample(replace(ref, shard="text/00042.tar"))


def test_damaged_headers_and_a_truncated_tar_are_counted_and_skipped(output: Path, caplog) -> None:
    pairs = list_samples([str(output)], "pair")
    bad_name, bad_mtime = pairs[1], pairs[2]
    tar = output / bad_name.shard
    _overwrite(tar, bad_name.members[1][1] - 512, b"XXXX")  # inside the name field of KEY.json's header
    _overwrite(tar, bad_mtime.members[0][1] - 512 + 136, b"77777")  # the mtime field: checksum no longer holds
    with pytest.raises(CorruptSample, match="names"):
        read_sample(bad_name)
    with pytest.raises(CorruptSample, match="checksum"):
        read_sample(bad_mtime)

    # truncate the second pair shard in the middle of its last sample's image
    last = pairs[-1]
    image_offset, image_size = last.members[0][1], last.members[0][2]
    with open(output / last.shard, "r+b") as f:
        f.truncate(image_offset + image_size // 2)
    with pytest.raises(CorruptSample, match="cut short"):
        read_sample(last)

    stream = SampleStream(pairs, seed=0, slot=0, n_slots=1, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="train.data.shards"):
        got = [s.ref.key for s in stream]
    assert got == [r.key for r in pairs if r not in (bad_name, bad_mtime, last)]
    assert stream.stats == {"read": len(pairs) - 3, "corrupt": 3}
    logged = caplog.text
    for ref in (bad_name, bad_mtime, last):
        assert ref.key in logged and ref.shard in logged


def test_a_stream_of_only_corrupt_samples_stops_instead_of_spinning(output: Path) -> None:
    texts = list_samples([str(output)], "text")
    (output / texts[0].shard).write_bytes(b"")
    stream = SampleStream(texts, seed=0, slot=0, n_slots=1, repeat=True)
    assert list(stream) == []
    assert stream.stats["corrupt"] == len(texts)


# ---------------------------------------------------------------------------------------------
# SampleStream: passes, epochs, exact resume
# ---------------------------------------------------------------------------------------------


def test_stream_one_pass_then_epochs_with_new_permutations(built: Path) -> None:
    refs = list_samples([str(built)], "pair") + list_samples([str(built)], "text")
    once = SampleStream(refs, seed=3, slot=1, n_slots=2)
    assert [s.ref for s in once] == assign(refs, seed=3, epoch=0, slot=1, n_slots=2)
    assert next(once, None) is None and once.state_dict()["epoch"] == 0

    looping = SampleStream(refs, seed=3, slot=1, n_slots=2, repeat=True)
    per_epoch = looping.per_epoch
    got = [next(looping).ref for _ in range(3 * per_epoch)]
    assert got == [r for e in range(3) for r in assign(refs, seed=3, epoch=e, slot=1, n_slots=2)]
    assert looping.state_dict() == {"epoch": 2, "cursor": per_epoch,
                                    "stats": {"read": 3 * per_epoch, "corrupt": 0}}


@pytest.mark.parametrize("stop_after", [0, 2, 5, 6, 11])
def test_restored_stream_continues_exactly(built: Path, stop_after: int) -> None:
    refs = [r for kind in ("pair", "doc", "text") for r in list_samples([str(built)], kind)]
    first = SampleStream(refs, seed=11, slot=0, n_slots=2, repeat=True)  # 14 refs: 7 a pass
    for _ in range(stop_after):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    expected = [next(first) for _ in range(10)]  # crosses at least one epoch boundary

    second = SampleStream(refs, seed=11, slot=0, n_slots=2, repeat=True)
    second.load_state_dict(state)
    assert [next(second) for _ in range(10)] == expected
    assert second.state_dict() == first.state_dict()


def test_restoring_a_state_from_another_layout_fails_clearly(built: Path) -> None:
    refs = list_samples([str(built)], "pair")
    stream = SampleStream(refs, seed=0, slot=0, n_slots=4)
    with pytest.raises(ValueError, match="cursor"):
        stream.load_state_dict({"epoch": 0, "cursor": len(refs), "stats": {}})
