"""URL + caption lists in img2dataset's input formats: the inputs of a download stage.

`path` names the list files: one file, a glob, or a list of files and globs (expanded, merged and
sorted, so the same inputs always give the same partitions). Each file is read by
`curate.sources.tabular.RecordFile` in its format (txt, csv, tsv, json, jsonl, parquet; the text
formats optionally gzipped; `format` overrides the extension for every file) and split into
partitions of `records_per_partition` records. A partition's fingerprint covers the file's name,
size and mtime and its span, so a changed list refuses to resume.

Every record is an input with the id `"<source name>:<file>#<record index>"`, where `<file>` is
the file's path relative to the common parent of all the source's files and the record index is
`RecordFile`'s (0-based, blank lines and the csv header not counted). A row carries the stripped
`url`, the `caption` (null when `caption_column` is null, and always for `txt` files, which hold
urls only) and, in `extra` (a JSON object), the record's other columns: all of them, or only the
`extra_columns` named. `extra_types` gives each of them its sidecar type (curate/carried.py):
the file's Arrow type for parquet, text for csv/tsv (which declare none), the value's own JSON
type for json/jsonl; packing writes them as the sidecar's `meta_<name>` columns. Image columns
stay null: a download stage fills them.

Drop code (stage "source"): `malformed_row` for a record that cannot be read (bad JSON, a JSON
value that is not an object, a csv row with the wrong number of fields), a record whose url is
missing or empty, or whose url or caption is not text. The detail names the file, the record
index and why. A url column (or a named caption or extra column) absent from a csv, tsv or parquet
file's header is a recipe mistake, a RecipeError naming the file and the columns it has, raised
when the partitions are planned.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from curate.recipe_io import RecipeError
from curate.contract import meta_type_name, value_type_name
from curate.storage import is_url, location, parquet_file
from curate.sources.base import Partition, Source, SourceConfig, fingerprint, register
from curate.sources.remote import file_facts, input_labels, remote_matches
from curate.sources.tabular import RecordFile, Span

MALFORMED_ROW = "malformed_row"
_GLOB_CHARS = set("*?[")
_HEADED = ("csv", "tsv", "parquet")  # formats whose column names are known before any record


class UrlListConfig(SourceConfig):
    kind: Literal["url_list"] = "url_list"
    path: str | list[str] = Field(min_length=1)  # a file, a glob, or a list of files and globs
    format: str | None = None  # e.g. "csv", "jsonl.gz"; default: each file's extension
    url_column: str = "url"
    caption_column: str | None = "caption"  # null: no captions (a txt file never has any)
    extra_columns: list[str] | None = None  # null: every other column; a list: only those
    records_per_partition: int = Field(10_000, gt=0)


@register
class UrlListSource(Source):
    Config = UrlListConfig
    record_kind = "pair"
    config: UrlListConfig

    # planning (client) ------------------------------------------------------------------------

    def files(self) -> list[Path]:
        """The list files, sorted; a pattern matching nothing or a missing file is an error."""
        patterns = [self.config.path] if isinstance(self.config.path, str) else self.config.path
        found: set[str] = set()
        remote: set[str] = set()
        for pattern in patterns:
            if is_url(pattern):  # on an object store (curate/sources/remote.py)
                matches, folder = remote_matches(pattern, None)
                if folder:
                    raise IsADirectoryError(f"source {self.name!r}: {pattern} is a folder; name its "
                                            f"files or a glob such as {pattern.rstrip('/') + '/*.parquet'!r}")
                if not matches:
                    raise FileNotFoundError(f"source {self.name!r}: {pattern} matches no file")
                remote.update(matches)
            elif _GLOB_CHARS & set(pattern):
                matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
                if not matches:
                    raise FileNotFoundError(f"source {self.name!r}: {pattern!r} matches no file")
                found.update(os.path.abspath(m) for m in matches)
            elif os.path.isdir(pattern):
                raise IsADirectoryError(f"source {self.name!r}: {pattern} is a folder; name its "
                                        f"files or a glob such as {os.path.join(pattern, '*.parquet')!r}")
            elif os.path.isfile(pattern):
                found.add(os.path.abspath(pattern))
            else:
                raise FileNotFoundError(f"source {self.name!r}: {pattern} does not exist")
        if remote and found:
            raise ValueError(f"source {self.name!r}: mixes local files and URLs; give it one or the other")
        return [location(f) for f in sorted(remote)] if remote else [Path(f) for f in sorted(found)]

    def partitions(self) -> list[Partition]:
        files = self.files()
        parts: list[Partition] = []
        for path, label in zip(files, input_labels(files)):
            records = self._record_file(path)
            self._check_header(records, label)
            size, version = file_facts(path)
            for span in records.spans(self.config.records_per_partition):
                payload = {"file": str(path), "label": label, "span": vars(span)}
                facts = [label, size, version, vars(span)]
                parts.append(Partition(self.name, len(parts), payload, fingerprint(facts)))
        return parts

    def _record_file(self, path: Path | str) -> RecordFile:
        return RecordFile.at(str(path), self.config.format, txt_column=self.config.url_column)

    def _check_header(self, records: RecordFile, label: str) -> None:
        """Fail early on a column name the file's header lacks (csv, tsv, parquet): a typo in
        the recipe would otherwise drop or strip every record."""
        if records.format not in _HEADED:
            return
        first = next(iter(records.read(Span(0, 1))), None)  # from the top: past the header
        if first is None or not isinstance(first[1], dict):
            return  # empty, or a malformed first row: the records speak for themselves
        c = self.config
        wanted = [("url_column", c.url_column), ("caption_column", c.caption_column),
                  *(("extra_columns", name) for name in c.extra_columns or [])]
        missing = [(option, name) for option, name in wanted if name is not None and name not in first[1]]
        if missing:
            option, name = missing[0]
            raise RecipeError(f"source {self.name!r}: {records.path} has no column {name!r} "
                              f"(its columns: {sorted(first[1])}); set {option} in the recipe to one of them")

    # reading (worker) -------------------------------------------------------------------------

    def read(self, partition: Partition, batch_size: int) -> Iterator[pa.Table]:
        return self.batches(self._rows(partition), batch_size)

    def _rows(self, partition: Partition) -> Iterator[dict[str, Any]]:
        records = self._record_file(partition.payload["file"])
        label = partition.payload["label"]
        declared = None  # column -> sidecar type, where the file declares types
        if records.format == "parquet":
            declared = {f.name: meta_type_name(f.type) for f in parquet_file(location(records.path)).schema_arrow}
        elif records.format in ("csv", "tsv"):
            declared = {}  # every column text
        for index, record in records.read(Span(**partition.payload["span"])):
            locator = f"{label}#{index}"
            row = self._row(record, declared)
            if isinstance(row, str):
                url = record.get(self.config.url_column) if isinstance(record, dict) else None
                yield self.dropped_row(locator, MALFORMED_ROW, f"{label} record {index}: {row}",
                                       url=(url.strip() or None) if isinstance(url, str) else None)
                continue
            yield {"id": f"{self.name}:{locator}", **row}

    def _row(self, record: dict[str, Any] | str, declared: dict[str, str] | None) -> dict[str, Any] | str:
        """The row's url, caption, extra and extra_types, or why the record is malformed."""
        if isinstance(record, str):
            return record
        c = self.config
        url = record.get(c.url_column)
        if url is None:
            return f"no {c.url_column!r}"
        if not isinstance(url, str):
            return f"{c.url_column!r} is not text ({type(url).__name__})"
        if not url.strip():
            return f"empty {c.url_column!r}"
        caption = record.get(c.caption_column) if c.caption_column is not None else None
        if caption is not None and not isinstance(caption, str):
            return f"{c.caption_column!r} is not text ({type(caption).__name__})"
        extra = self._extra(record)
        if not extra:
            return {"url": url.strip(), "caption": caption, "extra": None}
        types = {k: declared.get(k, "string") if declared is not None else value_type_name(v) for k, v in extra.items()}
        return {"url": url.strip(), "caption": caption, "extra": _json(extra), "extra_types": _json(types)}

    def _extra(self, record: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        if c.extra_columns is None:
            return {k: v for k, v in record.items() if k not in (c.url_column, c.caption_column)}
        return {k: record[k] for k in c.extra_columns if k in record}


def _json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
