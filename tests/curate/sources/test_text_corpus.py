"""The text_corpus source on real jsonl / parquet files, and a stage-less curation run of it."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.contract import read_ledger, read_manifest, shard_urls
from curate.recipe import parse_recipe
from curate.sources import build_source
from curate.sources.text_corpus import TextCorpusConfig
from tools.verify import verify

GOOD = [
    {"id": "doc-1", "text": "The first document.\n\nIt has two paragraphs.", "url": "https://a.example/1",
     "lang": "en"},
    {"id": "doc-2", "text": "A second one, with no url.", "lang": "en", "score": 0.5},
    {"text": "A third, without an id.", "url": "https://b.example/3"},
]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A jsonl file mixing good and bad records, and a parquet file."""
    folder = tmp_path / "corpus"
    write_jsonl(folder / "a.jsonl", [
        json.dumps(GOOD[0]),
        "",  # a blank line is not a record
        json.dumps(GOOD[1]),
        '{"text": "broken json',
        json.dumps({"id": "empty", "text": "   \n "}),
        json.dumps({"id": "missing", "body": "no text column"}),
        json.dumps({"id": "number", "text": 42}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"text": "a url that is a number", "url": 7}),
        json.dumps(GOOD[2]),
    ])
    table = pa.table({"text": [f"parquet document {i}" for i in range(7)] + [None],
                      "id": [f"p{i}" for i in range(8)], "year": list(range(2000, 2008))})
    pq.write_table(table, folder / "b.parquet", row_group_size=3)
    (folder / "notes.md").write_text("not a corpus file")
    return folder


def rows(src, batch_size: int = 4) -> list[dict]:
    return [r for p in src.partitions() for t in src.read(p, batch_size) for r in t.to_pylist()]


def source(path, **kw):
    return build_source(TextCorpusConfig(name="txt", path=path if isinstance(path, list) else str(path), **kw))


def test_every_record_once_with_its_outcome(corpus):
    got = rows(source(corpus, records_per_partition=3))
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)) == 9 + 8  # blank line not a record; every other line one
    by_id = {r["id"]: r for r in got}
    first = by_id["txt:a.jsonl#0"]
    assert first["text"] == GOOD[0]["text"] and first["url"] == "https://a.example/1"
    assert json.loads(first["extra"]) == {"lang": "en", "source_id": "doc-1"}
    assert first["drop_reason"] is None
    assert json.loads(by_id["txt:a.jsonl#1"]["extra"]) == {"lang": "en", "score": 0.5, "source_id": "doc-2"}
    assert by_id["txt:a.jsonl#1"]["url"] is None
    assert by_id["txt:a.jsonl#8"]["text"] == GOOD[2]["text"] and by_id["txt:a.jsonl#8"]["extra"] is None
    reasons = {i: by_id[f"txt:a.jsonl#{i}"]["drop_reason"] for i in range(2, 8)}
    assert reasons == {2: "malformed_row", 3: "no_text", 4: "malformed_row", 5: "malformed_row",
                       6: "malformed_row", 7: "malformed_row"}
    assert all(by_id[f"txt:a.jsonl#{i}"]["drop_stage"] == "source" for i in range(2, 8))
    detail = by_id["txt:a.jsonl#2"]["drop_detail"]
    assert "bad JSON" in detail and "a.jsonl record 2" in detail
    assert json.loads(by_id["txt:a.jsonl#3"]["extra"]) == {"source_id": "empty"}  # a dropped row keeps its facts
    parquet = [r for r in got if r["id"].startswith("txt:b.parquet#")]
    assert [r["text"] for r in parquet[:7]] == [f"parquet document {i}" for i in range(7)]
    assert json.loads(parquet[2]["extra"]) == {"source_id": "p2", "year": 2002}
    assert parquet[7]["drop_reason"] == "malformed_row"


def test_partition_size_does_not_change_the_rows(corpus):
    small = rows(source(corpus, records_per_partition=2), batch_size=1)
    big = rows(source(corpus, records_per_partition=100), batch_size=50)
    assert small == big


