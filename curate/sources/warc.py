"""Web pages from WARC files (record kind `doc`): Common Crawl's, a crawler's, `wget --warc-file`'s.

`path` names the files: a WARC file, a folder (its `*.warc` and `*.warc.gz`, not recursive), a
glob, or a list of them, merged and sorted; `files_per_partition` files make a partition, whose
fingerprint covers each file's label, size and mtime. Files are streamed record by record with
warcio's archive iterator (plain, or gzip compressed per record as the WARC standard
recommends); nothing is seeked and no payload is held beyond `max_record_bytes`. Only WARC is
read: an ARC file (the older format) is a `read_error`, since guessing ARC would take any text
line of five words for a record.

**Inputs** are the `response` and `resource` records: each yields exactly one row, with the id
`"<source name>:<file>#<byte offset of the record>"` (`<file>`: the path relative to the common
folder of the source's files; the offset is where the record, or its gzip member, starts: what a
CDX index names). `warcinfo`, `request`, `metadata`, `revisit` (a pointer to an earlier payload,
no page of its own) and `conversion` records are not inputs: they describe or repeat pages.

A kept row has `url` (WARC-Target-URI), `html` (the HTTP payload: de-chunked, its
Content-Encoding gzip/deflate/br undone, at most `max_record_bytes` after decoding), `charset`
(the Content-Type header's, null when absent: a hint, the bytes decide) and `extra` (the WARC
record id and date; `warc_truncated` when the crawler marked the payload cut short, which is kept:
the start of a page is still a page). A `resource` record has no HTTP header: its WARC
Content-Type is the page's.

Drop codes (stage "source"), each row still carrying its url:
- `http_<status>`: a response whose HTTP status is not 200 (redirects too: the detail names the
  Location; the crawl holds the target as a record of its own, if it fetched it);
- `not_html`: a Content-Type outside `html_content_types` (the type is in the detail), or no
  Content-Type and a payload that does not start like HTML;
- `too_large`: a payload over `max_record_bytes` after decoding (read no further than that);
- `bad_content`: a Content-Encoding that is unknown or does not decode (the downloader's code
  for the same failure), or a compressed payload that stops early without WARC-Truncated;
- `malformed_record`: no WARC-Target-URI, or an HTTP response that cannot be parsed.

**Damage.** A truncated or corrupt file (a record shorter than its Content-Length, a gzip member
that does not decode, a header warcio cannot parse, bytes between records where the next record
should start, a gzip file that is not compressed per record) keeps the records completed before
the damage and adds one row dropped as `read_error` with the id `"<source name>:<file>#error"`,
its detail naming the exception and the byte offset where the last whole record ended; the
record being read at the damage is not kept. warcio could skip some malformed headers (it
resynchronises on the next blank line); we stop instead: once framing is lost, what looks like
the next header may be payload bytes, and a record made of them would be an input that never
was. A record without a Content-Length, or with one that is not a number, is damage too (its
end cannot be known), and so are bytes after the last record that do not form one (a file cut
inside the next record's first bytes). A file cut between two records, or inside a record's
closing blank lines or gzip trailer, reads as a shorter whole file: no page in it was lost.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from typing import IO, Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator
from warcio.archiveiterator import WARCIterator
from warcio.bufferedreaders import ChunkedDataReader
from warcio.exceptions import ArchiveLoadFailed
from warcio.limitreader import LimitReader
from warcio.recordloader import ArcWarcRecord
from warcio.statusandheaders import StatusAndHeaders, StatusAndHeadersParser, StatusAndHeadersParserException

from curate.sources.base import SOURCE_STAGE, Partition, Source, SourceConfig, fingerprint, register
from curate.sources.files import find_files, json_object, labels
from curate.sources.remote import file_facts, open_input

try:  # Content-Encoding: br needs a brotli binding; without one such pages are `bad_content`
    import brotli
except ImportError:  # pragma: no cover - brotli comes with the bench extras (resiliparse)
    brotli = None

MiB = 1 << 20
INPUT_TYPES = ("response", "resource")
FOLDER_PATTERNS = ("*.warc", "*.warc.gz")
READ_BLOCK = 64 * 1024
HEAD_LINE_BYTES = 64 * 1024
HTML_SNIFF = (b"<!doctype html", b"<html", b"<head", b"<body")

NOT_HTML = "not_html"
TOO_LARGE = "too_large"
BAD_CONTENT = "bad_content"
MALFORMED_RECORD = "malformed_record"
READ_ERROR = "read_error"

_HTTP_HEAD = StatusAndHeadersParser(["HTTP/1.0", "HTTP/1.1"], verify=False)  # HTTP/2 heads too
DAMAGE = (ArchiveLoadFailed, StatusAndHeadersParserException, EOFError, OSError, zlib.error)


class WarcConfig(SourceConfig):
    kind: Literal["warc"] = "warc"
    path: str | list[str] = Field(min_length=1)  # a file, a folder, a glob, or a list of them
    files_per_partition: int = Field(1, gt=0)
    max_record_bytes: int = Field(16 * MiB, gt=0)  # a payload's cap after decoding
    html_content_types: tuple[str, ...] = ("text/html", "application/xhtml+xml")

    @field_validator("html_content_types")
    @classmethod
    def _lower(cls, types: tuple[str, ...]) -> tuple[str, ...]:
        types = tuple(t.strip().lower() for t in types)
        if not types or not all("/" in t for t in types):
            raise ValueError(f"html_content_types must be media types such as 'text/html', got {types}")
        return types


class _Damage(Exception):
    """The file's framing is lost here; nothing after it can be trusted."""


