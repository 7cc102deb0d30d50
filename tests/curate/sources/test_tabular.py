import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.sources.tabular import RecordFile, Span

RECORDS = [{"file": f"img{i}.jpg", "caption": f"a caption, with \"quotes\" no. {i}"} for i in range(10)]
RECORDS[4]["caption"] = "two\nlines"  # a quoted csv field spanning lines


def write(path: Path, fmt: str, records=RECORDS) -> Path:
    """`records` written in `fmt` ("csv", "jsonl.gz", ...) at `path` + extension."""
    path = path.with_name(f"{path.name}.{fmt}")
    base = fmt.removesuffix(".gz")
    if base == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=4)
        return path
    if base == "jsonl":
        text = "".join(json.dumps(r) + "\n" + ("\n" if i == 2 else "") for i, r in enumerate(records))
    elif base == "json":
        text = json.dumps(records)
    elif base == "txt":
        text = "".join(r["file"] + "\n" for r in records)
    else:
        with open(path.with_suffix(".tmp"), "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["file", "caption"], delimiter="," if base == "csv" else "\t")
            writer.writeheader()
            writer.writerows(records)
        text = path.with_suffix(".tmp").read_text()
    data = text.encode()
    path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    return path


FORMATS = ["jsonl", "json", "csv", "tsv", "txt", "parquet", "jsonl.gz", "csv.gz", "tsv.gz", "txt.gz", "json.gz"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_spans_cover_every_record_once_in_order(tmp_path, fmt):
    path = write(tmp_path / "pairs", fmt)
    rf = RecordFile.at(str(path), txt_column="file")
    assert rf.format == fmt.removesuffix(".gz") and rf.gzipped == fmt.endswith(".gz")
    spans = rf.spans(3)
    assert [(s.start, s.count) for s in spans] == [(0, 3), (3, 3), (6, 3), (9, 1)]
    got = [item for span in spans for item in rf.read(span, required=("file",))]
    assert [i for i, _ in got] == list(range(10))
    expected = [{"file": r["file"]} for r in RECORDS] if rf.format == "txt" else RECORDS
    assert [r for _, r in got] == expected
    assert list(rf.read(required=("file",))) == got  # the whole file reads the same


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "txt"])
def test_uncompressed_line_formats_seek_to_their_span(tmp_path, fmt):
    path = write(tmp_path / "pairs", fmt)
    rf = RecordFile.at(str(path), txt_column="file")
    spans = rf.spans(3)
    assert all(s.offset is not None for s in spans)
    # garbage before span 1 that adds records (same length, so offsets hold): a reader that
    # seeks never sees it, one that counts from the top would
    data = bytearray(path.read_bytes())
    data[spans[1].offset - 5 : spans[1].offset - 1] = b"\nz\n\n"
    path.write_bytes(bytes(data))

    def files(span):
        return [r["file"] if isinstance(r, dict) else r for _, r in rf.read(span)]

    assert files(spans[2]) == ["img6.jpg", "img7.jpg", "img8.jpg"]
    assert files(Span(spans[2].start, spans[2].count)) != files(spans[2])  # counting from the top


def test_gzipped_spans_have_no_offset(tmp_path):
    rf = RecordFile.at(str(write(tmp_path / "pairs", "jsonl.gz")))
    assert all(s.offset is None for s in rf.spans(4))


def test_parquet_span_reads_only_across_its_row_groups(tmp_path):
    rf = RecordFile.at(str(write(tmp_path / "pairs", "parquet")))  # row groups of 4
    assert [r["file"] for _, r in rf.read(Span(3, 3))] == ["img3.jpg", "img4.jpg", "img5.jpg"]
    assert list(rf.read(Span(10, 0))) == []


def test_malformed_rows_become_errors_with_their_index(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"file": "a.jpg", "caption": "ok"}\n{not json\n[1, 2]\n\n{"file": "b.jpg"}\n'
                    '{"file": null, "caption": "x"}\n{"file": "c.jpg", "caption": "fine"}\n')
    rows = list(RecordFile.at(str(path)).read(required=("file", "caption")))
    assert [i for i, _ in rows] == [0, 1, 2, 3, 4, 5]  # the blank line is not a record
    assert rows[0][1] == {"file": "a.jpg", "caption": "ok"}
    assert rows[1][1].startswith("bad JSON")
    assert rows[2][1] == "a JSON list, not an object"
    assert rows[3][1] == "missing required column 'caption'"
    assert rows[4][1] == "missing required column 'file'"
    assert rows[5][1] == {"file": "c.jpg", "caption": "fine"}


def test_csv_wrong_field_count_and_empty_fields(tmp_path):
    path = tmp_path / "map.csv"
    path.write_text("\ufefffile,caption,extra\na.jpg,hello,\nb.jpg,too,many,fields\nc.jpg,short\n")
    rows = list(RecordFile.at(str(path)).read())
    assert rows[0] == (0, {"file": "a.jpg", "caption": "hello", "extra": None})
    assert rows[1] == (1, "4 fields, the header has 3")
    assert rows[2] == (2, "2 fields, the header has 3")


def test_json_array_elements_that_are_not_objects(tmp_path):
    path = tmp_path / "map.json"
    path.write_text('[{"file": "a.jpg"}, "oops", {"file": "b.jpg"}]')
    assert list(RecordFile.at(str(path)).read()) == [(0, {"file": "a.jpg"}), (1, "a JSON str, not an object"),
                                                     (2, {"file": "b.jpg"})]
    path.write_text('{"file": "a.jpg"}')
    with pytest.raises(ValueError, match="array"):
        RecordFile.at(str(path)).spans(2)


def test_format_inference_and_override(tmp_path):
    assert RecordFile.at("x/urls.TSV.gz").format == "tsv"
    rf = RecordFile.at("x/captions.dat", "jsonl.gz")
    assert (rf.format, rf.gzipped) == ("jsonl", True)
    with pytest.raises(ValueError, match="cannot tell"):
        RecordFile.at("x/captions.dat")
    with pytest.raises(ValueError, match="gzipped parquet"):
        RecordFile.at("x/a.parquet.gz")
