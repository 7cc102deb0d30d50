"""A folder of images a user already has, with captions beside them or in a mapping file.

Two ways to find captions (`captions`):
- `"sidecar"`: every image `NAME.jpg` found in the folder (recursively unless `recursive: false`)
  is an input; its caption is `NAME.txt` beside it. Hidden files and folders (".name") are not
  inputs, and folders reached through symlinks are not descended.
- a mapping file (any `curate.sources.tabular` format; a relative path is relative to the
  folder): every mapping row is an input, naming an image (`file_column`, relative to the
  folder) and its caption (`caption_column`); its other columns travel on in `extra`. Images the
  mapping does not name are ignored: in this mode the mapping *is* the list of inputs.

Sample ids are `"<source name>:<relative posix path>"`. In mapping mode a file named by several
rows gets that id for its first row and `"...:<path>#<record index>"` for the others, and a
malformed row gets `"<source name>:<mapping file name>#<record index>"`: no id appears twice.

Nothing outside the folder is ever read: a path that leaves it (`..`, absolute, or a symlink
resolving outside) is an input dropped as `missing_image`. Images are not decoded here.

Drop codes (stage "source"): `malformed_row`, `missing_image`, `no_caption` (no sidecar, or an
empty caption), `read_error` (an OSError), `too_large` (over `max_file_bytes`, checked before
reading).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator

from curate.contract import image_digest
from curate.sources.base import Partition, Source, SourceConfig, fingerprint, register
from curate.sources.files import inside_folder, size_and_mtime
from curate.sources.remote import local_folder
from curate.sources.tabular import RecordFile, Span

# Accepted extension (lower case) -> the row's `image_format`.
IMAGE_FORMATS: dict[str, str] = {
    "jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp",
    "gif": "gif", "bmp": "bmp", "tif": "tiff", "tiff": "tiff",
}
MiB = 1 << 20


class ImageFolderConfig(SourceConfig):
    kind: Literal["image_folder"] = "image_folder"
    path: str
    captions: str = "sidecar"  # "sidecar", or the path of a mapping file
    file_column: str = "file"
    caption_column: str = "caption"
    mapping_format: str | None = None  # e.g. "csv", "jsonl.gz"; default: the file's extension
    files_per_partition: int = Field(256, gt=0)
    recursive: bool = True
    max_file_bytes: int = Field(64 * MiB, gt=0)

    @field_validator("path")
    @classmethod
    def _local(cls, path: str) -> str:
        return local_folder(path, "image_folder")


class _Bad(str):
    """Why a mapping row or path is unusable, tagged with its drop code."""

    code: str

    def __new__(cls, code: str, detail: str) -> _Bad:
        obj = super().__new__(cls, detail)
        obj.code = code
        return obj


@register
class ImageFolderSource(Source):
    Config = ImageFolderConfig
    record_kind = "pair"
    config: ImageFolderConfig

    @property
    def root(self) -> Path:
        return Path(self.config.path)

    @functools.cached_property
    def real_root(self) -> Path:
        return self.root.resolve()

    @property
    def sidecar(self) -> bool:
        return self.config.captions == "sidecar"

    def partitions(self) -> list[Partition]:
        return self._sidecar_partitions() if self.sidecar else self._mapping_partitions()

    def read(self, partition: Partition, batch_size: int) -> Iterator[pa.Table]:
        rows = self._sidecar_rows(partition) if self.sidecar else self._mapping_rows(partition)
        return self.batches(rows, batch_size)

    # sidecar mode ----------------------------------------------------------------------------

    def _listing(self) -> list[tuple[str, str | None]]:
        """(image, its caption file or None), as sorted relative posix paths."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):  # never descends linked folders
            dirnames[:] = [d for d in dirnames if not d.startswith(".")] if self.config.recursive else []
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            names = set(filenames)
            for name in filenames:
                stem, dot, ext = name.rpartition(".")
                if name.startswith(".") or not dot or ext.lower() not in IMAGE_FORMATS:
                    continue
                caption = next((c for c in (f"{stem}.txt", f"{stem}.TXT") if c in names), None)
                found.append((_join(rel_dir, name), caption and _join(rel_dir, caption)))
        return sorted(found)

    def _sidecar_partitions(self) -> list[Partition]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"source {self.name!r}: {self.root} is not a folder")
        files = self._listing()
        n = self.config.files_per_partition
        parts = []
        for i in range(0, len(files), n):
            chunk = files[i : i + n]
            facts = [[rel, *self._stat(rel), cap, *(self._stat(cap) if cap else (None, None))] for rel, cap in chunk]
            parts.append(Partition(self.name, len(parts), {"files": [list(f) for f in chunk]}, fingerprint(facts)))
        return parts

    def _sidecar_rows(self, partition: Partition) -> Iterator[dict[str, Any]]:
        for rel, caption_rel in partition.payload["files"]:
            if caption_rel is None:
                yield self.dropped_row(rel, "no_caption", f"no {posixpath.splitext(rel)[0]}.txt beside it")
                continue
            caption = self._read(caption_rel)
            if isinstance(caption, _Bad):  # a caption file gone or leaving the folder: no caption
                code = "no_caption" if caption.code == "missing_image" else caption.code
                yield self.dropped_row(rel, code, f"caption {caption_rel}: {caption}")
                continue
            text = caption.decode("utf-8", "replace").strip()
            if not text:
                yield self.dropped_row(rel, "no_caption", f"{caption_rel} is empty")
                continue
            yield self._pair(rel, rel, text, None)

    # mapping mode ----------------------------------------------------------------------------

    def _mapping(self) -> RecordFile:
        path = Path(self.config.captions)
        path = path if path.is_absolute() else self.root / path
        return RecordFile.at(str(path), self.config.mapping_format)

    def _entry(self, record: dict[str, Any] | str) -> tuple[str, str, str | None] | _Bad:
        """(normalised relative path, caption, extra JSON) of a mapping row, or why it is malformed."""
        if isinstance(record, str):
            return _Bad("malformed_row", record)
        file, caption = record[self.config.file_column], record[self.config.caption_column]
        if not isinstance(file, str) or not file.strip():
            return _Bad("malformed_row", f"{self.config.file_column!r} is {file!r}, not a path")
        if not isinstance(caption, str):
            return _Bad("malformed_row", f"{self.config.caption_column!r} is a {type(caption).__name__}, not text")
        rel = posixpath.normpath(file.strip())
        rest = {k: v for k, v in record.items() if k not in (self.config.file_column, self.config.caption_column)}
        extra = json.dumps(rest, sort_keys=True, ensure_ascii=False, default=str) if rest else None
        return rel, caption, extra

    def _mapping_partitions(self) -> list[Partition]:
        """One pass over the mapping on the client: spans of `files_per_partition` rows, each
        fingerprinted by the mapping's identity, its range, and the (size, mtime) of the images
        its rows name; files named twice are found here, so ids stay unique across partitions.
        The set of names seen holds a 16-byte digest per distinct file."""
        mapping = self._mapping()
        n = self.config.files_per_partition
        spans = mapping.spans(n)
        st = os.stat(mapping.path)
        head = [Path(mapping.path).name, st.st_size, st.st_mtime_ns]
        digests = [hashlib.sha256() for _ in spans]
        repeats: list[list[int]] = [[] for _ in spans]
        seen: set[bytes] = set()
        for index, record in mapping.read(required=(self.config.file_column, self.config.caption_column)):
            entry = self._entry(record)
            if isinstance(entry, _Bad):
                continue
            rel = entry[0]
            key = hashlib.blake2b(rel.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if key in seen:
                repeats[index // n].append(index)
            seen.add(key)
            digests[index // n].update(json.dumps([index, rel, *self._stat(rel)]).encode())
        return [
            Partition(
                self.name,
                i,
                {"span": vars(span), "repeats": repeats[i]},
                fingerprint([head, vars(span), digests[i].hexdigest()]),
            )
            for i, span in enumerate(spans)
        ]

    def _mapping_rows(self, partition: Partition) -> Iterator[dict[str, Any]]:
        mapping = self._mapping()
        label = Path(mapping.path).name
        repeats = set(partition.payload["repeats"])
        span = Span(**partition.payload["span"])
        for index, record in mapping.read(span, required=(self.config.file_column, self.config.caption_column)):
            entry = self._entry(record)
            if isinstance(entry, _Bad):
                yield self.dropped_row(f"{label}#{index}", entry.code, f"{label} record {index}: {entry}")
                continue
            rel, caption, extra = entry
            locator = f"{rel}#{index}" if index in repeats else rel
            if not caption.strip():
                yield self.dropped_row(locator, "no_caption", f"{label} record {index}: empty caption", extra=extra)
                continue
            yield self._pair(locator, rel, caption.strip(), extra)

    # files -----------------------------------------------------------------------------------

    def _inside(self, rel: str) -> Path | None:
        return inside_folder(self.real_root, rel)

    def _stat(self, rel: str) -> tuple[int | None, int | None]:
        return size_and_mtime(self._inside(rel))

    def _read(self, rel: str) -> bytes | _Bad:
        """The bytes of `rel`, never more than `max_file_bytes` of them, or why not."""
        path, cap = self._inside(rel), self.config.max_file_bytes
        if path is None:
            return _Bad("missing_image", f"{rel!r} leaves the folder {self.root}")
        try:
            size = os.stat(path).st_size
            if size > cap:
                return _Bad("too_large", f"{size} bytes > max_file_bytes {cap}")
            with open(path, "rb") as fh:
                data = fh.read(cap + 1)  # it may have grown since the stat
        except FileNotFoundError:
            return _Bad("missing_image", f"{rel!r} does not exist in {self.root}")
        except OSError as exc:
            return _Bad("read_error", f"{type(exc).__name__}: {exc}")
        if len(data) > cap:
            return _Bad("too_large", f"over max_file_bytes {cap}")
        return data

    def _pair(self, locator: str, rel: str, caption: str, extra: str | None) -> dict[str, Any]:
        image_format = IMAGE_FORMATS.get(rel.rpartition(".")[2].lower())
        if image_format is None and self._inside(rel) is not None:  # a path leaving: missing_image
            return self.dropped_row(locator, "malformed_row", f"{rel!r} has no image extension "
                                    f"({', '.join(IMAGE_FORMATS)})", caption=caption, extra=extra)
        data = self._read(rel)
        if isinstance(data, _Bad):
            return self.dropped_row(locator, data.code, f"{rel}: {data}", caption=caption, extra=extra)
        return {
            "id": f"{self.name}:{locator}",
            "url": None,
            "caption": caption,
            "image": data,
            "image_format": image_format,
            "image_sha256": image_digest(data),
            "image_nbytes": len(data),
            "extra": extra,
        }


def _join(rel_dir: str, name: str) -> str:
    return name if rel_dir == "." else f"{rel_dir}/{name}"
