"""The shard writer: deterministic tars, safe members, sidecar offsets that point at the bytes,
shard cuts by count and bytes, and all three record kinds."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data

from curate.engine.commit import Storage
from curate.contract import image_digest, member_footprint, meta_value, record_schema, sample_key
from curate.recipe import OutputConfig
from curate.engine.pack import Cut, ShardWriter, cut_shards, plan_shards, sample_footprint


def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images():
    return [_jpeg(data.astronaut()[::4, ::4]), _jpeg(data.coffee()[::4, ::4]), _jpeg(data.chelsea()[::2, ::2])]


def _pair(i: int, img: bytes) -> dict:
    return {
        "id": f"src:{i}", "source": "src", "url": f"http://127.0.0.1/{i}.jpg",
        "caption": f"caption number {i}", "image": img, "image_format": "jpg",
        "image_sha256": image_digest(img), "image_nbytes": len(img), "width": 128, "height": 128,
        "extra": json.dumps({"license": "cc-by"}), "extra_types": json.dumps({"license": "string"}), "attempts": 2,
    }


def _write(tmp_path, kind, rows, shard=3):
    w = ShardWriter(Storage(), tmp_path, kind, shard, record_schema(kind))
    keys = [w.write(r) for r in rows]
    return keys, w.close()


def test_pairs_tar_is_deterministic_and_indexed(tmp_path, images):
    rows = [_pair(i, img) for i, img in enumerate(images)]
    keys, entry = _write(tmp_path / "a", "pair", rows)
    _, again = _write(tmp_path / "b", "pair", rows)
    assert entry["sha256"] == again["sha256"] and entry["sidecar_sha256"] == again["sidecar_sha256"]
    assert keys == [sample_key(3, i) for i in range(3)] == sorted(keys)
    assert entry["name"] == "pairs/00003.tar" and entry["count"] == 3

    tar_file = tmp_path / "a" / entry["name"]
    assert tar_file.stat().st_size == entry["bytes"]
    with tarfile.open(tar_file) as tar:
        members = tar.getmembers()
    assert [m.name for m in members][:3] == [f"{keys[0]}.jpg", f"{keys[0]}.json", f"{keys[0]}.txt"]
    for m in members:
        assert m.isreg() and m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644

    sidecar = pq.read_table(tmp_path / "a" / entry["sidecar"]).to_pylist()
    blob = tar_file.read_bytes()
    for row, src in zip(sidecar, rows):
        by_name = {m["name"]: m for m in row["members"]}
        jpg = by_name[f"{row['key']}.jpg"]
        assert blob[jpg["offset"]: jpg["offset"] + jpg["size"]] == src["image"]
        meta = json.loads(blob[by_name[f"{row['key']}.json"]["offset"]:][: by_name[f"{row['key']}.json"]["size"]])
        assert meta["license"] == "cc-by" and meta["id"] == src["id"] and meta["key"] == row["key"]
        assert "attempts" not in meta and "image" not in meta and "drop_reason" not in meta
        assert row["caption_chars"] == len(src["caption"]) and row["n_images"] == 1
    assert not list((tmp_path / "a").rglob("*.tmp"))


def test_doc_and_text_kinds(tmp_path, images):
    segments = [
        {"type": "text", "text": "A cup of coffee."},
        {"type": "image", "image": 0, "url": "http://127.0.0.1/c.jpg", "alt": "coffee"},
        {"type": "text", "text": "And a cat."},
        {"type": "image", "image": 1, "url": "http://127.0.0.1/k.jpg", "alt": "cat"},
    ]
    doc = {
        "id": "web:1", "source": "web", "url": "http://127.0.0.1/page",
        "segments": json.dumps(segments), "images": images[1:], "image_formats": ["jpg", "jpg"],
        "image_sha256s": [image_digest(i) for i in images[1:]],
        "image_nbytes_list": [len(i) for i in images[1:]],
        "segment_drops": json.dumps([{"segment": 5, "reason": "decode_error", "detail": "x"}]),
    }
    keys, entry = _write(tmp_path, "doc", [doc], shard=0)
    with tarfile.open(tmp_path / entry["name"]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(f"{keys[0]}.json").read())
        second = tar.extractfile(f"{keys[0]}.1.jpg").read()
    assert names == [f"{keys[0]}.json", f"{keys[0]}.0.jpg", f"{keys[0]}.1.jpg"]
    assert meta["segments"] == segments and second == images[2]
    side = pq.read_table(tmp_path / entry["sidecar"]).to_pylist()[0]
    assert (side["n_images"], side["n_segments"], side["n_text_segments"], side["segments_dropped"]) == (2, 4, 2, 1)

    text = {"id": "corpus:7", "source": "corpus", "text": "Plain text only."}
    keys, entry = _write(tmp_path, "text", [text], shard=0)
    with tarfile.open(tmp_path / entry["name"]) as tar:
        assert tar.extractfile(f"{keys[0]}.txt").read() == b"Plain text only."
    assert entry["name"] == "text/00000.tar"
    side = pq.read_table(tmp_path / entry["sidecar"]).to_pylist()[0]
    assert (side["text"], side["text_chars"]) == ("Plain text only.", 16)  # the text, as KEY.txt holds it


def test_carried_columns_are_typed_meta_columns(tmp_path, images):
    """A source's typed extra columns become `meta_<name>` sidecar columns, typed over the shard:
    one type stays, ints and floats give float64, other mixes text (JSON), no type at all null;
    KEY.json is what it was. A row whose source declares no types (a folder's or a tar's json)
    is typed from its JSON values, so a shard mixing sources holds every row's carried values."""
    carried = [  # extra, extra_types
        ({"license": "cc0", "w": 3, "p": 0.25, "nsfw": False, "mixed": 1, "none": None},
         {"license": "string", "w": "int32", "p": "float", "nsfw": "bool", "mixed": "int64", "none": None}),
        ({"license": "cc-by", "w": 4, "p": 1, "nsfw": True, "mixed": "x", "none": None},
         {"license": "string", "w": "int32", "p": "int64", "nsfw": "bool", "mixed": "string", "none": None}),
        ({"license": "untyped", "w": 5}, None),
    ]
    rows = [_pair(i, img) | {"extra": json.dumps(e), "extra_types": json.dumps(t) if t else None}
            for i, (img, (e, t)) in enumerate(zip(images, carried))]
    keys, entry = _write(tmp_path, "pair", rows, shard=0)
    table = pq.read_table(tmp_path / entry["sidecar"])
    meta = [f for f in table.schema if f.name.startswith("meta_")]
    assert [(f.name, str(f.type)) for f in meta] == [
        ("meta_license", "string"), ("meta_mixed", "string"), ("meta_none", "null"), ("meta_nsfw", "bool"),
        ("meta_p", "double"), ("meta_w", "int64")]  # int32 declared + an untyped JSON int
    assert table.select([f.name for f in meta]).to_pylist() == [
        {"meta_license": "cc0", "meta_mixed": "1", "meta_none": None, "meta_nsfw": False, "meta_p": 0.25, "meta_w": 3},
        {"meta_license": "cc-by", "meta_mixed": "x", "meta_none": None, "meta_nsfw": True, "meta_p": 1.0, "meta_w": 4},
        {**dict.fromkeys([f.name for f in meta]), "meta_license": "untyped", "meta_w": 5},
    ]
    with tarfile.open(tmp_path / entry["name"]) as tar:
        key_jsons = [json.loads(tar.extractfile(f"{key}.json").read()) for key in keys]
    assert "extra_types" not in key_jsons[1] and key_jsons[1]["mixed"] == "x" and key_jsons[1]["p"] == 1
    for key_json, row in zip(key_jsons, table.to_pylist()):  # what `mm1 verify` checks
        for f in meta:
            assert json.dumps(meta_value(key_json.get(f.name[5:]), f.type)) == json.dumps(row[f.name])


