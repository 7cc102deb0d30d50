"""Text-only corpora (record kind `text`): jsonl / json / csv / tsv / parquet files of documents,
such as a FineWeb, C4 or RedPajama dump.

`path` names the files: a file, a folder (its files in `folder_formats`, not recursive), a glob,
or a list of them; they are merged and sorted, so the same inputs always give the same
partitions. Each file is read by `curate.sources.tabular.RecordFile` (format from the extension
unless `format` names one) in spans of `records_per_partition` records; a partition's fingerprint
covers the file's label, size and mtime and its span, so a changed file refuses to resume.

Every record is an input with the id `"<source name>:<file>#<record index>"` (`<file>`: the path
relative to the common folder of all the source's files; the index is RecordFile's 0-based record
ordinal). A corpus's own ids are not used as locators, since nothing guarantees they are unique
or id-safe: the `id_column` value (when the record has one) travels in `extra` as `source_id`.
The row's `text` is the `text_column` value as is, its `url` the `url_column` value (null when
absent), and `extra` a JSON object of the other columns (all, or only `extra_columns`).

Drop codes (stage "source"): `malformed_row` (a record that cannot be read, no `text_column`
value or one that is not a string, a url that is not a string), `no_text` (a text that is empty
or only whitespace). A named column absent from a csv/tsv/parquet header is a recipe mistake,
reported when partitions are planned.

Finding the files and planning their spans is `curate.sources.files`'s, shared with obelics and warc.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from curate.sources.base import Partition, Source, SourceConfig, register
from curate.sources.files import MALFORMED_ROW, NO_TEXT, find_files, json_object, plan_record_files, read_records

class TextCorpusConfig(SourceConfig):
    kind: Literal["text_corpus"] = "text_corpus"
    path: str | list[str] = Field(min_length=1)  # a file, a folder, a glob, or a list of them
    format: str | None = None  # e.g. "jsonl.gz", "parquet"; default: each file's extension
    text_column: str = "text"
    id_column: str | None = "id"  # carried as extra["source_id"] when a record has it
    url_column: str | None = "url"  # null: the rows have no url
    extra_columns: list[str] | None = None  # null: every other column; a list: only those
    records_per_partition: int = Field(10_000, gt=0)


FOLDER_PATTERNS = ("*.jsonl", "*.jsonl.gz", "*.json", "*.json.gz", "*.parquet", "*.csv", "*.csv.gz",
                   "*.tsv", "*.tsv.gz")


@register
class TextCorpusSource(Source):
    Config = TextCorpusConfig
    record_kind = "text"
    config: TextCorpusConfig

    def partitions(self) -> list[Partition]:
        c = self.config
        files = find_files(self.name, c.path, FOLDER_PATTERNS)
        return plan_record_files(self, files, c.format, c.records_per_partition,
                                 columns=[c.text_column, *(c.extra_columns or [])])

    def read(self, partition: Partition, batch_size: int) -> Iterator[pa.Table]:
        return self.batches(self._rows(partition), batch_size)

    def _rows(self, partition: Partition) -> Iterator[dict[str, Any]]:
        for label, index, record in read_records(partition):
            locator = f"{label}#{index}"
            row = self._row(record)
            if isinstance(row, tuple):
                code, why = row
                yield self.dropped_row(locator, code, f"{label} record {index}: {why}", **self._carried(record))
                continue
            yield {"id": f"{self.name}:{locator}", **row}

    def _row(self, record: dict[str, Any] | str) -> dict[str, Any] | tuple[str, str]:
        """The row's text, url and extra, or (drop code, why)."""
        if isinstance(record, str):
            return MALFORMED_ROW, record
        c = self.config
        text = record.get(c.text_column)
        if text is None:
            return MALFORMED_ROW, f"no {c.text_column!r}"
        if not isinstance(text, str):
            return MALFORMED_ROW, f"{c.text_column!r} is not text ({type(text).__name__})"
        url = record.get(c.url_column) if c.url_column else None
        if url is not None and not isinstance(url, str):
            return MALFORMED_ROW, f"{c.url_column!r} is not text ({type(url).__name__})"
        if not text.strip():
            return NO_TEXT, f"{c.text_column!r} is empty"
        return {"text": text, **self._carried(record)}

    def _carried(self, record: dict[str, Any] | str) -> dict[str, Any]:
        """url and extra of a record, also for a dropped one (so the ledger has its url)."""
        if not isinstance(record, dict):
            return {}
        c = self.config
        url = record.get(c.url_column) if c.url_column else None
        url = (url.strip() or None) if isinstance(url, str) else None
        own = {c.text_column, c.url_column, c.id_column}
        if c.extra_columns is None:
            rest = {k: v for k, v in record.items() if k not in own}
        else:
            rest = {k: record[k] for k in c.extra_columns if k in record and k not in own}
        if c.id_column and record.get(c.id_column) is not None:
            rest["source_id"] = record[c.id_column]
        return {"url": url, "extra": json_object(rest)}
