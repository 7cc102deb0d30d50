"""The obelics source on OBELICS-shaped parquet files, and a stage-less curation run of it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.contract import read_ledger, read_sidecars, shard_urls
from curate.recipe import parse_recipe
from curate.sources import build_source
from curate.sources.obelics import ObelicsConfig
from tools.verify import verify

# HuggingFaceM4/OBELICS's column types: two aligned lists, two JSON strings
SCHEMA = pa.schema([
    pa.field("images", pa.list_(pa.string())),
    pa.field("metadata", pa.string()),
    pa.field("general_metadata", pa.string()),
    pa.field("texts", pa.list_(pa.string())),
])


def image_meta(src: str, alt: str | None = None) -> dict:
    meta = {"document_url": "https://news.example/a", "unformatted_src": src.rsplit("/", 1)[1], "src": src}
    if alt:
        meta["alt_text"] = alt
    return meta


def document(url: str, items: list[tuple[str, str] | tuple[str, str, str | None]]) -> dict:
    """An OBELICS row from ("text", t) and ("image", src, alt) items."""
    texts, images, meta = [], [], []
    for item in items:
        if item[0] == "text":
            texts.append(item[1])
            images.append(None)
            meta.append(None)
        else:
            texts.append(None)
            images.append(item[1])
            meta.append(image_meta(item[1], item[2]))
    general = {"url": url, "warc_filename": "crawl-data/CC-MAIN-2023/x.warc.gz", "warc_record_offset": 123,
               "warc_record_length": 4567}
    return {"images": images, "metadata": json.dumps(meta), "general_metadata": json.dumps(general), "texts": texts}


GOOD = [
    document("https://news.example/a", [("image", "https://img.example/1.jpg", "A red bus"),
                                        ("text", "A bus drove through town."),
                                        ("image", "https://img.example/2.jpg", None),
                                        ("text", "The end.")]),
    document("https://blog.example/b", [("text", "Only text here.")]),
    document("https://photos.example/c", [("image", "https://img.example/3.png", "a cat")]),
]


def bad_rows() -> list[dict]:
    good = GOOD[0]
    return [
        {**good, "texts": good["texts"][:-1]},  # lists of different lengths
        {**good, "texts": [None, *good["texts"][1:]], "images": [None, *good["images"][1:]]},  # neither at 0
        {**good, "texts": ["both", *good["texts"][1:]]},  # a text and an image at 0
        {**good, "texts": None},  # not a list
        {**good, "metadata": "{not json"},
        {**good, "metadata": json.dumps([None])},  # metadata of another length
        {**good, "general_metadata": json.dumps(["a list"])},
        {**good, "texts": ["", "   ", None, ""], "images": [None, None, None, None]},  # [2]: neither
        {**good, "texts": ["", "  "], "images": ["", None], "metadata": None},  # nothing in it
    ]


def write(path: Path, rows: list[dict], row_group_size: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, row_group_size=row_group_size)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write(tmp_path / "docs" / "train-00000.parquet", GOOD + bad_rows())
    write(tmp_path / "docs" / "train-00001.parquet", GOOD[:1])
    return tmp_path / "docs"


def source(path, **kw):
    return build_source(ObelicsConfig(name="ob", path=str(path), **kw))


def rows(src, batch_size: int = 4) -> list[dict]:
    return [r for p in src.partitions() for t in src.read(p, batch_size) for r in t.to_pylist()]


def test_documents_become_segments(folder):
    got = rows(source(folder, rows_per_partition=5))
    expected = [f"ob:train-00000.parquet#{i}" for i in range(12)] + ["ob:train-00001.parquet#0"]
    assert [r["id"] for r in got] == expected
    first = got[0]
    assert first["drop_reason"] is None and first["html"] is None and first["images"] is None
    assert first["url"] == "https://news.example/a"
    assert json.loads(first["segments"]) == [
        {"type": "image", "url": "https://img.example/1.jpg", "alt": "A red bus"},
        {"type": "text", "text": "A bus drove through town."},
        {"type": "image", "url": "https://img.example/2.jpg", "alt": None},
        {"type": "text", "text": "The end."},
    ]
    assert json.loads(first["extra"]) == {"warc_filename": "crawl-data/CC-MAIN-2023/x.warc.gz",
                                          "warc_record_offset": 123, "warc_record_length": 4567}
    assert json.loads(got[2]["segments"]) == [{"type": "image", "url": "https://img.example/3.png", "alt": "a cat"}]


def test_malformed_rows_are_dropped_with_a_reason(folder):
    got = rows(source(folder))
    reasons = [(r["drop_reason"], r["drop_detail"]) for r in got[3:12]]
    assert [r for r, _ in reasons] == ["malformed_row"] * 8 + ["no_text"]
    details = [d for _, d in reasons]
    assert "4 texts but 3 images" in details[0] or "3 texts but 4 images" in details[0]
    assert "neither" in details[1] and "both" in details[2] and "not a list" in details[3]
    assert "not JSON" in details[4] and "1 entries for 4 positions" in details[5]
    assert "not a dict" in details[6] and "position 2 holds neither" in details[7]
    assert all(r["drop_stage"] == "source" and r["segments"] is None for r in got[3:12])
    assert got[3]["url"] == "https://news.example/a"  # a dropped row keeps its url for the ledger


def test_empty_image_strings_mark_text_positions(tmp_path):
    """OBELICS's own extractor writes "" instead of null for the image of a text position."""
    row = {"images": ["", "https://img.example/x.webp"], "texts": ["Hello", None],
           "metadata": json.dumps([None, {"alt_text": "  "}]),
           "general_metadata": json.dumps({"url": "https://x.example/"})}
    got = rows(source(write(tmp_path / "e.parquet", [row])))
    assert json.loads(got[0]["segments"]) == [{"type": "text", "text": "Hello"},
                                              {"type": "image", "url": "https://img.example/x.webp", "alt": None}]


