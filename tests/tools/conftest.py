"""A small, real curation output built with the pack machinery: 2 pair shards, 1 doc, 1 text shard.

The values are chosen so the tests can state stats by hand (see the table in `PAIRS` and the
ledger rows); image bytes are real JPEG/PNG encodings of scikit-image's sample images.
"""

from __future__ import annotations

import functools
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from curate.engine.commit import Storage
from curate.contract import (
    FORMAT_VERSION, KIND_DIRS, LEDGER_SCHEMA, MANIFEST, SIZES_JSON, domain_of, image_digest, record_schema,
    sizes_json,
)
from curate.engine.pack import ShardWriter, shard_label

# id, source, url, attempts, image, (width, height), format, caption; shard cut after 3.
PAIRS = [
    ("laion:0", "laion", "https://img.example.com/a.jpg", 1, "astronaut", (64, 64), "jpg", "an astronaut"),
    ("laion:1", "laion", "https://img.example.com/b.jpg", 2, "coffee", (120, 80), "jpg", "a cup of coffee on a table"),
    ("local:cat.png", "local", None, 1, "chelsea", (90, 60), "png", "  cat  "),
    ("laion:3", "laion", "http://cdn.other.org/r.jpg", 1, "rocket", (160, 100), "jpg", ""),
    ("local:camera.jpg", "local", None, 1, "camera", (50, 100), "jpg", "rocket launch"),
]
PAIR_SHARDS = [3, 2]

DOCS = [
    ("warc:0", "https://news.example.com/p1",
     [{"type": "text", "text": "Hello world."}, {"type": "image", "image": 0, "url": "https://news.example.com/i.jpg"},
      {"type": "text", "text": "More text here"}, {"type": "image", "image": 1, "url": "https://news.example.com/j.png"}],
     [("astronaut", (32, 32), "jpg"), ("coffee", (48, 32), "png")],
     [{"segment": 4, "reason": "decode_error", "detail": "bad"}]),
    ("warc:1", "https://blog.other.org/p2", [{"type": "text", "text": "Only text."}], [], []),
]

TEXTS = [("corpus:0", "The quick brown fox."), ("corpus:1", "Lorem ipsum dolor sit amet, consectetur.")]

# id, kind, source, url, attempts, stage, reason, detail
DROPPED = [
    ("laion:5", "pair", "laion", "https://img.example.com/c.jpg", 1, "download", "http_404", "404 Not Found"),
    ("laion:6", "pair", "laion", "https://img.example.com/d.jpg", 1, "download", "http_404", "404 Not Found (2)"),
    ("laion:7", "pair", "laion", "http://cdn.other.org/x.jpg", 3, "download", "timeout", "deadline 10s"),
    ("laion:8", "pair", "laion", "http://bad.test/y.jpg", 1, "image_filter", "too_small", "32x32 < 64"),
    ("local:broken.jpg", "pair", "local", None, 1, "download", "decode_error", "cannot identify image"),
    ("warc:2", "doc", "warc", "https://news.example.com/p3", 1, "lang", "lang_mismatch", "de"),
    ("corpus:2", "text", "corpus", None, 1, "dedup", "duplicate", "corpus:0"),
]


@functools.cache  # the same few encodings in every test's output: made once (bytes: immutable)
def encode(name: str, size: tuple[int, int], fmt: str) -> bytes:
    img = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(size)
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "png": "PNG"}[fmt])
    return buf.getvalue()


def _ledger_row(id_: str, kind: str, source: str, url: str | None, attempts: int, **rest: Any) -> dict[str, Any]:
    return {"id": id_, "kind": kind, "source": source, "url": url, "domain": domain_of(url),
            "attempts": attempts, **rest}