def test_unsupported_image_format_is_refused(tmp_path, images):
    row = _pair(0, images[0]) | {"image_format": "gif"}
    w = ShardWriter(Storage(), tmp_path, "pair", 0, record_schema("pair"))
    with pytest.raises(ValueError, match="image format"):
        w.write(row)
    w.abort()
    assert not list(tmp_path.rglob("*.tar*"))


def test_plan_shards_caps_count_and_bytes():
    assert plan_shards([10] * 7, max_samples=3, max_bytes=10**6) == [3, 3, 1]
    assert plan_shards([400, 400, 400, 400], max_samples=100, max_bytes=1000) == [2, 2]
    assert plan_shards([5000, 10, 10], max_samples=100, max_bytes=1000) == [1, 2]  # oversize alone
    assert plan_shards([], 3, 100) == []


def test_footprint_matches_the_written_tar(tmp_path, images):
    rows = [_pair(i, img) for i, img in enumerate(images)]
    _, entry = _write(tmp_path, "pair", rows, shard=0)
    with tarfile.open(tmp_path / entry["name"]) as tar:
        sizes = [m.size for m in tar.getmembers()]
    # members + the 1024-byte end marker, padded by tarfile to its 10240-byte record
    assert entry["bytes"] >= sample_footprint(sizes) + 1024
    assert entry["bytes"] - (sample_footprint(sizes) + 1024) < 10240
    assert member_footprint(1) == 1024 and member_footprint(512) == 1024 and member_footprint(513) == 1536


