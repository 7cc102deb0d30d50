"""Blocklists from local files: a record, or an image of a document, that a list names is dropped
with code `blocklisted`, detail `"<list file name>: <entry matched>"`, and counted per list file
(`stages.<name>.counts.<list file name>` in the manifest).

- `url_blocklist` (a Filter for pairs, docs and texts; place it before `download`, so nothing
  listed is fetched): `domains` files (a domain blocks itself and every subdomain: `example.com`
  blocks `cdn.example.com`, not `notexample.com`; hosts are lower-cased, IDNA-encoded, the trailing
  dot removed) and `urls` files (compared after `normalize_url`: scheme and host lower-cased, the
  default port and the fragment dropped). A pair's or a text's `url`, or a doc's page `url`, drops
  the record; a doc's image segment whose URL is listed is removed (recorded in `segment_drops`),
  and a doc left with no segment is dropped (`empty_document`), as the per-image stages do.
- `hash_blocklist` (per image, pairs and docs): `sha256` and `md5` files of hex digests (a line may
  be `sha256sum` output: the first word counts). It hashes the image bytes as they are where it
  sits: right after `download`, the bytes as fetched (what published hash lists name); after
  `image`, the stored, re-encoded bytes. To check both, put the kind twice with two `name`s.
  A row with no image bytes yet passes.

A list file is UTF-8, one entry a line; blank lines and `#` comments are skipped. The recipe load
streams each file once (a missing file, a malformed line with its number, a file with no entry, a
stage with no list fail there) and keeps only the path. Each worker process reads the files again
in `setup()` into a `KeySet` of fixed-width digests (domains and URLs as 16-byte BLAKE2b, a false
match needs a 128-bit collision): per million entries 24 MB for domains, URLs and MD5 lists and
40 MB for SHA-256 lists, where Python sets of the lines take 95-150 MB; loading takes a few
seconds per million lines. As with eval sets, a list's content is not part of the recipe hash:
give a changed list a new path.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import numpy as np
from pydantic import AfterValidator, Field, model_validator

from curate.documents import EMPTY_DOCUMENT, is_empty, load_segments, remove_segments
from curate.stages.base import Drop, Filter, StageConfig, register
from curate.stages.exact_dedup import normalize_url

log = logging.getLogger("mm1.curate")

BLOCKLISTED = "blocklisted"
TEXT_KEY_BYTES = 16  # BLAKE2b digest of a domain or URL entry
DIGEST_BYTES = {"sha256": 32, "md5": 16}
_HOSTNAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_HEX = re.compile(r"[0-9a-fA-F]+")


# ---------------------------------------------------------------------------------------------
# Entries: names and digests as the lists and the rows both see them
# ---------------------------------------------------------------------------------------------


def normalize_domain(name: str) -> str:
    """A host as domain lists compare it: lower-cased, the trailing dot removed, IDNA's ASCII
    form (`Bücher.de.` -> `xn--bcher-kva.de`); a name IDNA cannot encode stays lower-cased."""
    name = name.strip().lower().rstrip(".")
    if name.isascii():  # IDNA leaves ASCII labels as they are; its codec is the slow part
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def url_host(url: Any) -> str | None:
    """The normalised host of a URL, None when it has none (`file:///x`) or does not parse."""
    if not isinstance(url, str):
        return None
    try:
        host = urlsplit(url.strip()).hostname
    except ValueError:
        return None
    return normalize_domain(host) if host else None


def host_suffixes(host: str) -> list[str]:
    """The names a domain list may hold to block `host`, most specific first:
    `a.b.example.com` -> itself, `b.example.com`, `example.com`, `com`. An IP address only as a whole."""
    if _ip_literal(host):
        return [host]
    labels = host.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


def text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=TEXT_KEY_BYTES).digest()


def parse_domain(line: str) -> str:
    """A domain list line -> the normalised domain (`*.` or `.` before it allowed: still the domain
    and its subdomains); ValueError when it is no host name or IP address."""
    entry = line.split("#", 1)[0].strip()
    entry = normalize_domain(entry[2:] if entry.startswith("*.") else entry.lstrip("."))
    if not (_HOSTNAME.fullmatch(entry) or _ip_literal(entry)):
        raise ValueError("not a domain name")
    return entry


def check_url_entry(line: str) -> str:
    """A URL list line as it is; ValueError when it is no URL."""
    if not _URL.fullmatch(line):
        raise ValueError("not a URL (scheme://..., no spaces)")
    return line


def parse_url_entry(line: str) -> str:
    """A URL list line -> the URL normalised as rows' URLs are (`check_url_entry` first)."""
    return normalize_url(check_url_entry(line)) or line


