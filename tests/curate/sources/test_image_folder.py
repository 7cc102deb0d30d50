import csv
import gzip
import hashlib
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

import curate.sources.image_folder as image_folder
from curate.sources import build_source
from curate.sources.image_folder import ImageFolderConfig

PICTURES = [skdata.astronaut, skdata.camera, skdata.coffee, skdata.chelsea]
FORMATS = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("JPEG", "JPEG")]


def save_picture(path: Path, i: int) -> None:
    """Sample picture `i` (cycling through scikit-image's photos), small, in the format of `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(PICTURES[i % 4]()).convert("RGB")
    img.thumbnail((48 + 4 * i, 48 + 4 * i))
    img.save(path, format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[path.suffix[1:].lower()])


def make_folder(root: Path, n: int = 10) -> list[str]:
    """`n` images with sidecar captions, a few in a subfolder; returns their relative paths, sorted."""
    rels = []
    for i in range(n):
        ext = FORMATS[i % 4][0]
        rel = f"sub/{i:02d}.{ext}" if i % 3 == 0 else f"{i:02d}.{ext}"
        save_picture(root / rel, i)
        (root / rel).with_suffix(".txt").write_text(f"photo number {i}\n")
        rels.append(rel)
    (root / "notes.md").write_text("not an image")
    (root / ".hidden.jpg").write_bytes((root / rels[0]).read_bytes())
    return sorted(rels)


def source(root: Path, **kw):
    return build_source(ImageFolderConfig(name="photos", path=str(root), **kw))


def read_all(src, batch_size: int = 64) -> list[dict]:
    return [row for p in src.partitions() for t in src.read(p, batch_size) for row in t.to_pylist()]


def test_sidecar_partitions_are_deterministic_and_cover_every_image_once(tmp_path):
    rels = make_folder(tmp_path)
    src = source(tmp_path, files_per_partition=3)
    parts = src.partitions()
    assert parts == src.partitions()
    assert [p.index for p in parts] == [0, 1, 2, 3]
    assert [len(p.payload["files"]) for p in parts] == [3, 3, 3, 1]
    json.dumps([p.payload for p in parts])  # partitions travel to workers as JSON
    rows = read_all(src)
    assert [r["id"] for r in rows] == [f"photos:{rel}" for rel in rels]
    for row, rel in zip(rows, rels):
        data = (tmp_path / rel).read_bytes()
        assert row["drop_reason"] is None and row["source"] == "photos" and row["url"] is None
        assert row["image"] == data and row["image_nbytes"] == len(data)
        assert row["image_sha256"] == hashlib.sha256(data).hexdigest()
        assert row["image_format"] == {"JPEG": "jpg"}.get(rel.rsplit(".")[1], rel.rsplit(".")[1])
        assert row["caption"] == f"photo number {int(Path(rel).stem)}"
        assert Image.open(io.BytesIO(row["image"])).size[0] > 0  # bytes stay encoded, intact


def test_batches_respect_batch_size(tmp_path):
    make_folder(tmp_path)
    src = source(tmp_path, files_per_partition=7)
    sizes = [t.num_rows for p in src.partitions() for t in src.read(p, batch_size=2)]
    assert sizes == [2, 2, 2, 1, 2, 1]
    assert all(t.schema == src.schema() for p in src.partitions() for t in src.read(p, 2))


def test_sidecar_missing_or_empty_caption_and_not_recursive(tmp_path):
    rels = make_folder(tmp_path, n=4)
    (tmp_path / "01.png").with_suffix(".txt").unlink()
    (tmp_path / "02.webp").with_suffix(".txt").write_text("  \n")
    rows = {r["id"]: r for r in read_all(source(tmp_path))}
    assert len(rows) == 4
    assert rows["photos:01.png"]["drop_reason"] == "no_caption"
    assert rows["photos:01.png"]["drop_stage"] == "source"
    assert rows["photos:02.webp"]["drop_reason"] == "no_caption"
    assert rows["photos:sub/00.jpg"]["drop_reason"] is None
    flat = {r["id"] for r in read_all(source(tmp_path, recursive=False))}
    assert flat == {f"photos:{rel}" for rel in rels if "/" not in rel}


def write_mapping(root: Path, fmt: str, entries: list[dict]) -> str:
    name = f"captions.{fmt}"
    path = root / name
    if fmt.startswith("jsonl"):
        text = "".join(json.dumps(e) + "\n" for e in entries).encode()
        path.write_bytes(gzip.compress(text) if fmt.endswith(".gz") else text)
    elif fmt == "csv":
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["path", "text", "license"])
            writer.writeheader()
            writer.writerows(entries)
    else:
        pq.write_table(pa.Table.from_pylist(entries), path, row_group_size=2)
    return name


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "jsonl.gz"])
def test_mapping_formats(tmp_path, fmt):
    rels = make_folder(tmp_path, n=6)
    named = rels[::-1][:5]  # one image left out: the mapping is the list of inputs
    entries = [{"path": rel, "text": f"mapped {rel}", "license": "cc-by"} for rel in named]
    mapping = write_mapping(tmp_path, fmt, entries)
    src = source(tmp_path, captions=mapping, file_column="path", caption_column="text", files_per_partition=2)
    assert len(src.partitions()) == 3
    rows = read_all(src, batch_size=1)
    assert [r["id"] for r in rows] == [f"photos:{rel}" for rel in named]
    for row, rel in zip(rows, named):
        assert row["drop_reason"] is None
        assert row["caption"] == f"mapped {rel}"
        assert row["image"] == (tmp_path / rel).read_bytes()
        assert json.loads(row["extra"]) == {"license": "cc-by"}


def test_malformed_mapping_row_is_one_dropped_row(tmp_path):
    make_folder(tmp_path, n=3)
    (tmp_path / "map.jsonl").write_text(
        '{"file": "01.png", "caption": "one"}\n{"file": "02.webp", "caption": \n'
        '{"file": "notes.md", "caption": "not an image"}\n{"file": "sub/00.jpg", "caption": "zero"}\n'
    )
    rows = read_all(source(tmp_path, captions="map.jsonl", files_per_partition=2))
    assert [r["id"] for r in rows] == ["photos:01.png", "photos:map.jsonl#1", "photos:notes.md", "photos:sub/00.jpg"]
    assert [r["drop_reason"] for r in rows] == [None, "malformed_row", "malformed_row", None]
    assert "record 1" in rows[1]["drop_detail"] and "bad JSON" in rows[1]["drop_detail"]
    assert rows[0]["extra"] is None


def test_mapping_never_reads_outside_the_folder(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    make_folder(root, n=2)
    save_picture(tmp_path / "secret.jpg", 3)
    os.symlink(tmp_path / "secret.jpg", root / "link.jpg")
    entries = [
        {"file": "../etc/passwd", "caption": "escape"},
        {"file": "../secret.jpg", "caption": "escape"},
        {"file": str(tmp_path / "secret.jpg"), "caption": "absolute"},
        {"file": "link.jpg", "caption": "symlink out"},
        {"file": "sub/../01.png", "caption": "stays inside"},
        {"file": "gone.jpg", "caption": "missing"},
    ]
    (root / "map.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    opened = []
    real_open = open
    monkeypatch.setattr(image_folder, "open", lambda p, *a, **k: opened.append(Path(p)) or real_open(p, *a, **k),
                        raising=False)
    rows = read_all(source(root, captions="map.jsonl"))
    assert [r["drop_reason"] for r in rows] == ["missing_image"] * 4 + [None, "missing_image"]
    assert rows[0]["id"] == "photos:../etc/passwd" and rows[4]["id"] == "photos:01.png"
    assert all(root.resolve() in p.resolve().parents for p in opened) and opened
    secret = (tmp_path / "secret.jpg").read_bytes()
    assert all(r["image"] != secret for r in rows)


def test_duplicate_mapping_entries_get_unique_ids_across_partitions(tmp_path):
    make_folder(tmp_path, n=3)
    entries = [{"file": "01.png", "caption": "a"}, {"file": "02.webp", "caption": "b"},
               {"file": "./01.png", "caption": "c"}, {"file": "01.png", "caption": "d"}]
    (tmp_path / "map.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    rows = read_all(source(tmp_path, captions="map.jsonl", files_per_partition=2))
    assert [r["id"] for r in rows] == ["photos:01.png", "photos:02.webp", "photos:01.png#2", "photos:01.png#3"]
    assert all(r["drop_reason"] is None for r in rows)


def test_too_large_is_checked_before_reading(tmp_path, monkeypatch):
    make_folder(tmp_path, n=2)
    opened = []
    real_open = open
    monkeypatch.setattr(image_folder, "open", lambda p, *a, **k: opened.append(Path(p).name) or real_open(p, *a, **k),
                        raising=False)
    rows = read_all(source(tmp_path, max_file_bytes=100))
    assert [r["drop_reason"] for r in rows] == ["too_large", "too_large"]
    assert "max_file_bytes 100" in rows[0]["drop_detail"]
    assert not any(name.endswith((".png", ".jpg")) for name in opened)


def test_fingerprints_change_with_the_files(tmp_path):
    rels = make_folder(tmp_path)
    src = source(tmp_path, files_per_partition=3)
    before = [p.fingerprint for p in src.partitions()]
    target = tmp_path / rels[4]  # in partition 1
    save_picture(target, 2)
    os.utime(target, ns=(1, 1))
    after = [p.fingerprint for p in src.partitions()]
    assert [b == a for b, a in zip(before, after)] == [True, False, True, True]

    (tmp_path / "map.jsonl").write_text("".join(json.dumps({"file": r, "caption": r}) + "\n" for r in rels))
    mapped = source(tmp_path, captions="map.jsonl", files_per_partition=3)
    before = [p.fingerprint for p in mapped.partitions()]
    os.utime(target, ns=(2, 2))
    after = [p.fingerprint for p in mapped.partitions()]
    assert [b == a for b, a in zip(before, after)] == [True, False, True, True]
    with open(tmp_path / "map.jsonl", "a") as fh:
        fh.write(json.dumps({"file": rels[0], "caption": "more"}) + "\n")
    assert not set(after) & {p.fingerprint for p in mapped.partitions()}


def test_config_is_strict():
    with pytest.raises(ValueError):
        ImageFolderConfig(name="x", path="/tmp", captionz="sidecar")
    with pytest.raises(ValueError):
        ImageFolderConfig(name="x", path="/tmp", files_per_partition=0)