def build_output(out: Path) -> dict[str, Any]:
    """Write the output under `out`; return {"out", "manifest", "pair_rows", "doc_rows"}."""
    storage = Storage()
    ledger_pairs: list[dict[str, Any]] = []
    ledger_rest: list[dict[str, Any]] = []
    kinds: dict[str, list[dict[str, Any]]] = {"pair": [], "doc": [], "text": []}

    pair_schema = record_schema("pair", {"clip_score": pa.float32()})
    pair_rows = []
    for i, (id_, source, url, attempts, img, size, fmt, caption) in enumerate(PAIRS):
        image = encode(img, size, fmt)
        pair_rows.append({
            "id": id_, "source": source, "url": url, "attempts": attempts, "extra": json.dumps({"n": i}),
            "extra_types": json.dumps({"n": "int64"}),  # a typed carried column: the sidecar's meta_n
            "caption": caption, "image": image, "image_format": fmt, "image_sha256": image_digest(image),
            "image_nbytes": len(image), "width": size[0], "height": size[1], "original_width": size[0] * 2,
            "original_height": size[1] * 2, "clip_score": 0.25 + i / 10,
        })
    start = 0
    for shard, n in enumerate(PAIR_SHARDS):
        writer = ShardWriter(storage, out, "pair", shard, pair_schema)
        for row in pair_rows[start:start + n]:
            key = writer.write(row)
            ledger_pairs.append(_ledger_row(row["id"], "pair", row["source"], row["url"], row["attempts"],
                                            outcome="kept", shard=shard_label("pair", shard), key=key))
        kinds["pair"].append(writer.close())
        start += n

    doc_rows = []
    writer = ShardWriter(storage, out, "doc", 0, record_schema("doc"))
    for id_, url, segments, images, drops in DOCS:
        blobs = [encode(name, size, fmt) for name, size, fmt in images]
        row = {"id": id_, "source": "warc", "url": url, "attempts": 1, "segments": json.dumps(segments),
               "images": blobs, "image_formats": [f for _, _, f in images],
               "image_sha256s": [image_digest(b) for b in blobs], "image_nbytes_list": [len(b) for b in blobs],
               "segment_drops": json.dumps(drops)}
        doc_rows.append(row)
        key = writer.write(row)
        ledger_rest.append(_ledger_row(id_, "doc", "warc", url, 1, outcome="kept", shard=shard_label("doc", 0),
                                       key=key, segments_total=len(segments) + len(drops),
                                       segments_dropped=len(drops)))
    kinds["doc"].append(writer.close())

    writer = ShardWriter(storage, out, "text", 0, record_schema("text"))
    for id_, text in TEXTS:
        key = writer.write({"id": id_, "source": "corpus", "url": None, "attempts": 1, "text": text})
        ledger_rest.append(_ledger_row(id_, "text", "corpus", None, 1, outcome="kept",
                                       shard=shard_label("text", 0), key=key))
    kinds["text"].append(writer.close())

    for id_, kind, source, url, attempts, stage, reason, detail in DROPPED:
        row = _ledger_row(id_, kind, source, url, attempts, outcome="dropped", stage=stage, drop_reason=reason,
                          drop_detail=detail)
        (ledger_pairs if kind == "pair" else ledger_rest).append(row)
    (out / "ledger").mkdir()
    for p, rows in enumerate([ledger_pairs, ledger_rest]):
        pq.write_table(pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA), out / "ledger" / f"{p:05d}.parquet")

    storage.write_json(out / KIND_DIRS["pair"] / SIZES_JSON, sizes_json(kinds["pair"]))
    kept = sum(s["count"] for shards in kinds.values() for s in shards)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": "fixture",
        "code_version": "test",
        "recipe": {},
        "recipe_hash": "0" * 16,
        "input_fingerprint": "f" * 16,
        "kinds": {kind: {"shards": shards, "count": sum(s["count"] for s in shards),
                         "bytes": sum(s["bytes"] for s in shards)} for kind, shards in kinds.items()},
        "ledger": ["ledger/00000.parquet", "ledger/00001.parquet"],
        "counts": {"partitions": 2, "inputs": kept + len(DROPPED), "kept": kept, "dropped": len(DROPPED)},
        "drops": dict(sorted(Counter(f"{d[5]}/{d[6]}" for d in DROPPED).items())),
        "global": {},
    }
    storage.write_json(out / MANIFEST, manifest)
    return {"out": out, "manifest": manifest, "pair_rows": pair_rows, "doc_rows": doc_rows}


def _edit_manifest(out: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((out / MANIFEST).read_text())
    change(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))


def shard_entry(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for k in manifest["kinds"].values() for s in k["shards"] if name in (s["name"], s["sidecar"]))


def _rehash(out: Path, name: str) -> None:
    """Make the manifest agree with a file we rewrote on purpose (so only the intended check fails)."""
    data = (out / name).read_bytes()
    sha = Storage().sha256(out / name)

    def change(m: dict[str, Any]) -> None:
        entry = shard_entry(m, name)
        if name.endswith(".tar"):
            delta = len(data) - entry["bytes"]
            entry.update(sha256=sha, bytes=len(data))
            m["kinds"][entry["kind"]]["bytes"] += delta
        else:
            entry["sidecar_sha256"] = sha

    _edit_manifest(out, change)


@pytest.fixture
def curated(tmp_path: Path) -> dict[str, Any]:
    return build_output(tmp_path / "out")


@pytest.fixture
def edit_manifest() -> Callable[[Path, Callable[[dict[str, Any]], None]], None]:
    """`edit_manifest(out, change)`: rewrite manifest.json after `change(manifest)` mutates it."""
    return _edit_manifest


@pytest.fixture
def rehash() -> Callable[[Path, str], None]:
    """`rehash(out, "pairs/00000.tar")`: make the manifest agree with a file rewritten on purpose."""
    return _rehash