def digest_parser(kind: str) -> Callable[[str], bytes]:
    """A `kind` (sha256, md5) list line -> the digest's bytes; the first word of the line counts."""
    width = DIGEST_BYTES[kind]

    def parse(line: str) -> bytes:
        word = line.split()[0]
        if len(word) != 2 * width or not _HEX.fullmatch(word):
            raise ValueError(f"not a {kind} hex digest ({2 * width} hex digits)")
        return bytes.fromhex(word)

    return parse


# ---------------------------------------------------------------------------------------------
# List files
# ---------------------------------------------------------------------------------------------


def list_name(path: str) -> str:
    """How details and counts name a list: its file name."""
    return Path(path).name


def read_entries(path: str, parse: Callable[[str], Any]) -> Iterator[Any]:
    """The parsed entries of a list file, streamed. ValueError naming the file (and the line) when
    it is missing, not UTF-8, or a line does not parse."""
    p = Path(path)
    if not p.is_file():
        tried = "" if p.is_absolute() else f" ({p.absolute()})"
        raise ValueError(f"blocklist {path}{tried}: no such file")
    with p.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(f"blocklist {path}: line {n} is not UTF-8") from None
            if not line or line.startswith("#"):
                continue
            try:
                yield parse(line)
            except ValueError as exc:
                raise ValueError(f"blocklist {path}: line {n}: {exc} (got {line[:80]!r})") from None


def check_list(path: str, parse: Callable[[str], Any]) -> str:
    """Stream the whole file through `parse` (keeping nothing): a recipe names only usable lists.
    About a second per million lines."""
    if not sum(1 for _ in read_entries(path, parse)):
        raise ValueError(f"blocklist {path}: no entries (only blank and # lines)")
    return path


class KeySet:
    """A read-only set of fixed-width byte keys in two numpy arrays: the keys sorted by their first
    8 bytes, and those 8 bytes as big-endian integers for a binary search. `width + 8` bytes a
    key, against ~100 for a Python set of bytes."""

    def __init__(self, keys: bytes | bytearray, width: int):
        if width < 8 or len(keys) % width:
            raise ValueError(f"keys of {width} bytes: got {len(keys)} bytes")
        rows = np.frombuffer(keys, dtype=np.uint8).reshape(-1, width)
        prefix = rows[:, :8].copy().view(">u8").ravel().astype(np.uint64)
        order = np.argsort(prefix)
        self.rows, self.prefix = rows[order], prefix[order]

    def __len__(self) -> int:
        return len(self.prefix)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.prefix.nbytes

    def __contains__(self, key: bytes) -> bool:
        head = np.uint64(int.from_bytes(key[:8], "big"))
        i = int(np.searchsorted(self.prefix, head))
        while i < len(self.prefix) and self.prefix[i] == head:  # more than one only on a shared prefix
            if self.rows[i].tobytes() == key:
                return True
            i += 1
        return False


def load_keys(path: str, keys: Iterator[bytes], width: int) -> KeySet:
    packed = bytearray()
    for key in keys:  # packed as they stream: no list of a million bytes objects on the way
        packed += key
    found = KeySet(packed, width)
    log.info("blocklist %s: %d entries, %.1f MB", path, len(found), found.nbytes / 1e6)
    return found


def _distinct_names(paths: list[str]) -> None:
    names = [list_name(p) for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two lists share the file name {twice[0]!r}: counts and drop details name a list "
                         "by its file name, so give each list of a stage its own")


# ---------------------------------------------------------------------------------------------
# url_blocklist
# ---------------------------------------------------------------------------------------------

DomainList = Annotated[str, AfterValidator(lambda p: check_list(p, parse_domain))]
UrlList = Annotated[str, AfterValidator(lambda p: check_list(p, check_url_entry))]  # normalising never fails


class UrlBlocklistConfig(StageConfig):
    kind: Literal["url_blocklist"] = "url_blocklist"
    domains: list[DomainList] = Field(default_factory=list)  # files: a domain a line (and its subdomains)
    urls: list[UrlList] = Field(default_factory=list)  # files: a URL a line

    @model_validator(mode="after")
    def _some_list(self) -> UrlBlocklistConfig:
        if not self.domains and not self.urls:
            raise ValueError("url_blocklist needs at least one list file: `domains` or `urls`")
        _distinct_names(self.domains + self.urls)
        return self


