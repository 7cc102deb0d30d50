"""A folder of saved web pages (record kind `doc`): every `*.html` / `*.htm` file under `path`.

The folder is walked recursively (`recursive: false` for its top level only) in sorted order;
hidden files and folders (".name") are not inputs, and folders reached through symlinks are
not descended. A file that is itself a symlink is an input, but one resolving outside the folder
is never read: it is dropped as `unsafe_path`.

Ids are `"<source name>:<relative posix path>"` (a name that is not valid UTF-8 is dropped as
`unsafe_path`, its bad bytes written as `\\xNN` in the id). A row's `html` holds the file's
bytes as they are (the extraction stage decodes them: `charset` stays null, a file has no HTTP
header). The page's `url` is `base_url` joined with the relative path (percent-encoded) when
`base_url` is given, e.g. a mirror's "https://example.com/" root; otherwise null: a local path
is not a URL a later stage could resolve relative images against or a ledger could count a
domain for, and a `file://` URL would point readers at this machine's disk.

Drop codes (stage "source"): `too_large` (over `max_file_bytes`, checked before reading and
while reading), `unsafe_path`, `read_error` (the file vanished or an OSError).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import pyarrow as pa
from pydantic import Field, field_validator

from curate.sources.base import Partition, Source, SourceConfig, fingerprint, register
from curate.sources.files import inside_folder, size_and_mtime
from curate.sources.remote import local_folder

MiB = 1 << 20
HTML_EXTENSIONS = ("html", "htm")


class HtmlFilesConfig(SourceConfig):
    kind: Literal["html_files"] = "html_files"
    path: str
    base_url: str | None = None  # e.g. "https://example.com/": url = base_url + relative path
    recursive: bool = True
    files_per_partition: int = Field(256, gt=0)
    max_file_bytes: int = Field(16 * MiB, gt=0)

    @field_validator("path")
    @classmethod
    def _local(cls, path: str) -> str:
        return local_folder(path, "html_files")

    @field_validator("base_url")
    @classmethod
    def _http(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s) URL with a host, got {url!r}")
        return url if url.endswith("/") else url + "/"


@register
class HtmlFilesSource(Source):
    Config = HtmlFilesConfig
    record_kind = "doc"
    requires_stages = ("html_extract",)
    config: HtmlFilesConfig

    @property
    def root(self) -> Path:
        return Path(self.config.path)

    @functools.cached_property
    def real_root(self) -> Path:
        return self.root.resolve()

    def files(self) -> list[str]:
        """The pages, as sorted relative posix paths."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"source {self.name!r}: {self.root} is not a folder")
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):  # never descends linked folders
            dirnames[:] = [d for d in dirnames if not d.startswith(".")] if self.config.recursive else []
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(".") or name.rpartition(".")[2].lower() not in HTML_EXTENSIONS:
                    continue
                found.append(name if rel_dir == "." else f"{rel_dir}/{name}")
        return sorted(found)

    def partitions(self) -> list[Partition]:
        files = self.files()
        n = self.config.files_per_partition
        parts = []
        for i in range(0, len(files), n):
            chunk = files[i : i + n]
            facts = [[rel, *self._stat(rel)] for rel in chunk]
            parts.append(Partition(self.name, len(parts), {"files": chunk}, fingerprint(facts)))
        return parts

    def read(self, partition: Partition, batch_size: int) -> Iterator[pa.Table]:
        return self.batches((self._row(rel) for rel in partition.payload["files"]), batch_size)

    def url(self, rel: str) -> str | None:
        return self.config.base_url + quote(rel, safe="/") if self.config.base_url else None

    def _row(self, rel: str) -> dict[str, Any]:
        printable = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        if printable != rel:  # ids, urls and Arrow strings must be valid UTF-8
            return self.dropped_row(printable, "unsafe_path", "a file name that is not valid UTF-8")
        url, cap = self.url(rel), self.config.max_file_bytes
        path = self._inside(rel)
        if path is None:
            return self.dropped_row(rel, "unsafe_path", f"{rel!r} resolves outside {self.root}", url=url)
        try:
            size = os.stat(path).st_size
            if size > cap:
                return self.dropped_row(rel, "too_large", f"{size} bytes > max_file_bytes {cap}", url=url)
            with open(path, "rb") as fh:
                data = fh.read(cap + 1)  # it may have grown since the stat
        except OSError as exc:
            return self.dropped_row(rel, "read_error", f"{type(exc).__name__}: {exc}", url=url)
        if len(data) > cap:
            return self.dropped_row(rel, "too_large", f"over max_file_bytes {cap}", url=url)
        return {"id": f"{self.name}:{rel}", "url": url, "html": data}

    def _inside(self, rel: str) -> Path | None:
        return inside_folder(self.real_root, rel)

    def _stat(self, rel: str) -> tuple[int | None, int | None]:
        return size_and_mtime(self._inside(rel))
