"""Existing WebDataset tars, such as img2dataset's output (`00000.tar`: KEY.jpg KEY.txt KEY.json).

Each tar is streamed with the stdlib `tarfile` (never extracted, never seeked), and consecutive
members sharing a key (webdataset's rule: the name up to the first dot of its base name) form
one sample. The sample's image is the first of `image_extensions` present; its caption the
`caption_extension` member (utf-8, bad bytes replaced), else the `.json`'s "caption". A `.json`
object gives the `url` and, minus url/caption/key, the `extra` column. Other members are not
carried. A parquet beside the tar (img2dataset's) is not read: the `.json` has the same facts.

Sample ids are `"<source name>:<tar>/<key>"`, where `<tar>` is the tar's path relative to the
common folder of all the source's tars (its file name when they share one folder). A key seen
again later in the same tar gets `#<member ordinal>` appended, so no id appears twice.

Tars are untrusted: a member that is not a regular file (symlink, hard link, device, folder) or
whose name is absolute or holds `..` is never read and becomes a dropped row `unsafe_member`
(id `"<name>:<tar>/<member name>"`). Damage (a truncated or corrupt tar, including a header that
tarfile would silently take for the end) keeps the samples completed before it and adds one
dropped row `read_error` with id `"<name>:<tar>#error"`; the sample being read at the damage is
named in that row's detail, not kept. Other drop codes: `missing_image`, `no_caption`,
`too_large` (a member over `max_member_bytes`, never read into memory).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from typing import IO, Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator

from curate.contract import image_digest
from curate.storage import is_url
from curate.sources.base import Partition, Source, SourceConfig, fingerprint, register
from curate.sources.remote import file_facts, input_labels, open_input, remote_matches
from curate.sources.image_folder import IMAGE_FORMATS, MiB

KEY_RULE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
DAMAGE = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


class WebDatasetConfig(SourceConfig):
    kind: Literal["webdataset"] = "webdataset"
    path: str | list[str]  # a folder (its *.tar), a glob, or a list of them / of tar paths; tars
    # may be gzip, bzip2 or xz compressed (name them by glob: a folder lists *.tar only)
    shards_per_partition: int = Field(1, gt=0)
    image_extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")  # in priority order
    caption_extension: str = "txt"
    max_member_bytes: int = Field(64 * MiB, gt=0)

    @field_validator("image_extensions")
    @classmethod
    def _known_images(cls, exts: tuple[str, ...]) -> tuple[str, ...]:
        exts = tuple(e.lower().lstrip(".") for e in exts)
        unknown = [e for e in exts if e not in IMAGE_FORMATS]
        if unknown or not exts:
            raise ValueError(f"image extensions {unknown or exts} not among {sorted(IMAGE_FORMATS)}")
        return exts


@register
class WebDatasetSource(Source):
    Config = WebDatasetConfig
    record_kind = "pair"
    config: WebDatasetConfig

    def tars(self) -> list[str]:
        """The tar paths, in order: each pattern's matches sorted, patterns in the given order."""
        patterns = [self.config.path] if isinstance(self.config.path, str) else self.config.path
        found: list[str] = []
        for pattern in patterns:
            if is_url(pattern):  # on an object store (curate/sources/remote.py)
                matches, _ = remote_matches(pattern, ("*.tar",))
            elif os.path.isdir(pattern):
                matches = sorted(glob.glob(os.path.join(glob.escape(pattern), "*.tar")))
            elif glob.has_magic(pattern):
                matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            else:
                matches = [pattern] if os.path.isfile(pattern) else []
            if not matches:
                raise FileNotFoundError(f"source {self.name!r}: no tar shards at {pattern!r}")
            found += [m for m in matches if m not in found]
        return found

    def partitions(self) -> list[Partition]:
        tars = self.tars()
        if len({is_url(t) for t in tars}) > 1:
            raise ValueError(f"source {self.name!r}: mixes local tars and URLs; give it one or the other")
        labelled = [[t, label] for t, label in zip(tars, input_labels(tars))]
        n = self.config.shards_per_partition
        parts = []
        for i in range(0, len(labelled), n):
            chunk = labelled[i : i + n]
            facts = [[t, *file_facts(t)] for t, _ in chunk]
            parts.append(Partition(self.name, len(parts), {"tars": chunk}, fingerprint(facts)))
        return parts

    def read(self, partition: Partition, batch_size: int) -> Iterator[pa.Table]:
        rows = (row for path, label in partition.payload["tars"] for row in self._tar_rows(path, label))
        return self.batches(rows, batch_size)

    # one tar -----------------------------------------------------------------------------------

    def _tar_rows(self, path: str, label: str) -> Iterator[dict[str, Any]]:
        seen: set[str] = set()

        def locator(name: str, ordinal: int) -> str:
            loc = f"{label}/{_printable(name)}"
            loc = f"{loc}#{ordinal}" if loc in seen else loc
            seen.add(loc)
            return loc

        key, members, first = None, {}, 0  # the sample being gathered
        try:
            with open_input(path) as raw, _decompressed(raw) as plain:
                stream = _Tail(plain)
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for ordinal, member in enumerate(tar):
                        tar.members = []  # stream mode would keep every header otherwise
                        unsafe = _unsafe(member)
                        if unsafe:
                            yield self.dropped_row(locator(member.name, ordinal), "unsafe_member",
                                                   f"{_printable(member.name)!r}: {unsafe}")
                            continue
                        match = KEY_RULE.match(member.name)
                        name_key, ext = (match[1], match[2].lower()) if match else (member.name, "")
                        if name_key != key or ext in members:  # a repeated member starts a new sample
                            if key is not None:
                                yield self._sample(locator(key, first), members)
                            key, members, first = name_key, {}, ordinal
                        too_big = member.size > self.config.max_member_bytes
                        members[ext] = member.size if too_big else tar.extractfile(member).read()
                    if not stream.ended_cleanly(tar.offset):
                        raise tarfile.ReadError(f"no end-of-archive block at byte {tar.offset}: truncated "
                                                "or a corrupt header")
        except DAMAGE as exc:
            lost = f"; sample {key!r} at the damage was not kept" if key is not None else ""
            yield self.dropped_row(f"{label}#error", "read_error", f"{type(exc).__name__}: {exc}{lost}")
            return
        if key is not None:
            yield self._sample(locator(key, first), members)

    def _sample(self, locator: str, members: dict[str, bytes | int]) -> dict[str, Any]:
        """One pair row (or dropped row) from a sample's members; an int stands for a member too
        large to read (its size)."""
        big = {ext: size for ext, size in members.items() if isinstance(size, int)}
        if big:
            return self.dropped_row(locator, "too_large", f"members over max_member_bytes "
                                    f"{self.config.max_member_bytes}: {big}")
        meta = _json_object(members.get("json"))
        url = meta.pop("url", None)
        url = url if isinstance(url, str) else None
        caption = meta.pop("caption", None)
        meta.pop("key", None)
        if self.config.caption_extension in members:
            caption = members[self.config.caption_extension].decode("utf-8", "replace")
        ext = next((e for e in self.config.image_extensions if e in members), None)
        if ext is None:
            return self.dropped_row(locator, "missing_image", f"members {sorted(members)}, none of "
                                    f"{list(self.config.image_extensions)}", url=url)
        if not isinstance(caption, str) or not caption.strip():
            return self.dropped_row(locator, "no_caption", f"no .{self.config.caption_extension} member "
                                    "and no json caption, or an empty one", url=url)
        image = members[ext]
        return {
            "id": f"{self.name}:{locator}",
            "url": url,
            "caption": caption.strip(),
            "image": image,
            "image_format": IMAGE_FORMATS[ext],
            "image_sha256": image_digest(image),
            "image_nbytes": len(image),
            "extra": json.dumps(meta, sort_keys=True, ensure_ascii=False) if meta else None,
        }