class _Drop(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@register
class WarcSource(Source):
    Config = WarcConfig
    record_kind = "doc"
    requires_stages = ("html_extract",)
    config: WarcConfig

    def partitions(self) -> list[Partition]:
        files = find_files(self.name, self.config.path, FOLDER_PATTERNS)
        labelled = [[str(f), label] for f, label in zip(files, labels(files))]
        n = self.config.files_per_partition
        parts = []
        for i in range(0, len(labelled), n):
            chunk = labelled[i : i + n]
            facts = [[label, *file_facts(f)] for f, label in chunk]
            parts.append(Partition(self.name, len(parts), {"files": chunk}, fingerprint(facts)))
        return parts

    def read(self, partition: Partition, batch_size: int) -> Iterator[pa.Table]:
        rows = (row for path, label in partition.payload["files"] for row in self._file_rows(path, label))
        return self.batches(rows, batch_size)

    # one file ----------------------------------------------------------------------------------

    def _file_rows(self, path: str, label: str) -> Iterator[dict[str, Any]]:
        end = 0  # where the last whole record ended
        try:
            with open_input(path) as fh:
                records = WARCIterator(fh, no_record_parse=True)  # WARC only: never guess ARC
                for record in records:
                    _framed(record)
                    row = self._input(record) if record.rec_type in INPUT_TYPES else None
                    offset, length = records.get_record_offset(), records.get_record_length()
                    _complete(record, offset, records.err_count)
                    end = offset + length
                    if row is not None:
                        yield {"id": f"{self.name}:{label}#{offset}", **row}
                _check_tail(fh, end)
        except (*DAMAGE, _Damage) as exc:
            detail = f"{type(exc).__name__}: {str(exc).strip()[:300]}; the last whole record ended at byte {end}"
            yield self.dropped_row(f"{label}#error", READ_ERROR, detail)

    def _input(self, record: ArcWarcRecord) -> dict[str, Any]:
        """The row of a response or resource record (without its id), dropped or not."""
        headers = record.rec_headers
        url = headers.get_header("WARC-Target-URI") or None
        facts = {"warc_record_id": headers.get_header("WARC-Record-ID"), "warc_date": headers.get_header("WARC-Date")}
        truncated = headers.get_header("WARC-Truncated")
        if truncated:
            facts["warc_truncated"] = truncated
        row: dict[str, Any] = {"url": url, "extra": json_object(facts)}
        try:
            if url is None:
                raise _Drop(MALFORMED_RECORD, f"a {record.rec_type} record without WARC-Target-URI")
            http = self._http(record)
            content_type = http.get_header("Content-Type") if http is not None else record.content_type
            media, charset = media_type(content_type)
            if media is not None and media not in self.config.html_content_types:
                raise _Drop(NOT_HTML, f"Content-Type {content_type!r}")
            html = self._payload(record, http, truncated)
            if media is None and not looks_like_html(html):
                raise _Drop(NOT_HTML, "no Content-Type, and the payload does not start like HTML")
        except _Drop as drop:
            return {**row, "drop_stage": SOURCE_STAGE, "drop_reason": drop.reason, "drop_detail": drop.detail}
        return {**row, "html": html, "charset": charset}

    def _http(self, record: ArcWarcRecord) -> StatusAndHeaders | None:
        """The HTTP response head of a response record, read off its block (None for a resource
        record, or a response to a dns:/whois: URI, whose WARC Content-Type tells what it is),
        once its status is known to be 200. warcio is not asked to parse it: it fails on a
        response record without a target URI instead of leaving that to us."""
        if record.rec_type != "response":
            return None
        uri = record.rec_headers.get_header("WARC-Target-URI") or ""
        if not uri.lower().startswith(("http:", "https:")):
            return None
        try:
            http = _HTTP_HEAD.parse(_CappedLines(record.raw_stream))
        except EOFError:
            raise _Drop(MALFORMED_RECORD, "a response record without an HTTP response in it") from None
        status = http.get_statuscode() or ""
        if not (http.protocol.upper().startswith("HTTP/") and len(status) == 3 and status.isdigit()):
            raise _Drop(MALFORMED_RECORD, f"HTTP status line {(http.protocol + ' ' + http.statusline)[:100]!r}")
        if status != "200":
            location = http.get_header("Location")
            detail = f"HTTP {http.statusline[:100]}" + (f", Location {location[:300]!r}" if location else "")
            raise _Drop(f"http_{status}", detail)
        return http

    def _payload(self, record: ArcWarcRecord, http: StatusAndHeaders | None, truncated: str | None) -> bytes:
        """The page's bytes: de-chunked and decoded, never more than `max_record_bytes`."""
        stream: IO[bytes] = record.raw_stream
        coding = None
        if http is not None:
            if "chunked" in (http.get_header("Transfer-Encoding") or "").lower():
                stream = ChunkedDataReader(stream)  # falls back to the raw bytes if not really chunked
            coding = (http.get_header("Content-Encoding") or "").strip().lower() or None
        cap = self.config.max_record_bytes
        decoder = BodyDecoder(coding, cap)
        body = bytearray()
        while block := stream.read(READ_BLOCK):
            body += decoder.feed(block)
            if len(body) > cap:
                raise _Drop(TOO_LARGE, f"payload over max_record_bytes {cap}"
                            + (f" after {coding} decoding" if decoder.coding else ""))
        if not decoder.finished() and not truncated:
            raise _Drop(BAD_CONTENT, f"the {coding} payload ends before its compressed stream does")
        return bytes(body)


class _CappedLines:
    """A record block whose lines are read at most `HEAD_LINE_BYTES` at a time: a header line
    without an end never fills memory (a longer one reads as several, and parses as junk)."""

    def __init__(self, stream: IO[bytes]):
        self.stream = stream

    def readline(self, length: int | None = None) -> bytes:
        return self.stream.readline(min(length or HEAD_LINE_BYTES, HEAD_LINE_BYTES))

    def read(self, length: int | None = None) -> bytes:
        return self.stream.read(length)


def _check_tail(fh: IO[bytes], end: int) -> None:
    """Damage unless the file ends where its last record does (a plain WARC may end in blank
    lines). warcio stops without a word at a gzip member that ends before its first record
    line, or at a cut between records' separators: the size tells."""
    size = fh.seek(0, os.SEEK_END)
    if size <= end:
        return
    fh.seek(0)
    gzipped = fh.read(2) == b"\x1f\x8b"
    fh.seek(end)
    rest = fh.read(min(size - end, 4096))
    if gzipped or size - end > len(rest) or rest.strip():
        raise _Damage(f"{size - end} bytes after the last whole record do not form a record "
                      "(a file cut inside a record's first bytes?)")


def _framed(record: ArcWarcRecord) -> None:
    """Damage unless the record states its length (warcio reads a missing one as "to the end of
    the file", a malformed one as 0)."""
    length = record.rec_headers.get_header("Content-Length")
    if length is None or not length.strip().isdigit():
        raise _Damage(f"a record header (WARC-Type {record.rec_type!r}) with Content-Length {length!r}, cut "
                      "short or malformed: where the record ends cannot be known")


def _complete(record: ArcWarcRecord, offset: int, err_count: int) -> None:
    """Damage unless the record (now read to its end) delivered all its Content-Length bytes and
    the next bytes were the blank lines that end a record."""
    stream = record.raw_stream
    if isinstance(stream, LimitReader) and stream.limit > 0:
        raise _Damage(f"the record at byte {offset} ends {stream.limit} bytes short of its Content-Length "
                      "(a truncated or corrupt file)")
    if err_count:
        raise _Damage(f"the record at byte {offset} is not followed by the blank lines that end a record "
                      "(a wrong Content-Length, or bytes between records)")


def media_type(content_type: str | None) -> tuple[str | None, str | None]:
    """(media type in lower case, charset) of a Content-Type value; (None, None) without one."""
    if not content_type or not content_type.strip():
        return None, None
    media, *params = content_type.split(";")
    charset = None
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip("\"'").strip() or None
    return media.strip().lower() or None, charset


def looks_like_html(data: bytes) -> bool:
    """Whether a payload without a Content-Type starts like an HTML page, after a BOM and blanks.
    Deliberately narrow: a page opening with a comment or an XML declaration needs its header."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf").lstrip().lower()
    return head.startswith(HTML_SNIFF)


class BodyDecoder:
    """Undoes an HTTP Content-Encoding (gzip, x-gzip, deflate in its zlib or raw form, br)
    incrementally, producing at most `limit` + 1 bytes in all whatever the input (zlib's
    max_length, brotli's output_buffer_limit): a compression bomb costs no more memory than an
    honest page. Raises `_Drop(bad_content)` for an unknown coding or bytes that do not decode."""

    _GZIP_WBITS = 16 + zlib.MAX_WBITS

    def __init__(self, coding: str | None, limit: int):
        coding = None if coding in (None, "identity") else coding
        if coding not in (None, "gzip", "x-gzip", "deflate", "br") or (coding == "br" and brotli is None):
            raise _Drop(BAD_CONTENT, f"unsupported Content-Encoding {coding[:60]!r}")
        self.coding, self.limit, self.total = coding, limit, 0
        self._z: Any = None  # created on the first bytes (deflate's form is told by them)

    def feed(self, data: bytes) -> bytes:
        if self.coding is None:
            self.total += len(data)
            return data
        try:
            out = self._brotli(data) if self.coding == "br" else self._zlib(data)
        except (zlib.error, getattr(brotli, "error", zlib.error)) as exc:
            raise _Drop(BAD_CONTENT, f"the {self.coding} payload does not decode: {exc}") from None
        self.total += len(out)
        return out

    def finished(self) -> bool:
        """Whether the compressed stream reached its end (always true for an identity payload)."""
        if self.coding is None:
            return True
        if self._z is None:  # an empty payload
            return False
        return self._z.is_finished() if self.coding == "br" else self._z.eof

    def _room(self) -> int:
        return self.limit + 1 - self.total

    def _zlib(self, data: bytes) -> bytes:
        if self._z is None:
            wbits = self._GZIP_WBITS if self.coding != "deflate" else _deflate_wbits(data)
            self._z = zlib.decompressobj(wbits)
        out = bytearray()
        while data and not self._z.eof and self._room() - len(out) > 0:  # max_length 0 means unbounded
            out += self._z.decompress(data, self._room() - len(out))
            data = self._z.unconsumed_tail
        return bytes(out)

    def _brotli(self, data: bytes) -> bytes:
        if self._z is None:
            self._z = brotli.Decompressor()
        out = bytearray(self._z.process(data, output_buffer_limit=self._room()))
        while not self._z.can_accept_more_data() and self._room() - len(out) > 0:
            out += self._z.process(b"", output_buffer_limit=self._room() - len(out))
        return bytes(out)


def _deflate_wbits(data: bytes) -> int:
    """HTTP's deflate is zlib-wrapped by the standard, raw deflate from some servers: a zlib
    stream opens with a header whose first byte names method 8 and whose 16 bits divide by 31."""
    if len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0:
        return zlib.MAX_WBITS
    return -zlib.MAX_WBITS