@register
class UrlBlocklist(Filter):
    """Drops records (and removes doc image segments) whose URL or domain a list names."""

    name = "url_blocklist"
    Config = UrlBlocklistConfig
    config: UrlBlocklistConfig
    kinds = ("pair", "doc", "text")

    def setup(self) -> None:
        def keys(path: str, parse: Callable[[str], str]) -> KeySet:
            return load_keys(path, (text_key(e) for e in read_entries(path, parse)), TEXT_KEY_BYTES)

        self.domain_lists = [(list_name(p), keys(p, parse_domain)) for p in self.config.domains]
        self.url_lists = [(list_name(p), keys(p, parse_url_entry)) for p in self.config.urls]

    def match(self, url: Any) -> tuple[str, str] | None:
        """(list name, entry) of the first list that names `url` or its domain, else None."""
        if not isinstance(url, str) or not url.strip():
            return None
        host = url_host(url) if self.domain_lists else None
        for suffix in host_suffixes(host) if host else []:
            key = text_key(suffix)
            for name, keys in self.domain_lists:
                if key in keys:
                    return name, suffix
        normal = normalize_url(url) if self.url_lists else None
        if normal:
            key = text_key(normal)
            for name, keys in self.url_lists:
                if key in keys:
                    return name, normal
        return None

    def _blocked(self, url: Any) -> str | None:
        """The drop detail when `url` is listed (counted under its list), else None."""
        hit = self.match(url)
        if hit is None:
            return None
        self.count(hit[0])
        return f"{hit[0]}: {hit[1]}"

    def check(self, row: dict[str, Any]) -> Drop | None:
        if (detail := self._blocked(row.get("url"))) is not None:
            return Drop(BLOCKLISTED, detail)
        if self.batch_kind != "doc":
            return None
        gone: dict[int, tuple[str, str]] = {}
        for i, seg in enumerate(load_segments(row)):
            if seg.get("type") == "image" and (detail := self._blocked(seg.get("url"))) is not None:
                gone[i] = (BLOCKLISTED, detail)
        remove_segments("doc", row, gone, self.name)  # the images go, the document stays
        if gone and is_empty("doc", row):
            return Drop(EMPTY_DOCUMENT, "every segment removed")
        return None


# ---------------------------------------------------------------------------------------------
# hash_blocklist
# ---------------------------------------------------------------------------------------------

Sha256List = Annotated[str, AfterValidator(lambda p: check_list(p, digest_parser("sha256")))]
Md5List = Annotated[str, AfterValidator(lambda p: check_list(p, digest_parser("md5")))]


class HashBlocklistConfig(StageConfig):
    kind: Literal["hash_blocklist"] = "hash_blocklist"
    sha256: list[Sha256List] = Field(default_factory=list)  # files: a hex digest a line
    md5: list[Md5List] = Field(default_factory=list)

    @model_validator(mode="after")
    def _some_list(self) -> HashBlocklistConfig:
        if not self.sha256 and not self.md5:
            raise ValueError("hash_blocklist needs at least one list file: `sha256` or `md5`")
        _distinct_names(self.sha256 + self.md5)
        return self


@register
class HashBlocklist(Filter):
    """Drops images whose bytes, as they are at this point of the recipe, a digest list names."""

    name = "hash_blocklist"
    Config = HashBlocklistConfig
    config: HashBlocklistConfig
    kinds = ("pair", "doc")
    per_image = True  # on docs: each image, a listed one removes its segment

    def setup(self) -> None:
        self.lists: list[tuple[str, str, KeySet]] = []
        for kind, paths in (("sha256", self.config.sha256), ("md5", self.config.md5)):
            for p in paths:
                self.lists.append((list_name(p), kind,
                                   load_keys(p, read_entries(p, digest_parser(kind)), DIGEST_BYTES[kind])))

    def check(self, row: dict[str, Any]) -> Drop | None:
        data = row.get("image")
        if data is None:  # not fetched yet: nothing to hash
            return None
        digests: dict[str, bytes] = {}
        for name, kind, keys in self.lists:
            if kind not in digests:
                digests[kind] = hashlib.new(kind, data, usedforsecurity=False).digest()
            if digests[kind] in keys:
                self.count(name)
                return Drop(BLOCKLISTED, f"{name} ({kind}): {digests[kind].hex()}")
        return None
