"""The files a source reads: which files a recipe's `path` names and their labels in ids, record
files split into partitions of spans, and paths that must stay inside a source's folder.

Shared by the sources that read files of records (`text_corpus`, `obelics`), WARC files (`warc`)
and folders of files (`image_folder`, `html_files`).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from curate.recipe_io import RecipeError
from curate.storage import is_url, location
from curate.sources.base import Partition, Source, fingerprint
from curate.sources.remote import file_facts, input_labels, remote_matches
from curate.sources.tabular import RecordFile, Span

MALFORMED_ROW = "malformed_row"
NO_TEXT = "no_text"
_HEADED = ("csv", "tsv", "parquet")  # formats whose column names are known before any record


def find_files(source: str, path: str | list[str], folder_patterns: Sequence[str]) -> list[Path]:
    """Absolute paths of the files `path` names, sorted and without repeats. A folder stands for
    its files matching `folder_patterns`; a pattern or a folder matching nothing, or a missing
    file, is an error (a recipe naming nothing is a mistake, not an empty corpus)."""
    patterns = [path] if isinstance(path, str) else list(path)
    found: set[str] = set()
    remote: set[str] = set()
    for pattern in patterns:
        if is_url(pattern):  # an object store (curate/sources/remote.py)
            matches, _ = remote_matches(pattern, folder_patterns)
            if not matches:
                raise FileNotFoundError(f"source {source!r}: no input files at {pattern!r}")
            remote.update(matches)
            continue
        if os.path.isdir(pattern):
            matches = [m for p in folder_patterns for m in glob.glob(os.path.join(glob.escape(pattern), p))]
        elif glob.has_magic(pattern):
            matches = glob.glob(pattern, recursive=True)
        else:
            matches = [pattern] if os.path.exists(pattern) else []
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"source {source!r}: no input files at {pattern!r}")
        found.update(os.path.abspath(m) for m in matches)
    if remote and found:
        raise ValueError(f"source {source!r}: mixes local files and URLs; give it one or the other")
    return [location(f) for f in sorted(remote)] if remote else [Path(f) for f in sorted(found)]


def labels(files: list[Path]) -> list[str]:
    """Each file's path relative to the common folder of all of them (posix): the id's `<file>`."""
    return input_labels(files)


def plan_record_files(
    source: Source, files: list[Path], format: str | None, per_partition: int, columns: Sequence[str] = ()
) -> list[Partition]:
    """Partitions of `per_partition` records over record files, in file order. Payload: the
    file, its label and the span; fingerprint: label, size, mtime and span. `columns` that a
    headed file (csv, tsv, parquet) lacks fail here, before any work is sent out."""
    parts: list[Partition] = []
    for path, label in zip(files, labels(files)):
        records = RecordFile.at(str(path), format)
        _check_header(source.name, records, label, columns)
        size, version = file_facts(path)
        for span in records.spans(per_partition):
            payload = {"file": str(path), "label": label, "format": records.format, "span": vars(span)}
            facts = [label, size, version, vars(span)]
            parts.append(Partition(source.name, len(parts), payload, fingerprint(facts)))
    return parts


def read_records(partition: Partition) -> Iterator[tuple[str, int, dict[str, Any] | str]]:
    """(file label, record index, record or why it is malformed) of a planned partition."""
    payload = partition.payload
    records = RecordFile.at(payload["file"], payload["format"])
    for index, record in records.read(Span(**payload["span"])):
        yield payload["label"], index, record


def _check_header(source: str, records: RecordFile, label: str, columns: Sequence[str]) -> None:
    if records.format not in _HEADED or not columns:
        return
    first = next(iter(records.read(Span(0, 1))), None)
    if first is None or not isinstance(first[1], dict):
        return  # empty, or a malformed first row: the records speak for themselves
    missing = [c for c in columns if c not in first[1]]
    if missing:
        raise RecipeError(f"source {source!r}: {records.path} has no column {missing[0]!r} (its columns: "
                          f"{sorted(first[1])}); name one of them in the recipe")


def json_object(values: dict[str, Any]) -> str | None:
    """The `extra` column: a JSON object, or null when there is nothing to carry."""
    return json.dumps(values, sort_keys=True, ensure_ascii=False, default=str) if values else None


def inside_folder(real_root: Path, rel: str) -> Path | None:
    """The real path of `rel` (relative to the folder whose resolved path is `real_root`) if it
    stays inside the folder once symlinks are resolved, else None."""
    if os.path.isabs(rel) or rel == ".." or rel.startswith("../") or "\0" in rel:
        return None
    real = (real_root / rel).resolve()
    return real if real.is_relative_to(real_root) else None


def size_and_mtime(path: Path | None) -> tuple[int | None, int | None]:
    """(size, mtime in ns) of a file for fingerprints, (None, None) when it is gone or None."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        st = None
    return (st.st_size, st.st_mtime_ns) if st else (None, None)