def test_deterministic_and_fingerprinted(folder):
    src = source(folder, rows_per_partition=4)
    parts = src.partitions()
    assert [p.payload["span"]["count"] for p in parts] == [4, 4, 4, 1]
    assert parts == source(folder, rows_per_partition=4).partitions()
    once = [t for p in parts for t in src.read(p, 3)]
    twice = [t for p in parts for t in src.read(p, 3)]
    assert len(once) == len(twice) and all(a.equals(b) for a, b in zip(once, twice))
    write(folder / "train-00001.parquet", GOOD[:2])
    changed = source(folder, rows_per_partition=4).partitions()
    assert [p.fingerprint for p in parts[:3]] == [p.fingerprint for p in changed[:3]]
    assert parts[3].fingerprint != changed[3].fingerprint


def test_missing_columns_fail_at_planning(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["a"]}), path)
    with pytest.raises(ValueError, match="no column 'texts'"):
        source(path).partitions()


def test_curation_run_without_stages(tmp_path, folder, output_checks, shared_cluster):
    """Stage-less curation: every row once in the ledger; the stock webdataset library reads the
    doc shards (KEY.json with the segments) and the sidecars count segments. With no download
    stage, image segments are never fetched: pack removes them (`image_not_fetched`, recorded in
    the doc) and drops a doc that had only images."""
    import webdataset as wds

    out = tmp_path / "out"
    recipe = parse_recipe({
        "name": "obelics-only",
        "sources": [{"kind": "obelics", "name": "ob", "path": str(folder), "rows_per_partition": 5}],
        "output": {"path": str(out), "shard_max_samples": 2},
        "cluster": {"n_workers": 1, "dashboard": False},
        "execution": {"batch_size": 2},
    })
    manifest = shared_cluster.run(recipe)
    output_checks.check_ledger_invariant(out)
    assert manifest["counts"] == {"partitions": 4, "inputs": 13, "kept": 3, "dropped": 10}
    ledger = read_ledger(out).to_pylist()
    dropped = Counter((r["stage"], r["drop_reason"]) for r in ledger if r["outcome"] == "dropped")
    assert dropped == {("source", "malformed_row"): 8, ("source", "no_text"): 1, ("pack", "empty_document"): 1}
    kept = {r["id"]: r for r in ledger if r["outcome"] == "kept"}
    assert (kept["ob:train-00000.parquet#0"]["segments_total"], kept["ob:train-00000.parquet#0"]["segments_dropped"]) \
        == (4, 2)
    assert kept["ob:train-00000.parquet#0"]["domain"] == "news.example"
    samples = list(wds.WebDataset(shard_urls(out, "doc"), shardshuffle=False).decode())
    assert len(samples) == 3
    by_id = {s["json"]["id"]: s for s in samples}
    assert set(by_id) == set(kept)
    first = by_id["ob:train-00000.parquet#0"]["json"]
    assert first["segments"] == [{"type": "text", "text": "A bus drove through town."}, {"type": "text", "text": "The end."}]
    assert first["url"] == "https://news.example/a" and first["warc_record_offset"] == 123
    sidecars = read_sidecars(out, "doc", columns=["id", "n_segments", "n_images", "text_chars", "segments_dropped"])
    side = {r["id"]: r for r in sidecars.to_pylist()}["ob:train-00000.parquet#0"]
    assert (side["n_segments"], side["n_images"], side["segments_dropped"]) == (2, 0, 2)
    assert side["text_chars"] == len("A bus drove through town.") + len("The end.")
    assert verify(out).ok