class _Tail:
    """Reads through a stream, keeping its last bytes, to look at the block that ended a tar.

    tarfile takes a missing, truncated or corrupt header after the first member for the end of
    the archive; a real end is a zero block. tarfile's stream reads at most one buffer (10 KiB)
    past that block, so keeping 64 KiB always holds it.
    """

    KEEP = 64 * 1024

    def __init__(self, fh: IO[bytes]):
        self.fh = fh
        self.pos = 0  # bytes handed out so far
        self.tail = bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.pos += len(data)
        self.tail += data
        del self.tail[: -self.KEEP]
        return data

    def ended_cleanly(self, offset: int) -> bool:
        start = offset - (self.pos - len(self.tail))
        block = self.tail[start : start + tarfile.BLOCKSIZE] if start >= 0 else b""
        return len(block) == tarfile.BLOCKSIZE and not any(block)


def _decompressed(raw: IO[bytes]) -> IO[bytes]:
    """The tar bytes of `raw`: gzip, bzip2 and xz are undone here, so `_Tail` sees the tar."""
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw)
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


def _unsafe(member: tarfile.TarInfo) -> str | None:
    """Why a member must not be read, or None."""
    if member.issym() or member.islnk():
        return f"a link to {_printable(member.linkname)!r}"
    if not member.isreg():
        return "a folder" if member.isdir() else "not a regular file"
    name = member.name
    if name.startswith("/") or ".." in name.split("/"):
        return "a path leaving the archive"
    if "\0" in name or name != _printable(name):
        return "a name that is not valid UTF-8"
    return None


def _printable(name: str) -> str:
    """tarfile decodes names with surrogateescape; ids must be valid UTF-8."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _json_object(data: bytes | int | None) -> dict[str, Any]:
    if not isinstance(data, bytes):
        return {}
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