def test_cut_shards_fills_shards_across_partitions():
    """A kind's kept rows over consecutive partitions are one stream cut into full shards; the
    partition holding a shard's first sample writes it, reading on into the next partitions."""
    kinds = ["pair", "pair", "text", "pair", "pair"]
    out = OutputConfig(path="unused", shard_max_samples=4)
    footprints = {0: [1] * 7, 1: [1] * 2, 2: [1] * 3, 3: [], 4: [1] * 5}
    cuts = cut_shards(kinds, footprints, out)
    # pairs: 7 + 2 + 0 + 5 = 14 rows -> shards of 4, 4, 4, 2 (only the last short)
    assert cuts[0] == Cut(((0, 4), (1, 4)), 0, (1,))
    assert cuts[1] == Cut(((1, 4), (2, 4)), 3, (4,))  # ends shard 1, starts shard 2, filled by partition 4
    assert cuts[3] == Cut()
    assert cuts[4] == Cut(((2, 4), (3, 2)), 1, ())
    assert cuts[2] == Cut(((0, 3),), 0, ())  # each kind numbers its own shards
    # a retry round numbers on after the kind's last shard, over the partitions it packs
    again = cut_shards(kinds, {1: [1] * 2, 4: [1] * 5}, out, after={"pair": 10})
    assert again == {1: Cut(((10, 4),), 0, (4,)), 4: Cut(((10, 4), (11, 3)), 2, ())}
    # the byte cap still cuts (an oversize sample alone), across partitions too
    tight = OutputConfig(path="unused", shard_max_samples=4, shard_max_bytes=1024)
    assert cut_shards(kinds, {0: [600, 600], 1: [300, 2000]}, tight) == {
        0: Cut(((0, 1), (1, 2)), 0, (1,)), 1: Cut(((1, 2), (2, 1)), 1, ())}


def test_cut_shards_with_counts_asks_each_partition_once_in_order():
    """With `kept` (the counts), `cut_shards` asks for each partition's footprints once, kind by
    kind in partition order, and cuts as from the lists: the driver reads them back from the plan
    markers a batch at a time (`driver.PlanFootprints`) instead of holding every kept row's."""
    kinds = ["pair", "text", "pair", "pair", "text", "pair"]
    footprints = {0: [1] * 7, 1: [1] * 3, 2: [1] * 2, 3: [], 4: [1] * 6, 5: [1] * 5}
    asked: list[int] = []

    class Recorded(dict):
        def __getitem__(self, p):
            asked.append(p)
            return dict.__getitem__(self, p)

    out = OutputConfig(path="unused", shard_max_samples=4)
    cuts = cut_shards(kinds, Recorded(footprints), out, kept={p: len(f) for p, f in footprints.items()})
    assert cuts == cut_shards(kinds, footprints, out)
    assert asked == [0, 2, 3, 5, 1, 4]