def test_deterministic_and_fingerprinted(corpus):
    src = source(corpus, records_per_partition=4)
    parts = src.partitions()
    assert parts == source(corpus, records_per_partition=4).partitions()
    first = [t for p in parts for t in src.read(p, 3)]
    again = [t for p in parts for t in src.read(p, 3)]
    assert all(a.equals(b) for a, b in zip(first, again)) and len(first) == len(again)
    path = corpus / "a.jsonl"
    path.write_text(path.read_text() + json.dumps({"text": "one more"}) + "\n")
    changed = source(corpus, records_per_partition=4).partitions()
    a_parts = [p.fingerprint for p in parts if p.payload["label"] == "a.jsonl"]
    assert a_parts != [p.fingerprint for p in changed if p.payload["label"] == "a.jsonl"]
    b_parts = [p.fingerprint for p in parts if p.payload["label"] == "b.parquet"]
    assert b_parts == [p.fingerprint for p in changed if p.payload["label"] == "b.parquet"]


def test_columns_are_configurable(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"body": "hello there", "link": "https://c.example/",
                                                          "uid": 9, "keep": 1, "skip": 2})])
    got = rows(source(path, text_column="body", url_column="link", id_column="uid", extra_columns=["keep"]))
    assert len(got) == 1 and got[0]["id"] == "txt:c.jsonl#0"
    assert (got[0]["text"], got[0]["url"]) == ("hello there", "https://c.example/")
    assert json.loads(got[0]["extra"]) == {"keep": 1, "source_id": 9}


def test_gzipped_jsonl_glob_and_list(tmp_path):
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "zipped"}) + "\n")
    write_jsonl(tmp_path / "sub" / "y.jsonl", [json.dumps({"text": "plain"})])
    got = rows(source([str(tmp_path / "*.jsonl.gz"), str(tmp_path / "sub" / "y.jsonl")]))
    assert [(r["id"], r["text"]) for r in got] == [("txt:sub/y.jsonl#0", "plain"), ("txt:z.jsonl.gz#0", "zipped")]


def test_recipe_mistakes_fail_at_planning(tmp_path, corpus):
    with pytest.raises(FileNotFoundError):
        source(tmp_path / "nowhere").partitions()
    with pytest.raises(ValueError, match="no column 'body'"):
        source(corpus / "b.parquet", text_column="body").partitions()


def test_curation_run_without_stages(tmp_path, corpus, output_checks, shared_cluster):
    """Stage-less curation of a text corpus: the ledger holds every record once, the stock
    webdataset library reads the text shards (KEY.txt the text, KEY.json the metadata)."""
    import webdataset as wds

    out = tmp_path / "out"
    recipe = parse_recipe({
        "name": "text-only",
        "sources": [{"kind": "text_corpus", "name": "txt", "path": str(corpus), "records_per_partition": 5}],
        "output": {"path": str(out), "shard_max_samples": 4},
        "cluster": {"n_workers": 1, "dashboard": False},
        "execution": {"batch_size": 3},
    })
    manifest = shared_cluster.run(recipe)
    output_checks.check_ledger_invariant(out)
    report = verify(out)
    assert report.ok, report
    assert manifest["counts"]["inputs"] == 17 and manifest["counts"]["kept"] == 3 + 7
    ledger = read_ledger(out).to_pylist()
    assert Counter(r["drop_reason"] for r in ledger if r["outcome"] == "dropped") == {"malformed_row": 6, "no_text": 1}
    kept = {r["id"]: r for r in ledger if r["outcome"] == "kept"}
    assert kept["txt:a.jsonl#0"]["domain"] == "a.example" and kept["txt:a.jsonl#0"]["shard"].startswith("text/")
    samples = list(wds.WebDataset(shard_urls(out, "text"), shardshuffle=False).decode())
    assert len(samples) == 10 == read_manifest(out)["kinds"]["text"]["count"]
    by_id = {s["json"]["id"]: s for s in samples}
    assert set(by_id) == set(kept)
    doc = by_id["txt:a.jsonl#0"]
    assert doc["txt"] == GOOD[0]["text"] and doc["json"]["key"] == doc["__key__"]
    assert doc["json"]["url"] == "https://a.example/1" and doc["json"]["source_id"] == "doc-1"
    assert not list(out.rglob("*.tmp")) and os.path.exists(out / "manifest.json")
