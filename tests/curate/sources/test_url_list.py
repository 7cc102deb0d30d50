"""URL lists in img2dataset's input formats: every record becomes exactly one row (or one
`malformed_row` drop), with a stable id, whatever the format and the partitioning."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.recipe import parse_recipe
from curate.sources import build_source
from curate.sources.url_list import UrlListConfig, UrlListSource

RECORDS = [
    {
        "url": f"https://images.example.com/{i:03d}.jpg",
        "caption": f"photo {i}, a \"quoted\" caption" if i != 4 else "two\nlines",
        "width": str(100 + i),
        "license": "cc-by" if i % 2 else "cc0",
    }
    for i in range(11)
]
FORMATS = ["jsonl", "json", "csv", "tsv", "txt", "parquet", "jsonl.gz", "json.gz", "csv.gz", "tsv.gz", "txt.gz"]


def write(path: Path, fmt: str, records: list[dict] = RECORDS, columns: list[str] | None = None) -> Path:
    """`records` in `fmt` ("csv", "jsonl.gz", ...) at `path` + its extension; a txt file gets
    the first column only."""
    path = path.with_name(f"{path.name}.{fmt}")
    path.parent.mkdir(parents=True, exist_ok=True)
    base = fmt.removesuffix(".gz")
    columns = columns or list(records[0])
    if base == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=4)
        return path
    if base == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    elif base == "json":
        text = json.dumps(records, ensure_ascii=False)
    elif base == "txt":
        text = "".join(f"{r[columns[0]]}\n" for r in records)
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, columns, delimiter="," if base == "csv" else "\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        text = buf.getvalue()
    data = text.encode()
    path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    return path


def source(path, name: str = "urls", **kw) -> UrlListSource:
    return build_source(UrlListConfig(name=name, path=path if isinstance(path, list) else str(path), **kw))


def read_all(src: UrlListSource, batch_size: int = 64) -> list[dict]:
    return [row for p in src.partitions() for t in src.read(p, batch_size) for row in t.to_pylist()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_every_record_once(tmp_path, fmt):
    path = write(tmp_path / "pairs", fmt)
    txt = fmt.startswith("txt")
    src = source(path, records_per_partition=3, caption_column=None if txt else "caption")
    parts = src.partitions()
    assert [p.payload["span"]["count"] for p in parts] == [3, 3, 3, 2]
    json.dumps([p.payload for p in parts])  # partitions travel to workers as JSON
    rows = read_all(src)
    assert [r["id"] for r in rows] == [f"urls:pairs.{fmt}#{i}" for i in range(11)]
    assert [r["url"] for r in rows] == [r["url"] for r in RECORDS]
    for row, record in zip(rows, RECORDS):
        assert row["source"] == "urls" and row["drop_reason"] is None
        assert row["image"] is None and row["image_sha256"] is None and row["width"] is None
        if txt:
            assert row["caption"] is None and row["extra"] is None
        else:
            assert row["caption"] == record["caption"]
            assert json.loads(row["extra"]) == {"width": record["width"], "license": record["license"]}


def test_custom_column_names_and_selected_extra_columns(tmp_path):
    records = [{"URL": f" http://x.example/{i}.png\t", "TEXT": f"caption {i}", "key": f"{i:04d}", "h": i}
               for i in range(5)]
    path = write(tmp_path / "list", "parquet", records)
    rows = read_all(source(path, url_column="URL", caption_column="TEXT", extra_columns=["key"]))
    assert [r["url"] for r in rows] == [f"http://x.example/{i}.png" for i in range(5)]  # stripped
    assert [r["caption"] for r in rows] == [f"caption {i}" for i in range(5)]
    assert [json.loads(r["extra"]) for r in rows] == [{"key": f"{i:04d}"} for i in range(5)]

    rows = read_all(source(path, url_column="URL", caption_column="TEXT"))  # default: all others
    assert json.loads(rows[3]["extra"]) == {"key": "0003", "h": 3}
    rows = read_all(source(path, url_column="URL", caption_column="TEXT", extra_columns=[]))
    assert all(r["extra"] is None for r in rows)


def test_txt_urls_without_captions(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("http://a.example/1.jpg\n\n  http://a.example/2.jpg  \n")
    rows = read_all(source(path, caption_column=None))
    assert [(r["id"], r["url"], r["caption"]) for r in rows] == [
        ("urls:urls.txt#0", "http://a.example/1.jpg", None),
        ("urls:urls.txt#1", "http://a.example/2.jpg", None),  # blank lines are not records
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet", "jsonl.gz", "csv.gz"])
@pytest.mark.parametrize("per_partition", [1, 2, 4, 11, 50])
def test_partitions_cover_each_record_once_across_boundaries(tmp_path, fmt, per_partition):
    path = write(tmp_path / "pairs", fmt)
    src = source(path, records_per_partition=per_partition)
    parts = src.partitions()
    assert len(parts) == -(-len(RECORDS) // per_partition)
    assert [p.index for p in parts] == list(range(len(parts)))
    rows = read_all(src, batch_size=3)
    assert [r["id"] for r in rows] == [f"urls:pairs.{fmt}#{i}" for i in range(len(RECORDS))]
    assert [r["caption"] for r in rows] == [r["caption"] for r in RECORDS]  # "two\nlines" intact


def test_many_files_and_globs_sorted_with_ids_relative_to_the_common_parent(tmp_path):
    a = write(tmp_path / "lists" / "b" / "part1", "csv", RECORDS[:3])
    b = write(tmp_path / "lists" / "a" / "part2", "jsonl.gz", RECORDS[3:5])
    c = write(tmp_path / "lists" / "a" / "part0", "parquet", RECORDS[5:6])
    src = source([str(a), str(tmp_path / "lists" / "a" / "*")], records_per_partition=2)
    rows = read_all(src)
    assert [r["id"] for r in rows] == [
        "urls:a/part0.parquet#0",
        "urls:a/part2.jsonl.gz#0", "urls:a/part2.jsonl.gz#1",
        "urls:b/part1.csv#0", "urls:b/part1.csv#1", "urls:b/part1.csv#2",
    ]
    assert [r["url"] for r in rows] == [r["url"] for r in RECORDS[5:6] + RECORDS[3:5] + RECORDS[:3]]
    # a file named twice (directly and through a glob) is read once
    twice = source([str(c), str(tmp_path / "lists" / "a" / "*.parquet")])
    assert [r["id"] for r in read_all(twice)] == ["urls:part0.parquet#0"]


def test_ids_unique_and_stable_fingerprint_follows_the_file(tmp_path):
    path = write(tmp_path / "pairs", "csv")
    src = source(path, records_per_partition=4)
    first, again = src.partitions(), src.partitions()
    assert first == again
    ids = [r["id"] for r in read_all(src)]
    assert len(ids) == len(set(ids)) == len(RECORDS)
    assert ids == [r["id"] for r in read_all(source(path, records_per_partition=5))]  # partitioning-free
    assert len({p.fingerprint for p in first}) == len(first)  # the span is part of it
    os.utime(path, ns=(0, 12345))
    assert [p.fingerprint for p in src.partitions()] != [p.fingerprint for p in first]


def test_malformed_records_and_empty_urls_are_dropped_once_each(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [
        json.dumps({"url": "http://a.example/0.jpg", "caption": "fine"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"url": "   ", "caption": "blank url"}),
        json.dumps({"caption": "no url at all"}),
        json.dumps({"url": None, "caption": "null url"}),
        json.dumps({"url": 7, "caption": "a number"}),
        json.dumps({"url": "http://a.example/7.jpg", "caption": ["not", "text"]}),
        json.dumps({"url": "http://a.example/8.jpg", "caption": None}),  # no caption: kept here
    ]
    path.write_text("\n".join(lines) + "\n")
    rows = read_all(source(path, records_per_partition=4))
    assert [r["id"] for r in rows] == [f"urls:pairs.jsonl#{i}" for i in range(9)]
    dropped = {r["id"].rpartition("#")[2]: r for r in rows if r["drop_reason"]}
    assert sorted(dropped, key=int) == ["1", "2", "3", "4", "5", "6", "7"]
    assert {r["drop_stage"] for r in dropped.values()} == {"source"}
    assert {r["drop_reason"] for r in dropped.values()} == {"malformed_row"}
    details = {i: r["drop_detail"] for i, r in dropped.items()}
    assert details["1"].startswith("pairs.jsonl record 1: bad JSON")
    assert details["2"] == "pairs.jsonl record 2: a JSON list, not an object"
    assert details["3"] == "pairs.jsonl record 3: empty 'url'"
    assert details["4"] == "pairs.jsonl record 4: no 'url'"
    assert details["5"] == "pairs.jsonl record 5: no 'url'"
    assert details["6"] == "pairs.jsonl record 6: 'url' is not text (int)"
    assert details["7"] == "pairs.jsonl record 7: 'caption' is not text (list)"
    assert dropped["7"]["url"] == "http://a.example/7.jpg"  # what is known travels to the ledger
    assert rows[8]["drop_reason"] is None and rows[8]["caption"] is None


def test_csv_rows_with_the_wrong_field_count_and_empty_urls(tmp_path):
    path = tmp_path / "pairs.csv.gz"
    text = "url,caption\nhttp://a.example/0.jpg,zero\nhttp://a.example/1.jpg,one,extra\n,no url\nhttp://a.example/3.jpg,three\n"
    path.write_bytes(gzip.compress(text.encode()))
    rows = read_all(source(path, records_per_partition=2))
    assert [(r["id"], r["drop_reason"]) for r in rows] == [
        ("urls:pairs.csv.gz#0", None),
        ("urls:pairs.csv.gz#1", "malformed_row"),
        ("urls:pairs.csv.gz#2", "malformed_row"),
        ("urls:pairs.csv.gz#3", None),
    ]
    assert rows[1]["drop_detail"] == "pairs.csv.gz record 1: 3 fields, the header has 2"
    assert rows[2]["drop_detail"] == "pairs.csv.gz record 2: no 'url'"


def test_format_override_for_files_without_an_extension(tmp_path):
    path = tmp_path / "export"
    path.write_text("link\ttitle\nhttp://a.example/x.jpg\ta title\n")
    rows = read_all(source(path, format="tsv", url_column="link", caption_column="title"))
    assert [(r["url"], r["caption"], r["extra"]) for r in rows] == [("http://a.example/x.jpg", "a title", None)]


def test_configuration_mistakes_fail_before_reading(tmp_path):
    path = write(tmp_path / "pairs", "csv")
    with pytest.raises(ValueError, match="has no column 'link'"):
        source(path, url_column="link").partitions()
    with pytest.raises(ValueError, match="has no column 'alt'"):
        source(path, caption_column="alt").partitions()
    with pytest.raises(FileNotFoundError, match="matches no file"):
        source(str(tmp_path / "*.parquet")).partitions()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        source(str(tmp_path / "missing.csv")).partitions()
    with pytest.raises(IsADirectoryError, match="glob"):
        source(str(tmp_path)).partitions()
    with pytest.raises(ValueError, match="cannot tell the record format"):
        (tmp_path / "noext").write_text("x\n")
        source(str(tmp_path / "noext")).partitions()


def test_recipe_accepts_a_url_list_source():
    recipe = parse_recipe({
        "name": "t",
        "sources": [{"kind": "url_list", "name": "laion", "path": ["a/*.parquet", "b.csv.gz"],
                     "caption_column": "TEXT", "url_column": "URL", "records_per_partition": 5000}],
        "stages": [],
        "output": {"path": "out"},
    })
    config = recipe.sources[0]
    assert isinstance(config, UrlListConfig) and config.extra_columns is None and config.format is None


def test_extra_columns_carry_their_types(tmp_path):
    """Each extra column's sidecar type travels in `extra_types`: parquet's Arrow type (text for a
    type whose values JSON does not keep), text for csv, a JSON value's own type for jsonl."""
    records = [{"url": f"http://x.example/{i}.jpg", "caption": "c", "license": "cc0", "w": i, "p": 0.5 * i,
                "nsfw": i == 1, "tags": ["a", "b"], "seen": datetime(2024, 1, i + 1)} for i in range(2)]
    table = pa.Table.from_pylist(records).cast(pa.schema([
        ("url", pa.string()), ("caption", pa.string()), ("license", pa.string()), ("w", pa.int32()),
        ("p", pa.float32()), ("nsfw", pa.bool_()), ("tags", pa.list_(pa.string())), ("seen", pa.timestamp("s"))]))
    pq.write_table(table, tmp_path / "l.parquet")
    rows = read_all(source(tmp_path / "l.parquet"))
    assert json.loads(rows[0]["extra_types"]) == {"license": "string", "w": "int32", "p": "float", "nsfw": "bool",
                                                  "tags": "string", "seen": "string"}
    assert json.loads(rows[1]["extra"])["seen"] == "2024-01-02 00:00:00"  # as KEY.json holds it
    jsonl = write(tmp_path / "l", "jsonl", [{**r, "seen": None, "big": 2**70} for r in records])
    rows = read_all(source(jsonl))
    assert json.loads(rows[1]["extra_types"]) == {"license": "string", "w": "int64", "p": "double", "nsfw": "bool",
                                                  "tags": "string", "seen": None, "big": "string"}
    rows = read_all(source(write(tmp_path / "l", "csv", RECORDS[:1])))
    assert json.loads(rows[0]["extra_types"]) == {"width": "string", "license": "string"}
    assert read_all(source(write(tmp_path / "u", "txt", RECORDS[:1]), caption_column=None))[0]["extra_types"] is None
