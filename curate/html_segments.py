"""HTML page -> interleaved segments (OBELICS-style), as a pure function of the page's bytes.

`extract(html, url, charset, options)` returns an `Extracted` (the doc's segments in reading order,
the page title, the declared language, the codec used) or a `Rejected` (`not_html`,
`empty_document` or `parse_error`, and a detail). It never raises on bad input: hostile bytes are a
rejection or a best-effort document. Segments follow curate/documents.py before images are
fetched: `{"type": "text", "text": ...}` per paragraph-like block (or per run of blocks between two
images with `ExtractOptions.merge_paragraphs`) and `{"type": "image", "url": ..., "alt": ...}` per
kept http(s) `<img>`, in reading order. The parser resolves no entity and opens no network.

The rules and why (decoding, what is not HTML, the parser's limits, the boilerplate removed,
blocks, image addresses, title and language): docs/html_extraction.md.

The stage (curate/stages/html_extract.py) runs this in a child process with a timeout and a memory
limit; `serve` below is that child's loop (run as `python -m curate.html_segments`).
"""

from __future__ import annotations

import codecs
import json
import re
import resource
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, NamedTuple
from urllib.parse import urljoin, urlsplit

from lxml import etree

from curate.documents import dump_json

NOT_HTML = "not_html"
EMPTY_DOCUMENT = "empty_document"
PARSE_ERROR = "parse_error"

SNIFF_BYTES = 4096
MAX_URL_CHARS = 2048
MAX_TITLE_CHARS = 1000

_BINARY_SIGNATURES: tuple[tuple[bytes, str], ...] = (  # tried in this order
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"%PDF-", "PDF"), (b"PK\x03\x04", "ZIP"), (b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
    (b"(\xb5/\xfd", "zstd"), (b"7z\xbc\xaf\x27\x1c", "7z"), (b"\x00\x00\x01\x00", "ICO"), (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"), (b"OggS", "Ogg"), (b"ID3", "MP3"), (b"\x7fELF", "ELF"), (b"wOFF", "WOFF"),
    (b"wOF2", "WOFF2"),
)
_BOMS: tuple[tuple[bytes, str], ...] = (  # UTF-32 first: its LE mark starts with UTF-16's
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xfe\xff", "utf-16-be"),
    (b"\xff\xfe", "utf-16-le"),
)
_META_CHARSET = re.compile(rb"""<meta[^>]{0,512}?charset\s*=\s*["']?\s*([a-z0-9_.:-]{1,40})""", re.I)
# Python codecs that decode bytes to text but are no web charset: a page may not pick them.
_NOT_CHARSETS = {"utf-7", "idna", "punycode", "undefined", "charmap", "unicode-escape", "raw-unicode-escape",
                 "unicode_escape", "raw_unicode_escape", "utf-16", "utf-16-le", "utf-16-be", "utf-32",
                 "utf-32-le", "utf-32-be"}
_LATIN1_LABELS = {"latin-1", "iso8859-1", "ascii"}  # browsers read these labels as windows-1252
# C0 controls but tab, LF, CR, FF (and DEL): never text, and NUL breaks libxml2's C strings.
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f]")
_DOCTYPE_SUBSET = re.compile(r"<!doctype[^\[>]{0,1000}\[", re.I)
_LANG_TAG = re.compile(r"^[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*$")
_TOKEN = re.compile(r"[a-z0-9]+")

SKIP_TAGS = frozenset({
    "script", "style", "noscript", "template", "iframe", "frame", "frameset", "svg", "math", "form",
    "button", "select", "option", "textarea", "input", "nav", "header", "footer", "aside", "object",
    "embed", "canvas", "audio", "video", "dialog", "head", "map", "applet",
})
BLOCK_TAGS = frozenset({
    "p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "dl", "dt", "dd", "table",
    "thead", "tbody", "tfoot", "tr", "td", "th", "caption", "blockquote", "pre", "section",
    "article", "main", "figure", "figcaption", "hr", "address", "center", "details", "summary",
    "fieldset", "legend", "body", "html", "hgroup", "listing", "plaintext", "xmp", "menu",
})
KEEP_ALWAYS = frozenset({"html", "body", "main", "article"})
BOILERPLATE_WORDS = frozenset({
    "nav", "navbar", "navigation", "menu", "menubar", "footer", "sidebar", "cookie", "cookies",
    "consent", "banner", "advert", "advertisement", "advertising", "ads", "ad", "adsense", "sponsor",
    "sponsored", "promo", "share", "sharing", "social", "comment", "comments", "breadcrumb",
    "breadcrumbs", "popup", "modal", "newsletter", "subscribe", "related", "widget", "pagination",
    "pager", "toolbar", "masthead", "skiplink",
})
_PREFIX_WORDS = tuple(sorted(w for w in BOILERPLATE_WORDS if len(w) >= 6))
BOILERPLATE_ROLES = frozenset({"navigation", "banner", "contentinfo", "complementary", "search", "menu",
                               "menubar", "dialog", "alertdialog"})
LAZY_SRC_ATTRIBUTES = ("data-src", "data-lazy-src", "data-original")
_BREAK = "\x00"  # a line-break mark: NUL never reaches the text (removed with the controls)


@dataclass(frozen=True)
class ExtractOptions:
    """How segments are cut. Part of what determines the output (a stage config carries it)."""

    merge_paragraphs: bool = False  # blocks between two images form one text segment ("\n\n")


class Extracted(NamedTuple):
    segments: list[dict[str, str]]
    title: str | None
    lang: str | None
    encoding: str  # the codec the bytes were decoded with


class Rejected(NamedTuple):
    """A page that yields no document: a stable drop code (`NOT_HTML`, `EMPTY_DOCUMENT`,
    `PARSE_ERROR`) and the specifics. The stage turns it into a `Drop`."""

    reason: str
    detail: str = ""


# ---------------------------------------------------------------------------------------------
# Bytes -> text
# ---------------------------------------------------------------------------------------------


def binary_kind(data: bytes) -> str | None:
    """Why `data` is clearly no HTML or text (a signature, NUL bytes), or None."""
    for signature, name in _BINARY_SIGNATURES:
        if data.startswith(signature):
            return f"{name} signature"
    if data[:12].startswith(b"RIFF") and data[8:12] in (b"WEBP", b"WAVE", b"AVI "):
        return f"RIFF {data[8:12].decode().strip()} signature"
    if data[4:12] in (b"ftypavif", b"ftypheic", b"ftypisom", b"ftypmp42"):
        return f"{data[8:12].decode()} signature"
    head = data[:1024]
    if b"\x00" in head and not any(data.startswith(bom) for bom, name in _BOMS if "16" in name or "32" in name):
        return "NUL bytes in the first 1024 bytes"
    return None


def _charset(label: str | None) -> str | None:
    """A usable Python codec name for a charset label, or None."""
    if not label:
        return None
    try:
        info = codecs.lookup(label.strip().strip("\"'").lower())
    except (LookupError, ValueError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_CHARSETS:
        return None
    return "cp1252" if info.name in _LATIN1_LABELS else info.name


def meta_charset(data: bytes) -> str | None:
    """The charset label a `<meta>` in the first `SNIFF_BYTES` declares, if any."""
    found = _META_CHARSET.search(data[:SNIFF_BYTES])
    return found.group(1).decode("ascii") if found else None


def decode_html(data: bytes, hint: str | None = None) -> tuple[str, str]:
    """(text, codec used): the order is in docs/html_extraction.md ("Decoding"). Never raises."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            return data.decode(name, errors="replace").lstrip("\ufeff"), name
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    for declared in (_charset(hint), _charset(meta_charset(data))):
        if declared and declared != "utf-8":
            try:
                return data.decode(declared, errors="replace"), declared
            except Exception:  # a codec that fails even with errors="replace": next candidate
                continue
        if declared == "utf-8":
            break
    return data.decode("utf-8", errors="replace"), "utf-8"


def _cut_internal_subset(text: str) -> str:
    """Remove a DOCTYPE's internal subset (`<!DOCTYPE x [ ... ]>`), where entities are declared."""
    found = _DOCTYPE_SUBSET.search(text, 0, SNIFF_BYTES)
    if not found:
        return text
    end = text.find("]>", found.end())
    if end < 0:
        end = text.find(">", found.end())
        return text[: found.start()] if end < 0 else text[: found.start()] + text[end + 1 :]
    return text[: found.start()] + text[end + 2 :]


# ---------------------------------------------------------------------------------------------
# DOM -> segments
# ---------------------------------------------------------------------------------------------


def _parser() -> Any:
    # etree's parser, not lxml.html's: same libxml2 parser, without lxml.html's per-element
    # Python class lookup (a fifth of the walk's time)
    return etree.HTMLParser(encoding="utf-8", no_network=True, remove_comments=True, remove_pis=True,
                                huge_tree=False, recover=True, default_doctype=False)


def _is_boilerplate(el: Any, tag: str) -> bool:
    if "hidden" in el.attrib or (el.get("aria-hidden") or "").strip().lower() == "true":
        return True
    style = el.get("style")
    if style:
        compact = style.replace(" ", "").lower()
        if "display:none" in compact or "visibility:hidden" in compact:
            return True
    role = el.get("role")
    if role and role.strip().lower() in BOILERPLATE_ROLES:
        return True
    if tag in KEEP_ALWAYS:
        return False
    for value in (el.get("class"), el.get("id")):
        if not value:
            continue
        for token in _TOKEN.findall(value.lower()):
            if token in BOILERPLATE_WORDS or token.startswith(_PREFIX_WORDS):
                return True
    return False


def _declared_tiny(el: Any) -> bool:
    for attribute in ("width", "height"):
        value = (el.get(attribute) or "").strip().lower().removesuffix("px").strip()
        try:
            if value and float(value) <= 1:
                return True
        except ValueError:
            continue
    return False


def _largest_srcset(srcset: str) -> str | None:
    best, best_size = None, -1.0
    for candidate in srcset.split(","):
        parts = candidate.strip().split()
        if not parts:
            continue
        size = 1.0
        if len(parts) > 1 and parts[1][-1:] in ("w", "x"):
            try:
                size = float(parts[1][:-1])
            except ValueError:
                size = 1.0
        if size > best_size:
            best, best_size = parts[0], size
    return best


def _web_url(candidate: str | None, base: str | None) -> str | None:
    """`candidate` resolved against `base`, if the result is an http(s) URL; else None."""
    if not candidate:
        return None
    candidate = candidate.strip()
    if not candidate or candidate[:5].lower() == "data:" or any(ord(c) < 32 for c in candidate):
        return None
    try:
        resolved = urljoin(base or "", candidate)
        parts = urlsplit(resolved)
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc or len(resolved) > MAX_URL_CHARS:
        return None
    return resolved


def _image_url(el: Any, base: str | None) -> str | None:
    src = el.get("src")
    if src and not src.strip().lower().startswith("data:"):
        return _web_url(src, base)
    for attribute in LAZY_SRC_ATTRIBUTES:
        if el.get(attribute):
            return _web_url(el.get(attribute), base)
    srcset = el.get("srcset") or el.get("data-srcset")
    return _web_url(_largest_srcset(srcset), base) if srcset else None


def _collapse(text: str) -> str:
    """Whitespace runs -> one space, ends stripped; control characters (a `&#1;` reference
    brings them back after decoding) removed."""
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    return " ".join(text.split())


def _clean_paragraph(text: str) -> str:
    """`_collapse`, line by line at the line-break marks; empty lines out."""
    if _BREAK not in text:
        return _collapse(text)
    lines = (_collapse(line) for line in text.split(_BREAK))
    return "\n".join(line for line in lines if line)


class _Segmenter:
    """Collects paragraphs and images in reading order while the DOM is walked."""

    def __init__(self, merge_paragraphs: bool):
        self.merge = merge_paragraphs
        self.segments: list[dict[str, str]] = []
        self.pieces: list[str] = []
        self.pre = 0  # depth inside <pre>

    def text(self, value: str | None) -> None:
        if value:
            if self.pre:  # keep its lines: newlines become line-break marks
                value = value.replace("\r\n", "\n").replace("\r", "\n").replace("\n", _BREAK)
            self.pieces.append(value)

    def line_break(self) -> None:
        self.pieces.append(_BREAK)

    def flush(self) -> None:
        if not self.pieces:
            return
        paragraph = _clean_paragraph("".join(self.pieces))
        self.pieces = []
        if not paragraph:
            return
        last = self.segments[-1] if self.segments else None
        if self.merge and last is not None and last["type"] == "text":
            last["text"] += "\n\n" + paragraph
        else:
            self.segments.append({"type": "text", "text": paragraph})

    def image(self, url: str, alt: str) -> None:
        self.flush()
        self.segments.append({"type": "image", "url": url, "alt": alt})


def _title(root: Any) -> str | None:
    head = root.find("head")
    candidates = [head.find(".//title")] if head is not None else []
    candidates.append(root.find(".//title"))
    for title in candidates:
        if title is not None:
            text = _collapse("".join(title.itertext()))[:MAX_TITLE_CHARS]
            return text or None
    return None


def _lang(root: Any) -> str | None:
    for attribute in ("lang", "xml:lang", "{http://www.w3.org/XML/1998/namespace}lang"):
        value = (root.get(attribute) or "").strip().replace("_", "-")
        if value and _LANG_TAG.match(value):
            return value
    return None


def _base_url(root: Any, url: str | None) -> str | None:
    for base in root.iter("base"):
        href = base.get("href")
        if href:
            resolved = _web_url(href, url)
            return resolved or url
    return url


def segments_of(root: Any, base: str | None, options: ExtractOptions) -> list[dict[str, str]]:
    """Walk the parsed DOM in document order (iteratively: no recursion limit) into segments."""
    body = root.find("body")
    start = body if body is not None else root
    out = _Segmenter(options.merge_paragraphs)
    walker = etree.iterwalk(start, events=("start", "end"))
    skipped: set[Any] = set()
    for event, el in walker:
        tag = el.tag if isinstance(el.tag, str) else None
        if event == "start":
            if tag is None or tag in SKIP_TAGS or _is_boilerplate(el, tag):
                skipped.add(el)
                walker.skip_subtree()
                continue
            if tag == "img":
                if not _declared_tiny(el):
                    src = _image_url(el, base)
                    if src:
                        out.image(src, _collapse(el.get("alt") or ""))
                continue
            if tag == "br":
                out.line_break()
                continue
            if tag in BLOCK_TAGS:
                out.flush()
            if tag in ("pre", "listing", "plaintext", "xmp"):
                out.pre += 1
            out.text(el.text)
        else:
            if el in skipped:
                skipped.discard(el)
            elif tag in BLOCK_TAGS:
                if tag in ("pre", "listing", "plaintext", "xmp"):
                    out.pre -= 1
                out.flush()
            if el is not start:
                out.text(el.tail)
    out.flush()
    return out.segments


def extract(html: bytes, url: str | None, charset: str | None = None,
            options: ExtractOptions | None = None) -> Extracted | Rejected:
    """The segments, title and language of one page, or why there is no document. Pure: the
    result depends on the arguments only; never raises on bad input (a parser failure is
    `parse_error` with the message). Runs in a sandboxed child in the pipeline (the stage);
    the rules: docs/html_extraction.md."""
    options = options or ExtractOptions()
    why = binary_kind(html)
    if why:
        return Rejected(NOT_HTML, why)
    text, encoding = decode_html(html, charset)
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    text = _cut_internal_subset(text)
    if not text.strip():
        return Rejected(EMPTY_DOCUMENT, "no text and no image")
    try:
        root = etree.fromstring(text.encode("utf-8"), parser=_parser())
    except (etree.ParserError, etree.XMLSyntaxError) as exc:
        if "empty" in str(exc).lower():
            return Rejected(EMPTY_DOCUMENT, "no text and no image")
        return Rejected(PARSE_ERROR, f"{type(exc).__name__}: {exc}"[:500])
    if root is None:
        return Rejected(EMPTY_DOCUMENT, "no text and no image")
    segments = segments_of(root, _base_url(root, url), options)
    if not segments:
        return Rejected(EMPTY_DOCUMENT, "no text and no image")
    return Extracted(segments, _title(root), _lang(root), encoding)


# ---------------------------------------------------------------------------------------------
# The sandboxed child: `python -m curate.html_segments READ_FD WRITE_FD MAX_MEMORY_MB`
# ---------------------------------------------------------------------------------------------
# Protocol, one request at a time, over two pipes, JSON and raw bytes only (the parent never
# unpickles what the child, which parses hostile input, sends back):
#   child  -> parent  b'{"ready": true}' once, after the memory limit is set
#   parent -> child   a JSON header {"url", "charset", "merge_paragraphs"}, then the page bytes
#   child  -> parent  a JSON header {"title", "lang", "encoding"} then the segments' JSON, or
#                     a JSON header {"reason", "detail"} alone (a rejection). A `parse_error`
#                     (the parser failed, an exception, MemoryError) carries "restart": true and
#                     the child exits after it: a failed child is never reused.


def _peak_mib() -> str:
    """The child's peak address space (what RLIMIT_AS bounds), for a parse_error's detail."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmPeak:"):
                    return f"{int(line.split()[1]) // 1024} MiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def serve(read_fd: int, write_fd: int, max_memory_mb: int) -> None:
    """The child's loop: extract pages until the parent closes the pipe (then exit). After a
    parse error it answers and exits, so the next page gets a fresh address space."""
    _parser()  # lxml loaded before the limit: the limit is for the pages
    if max_memory_mb > 0:
        limit = max_memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    requests, replies = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    replies.send_bytes(b'{"ready": true}')
    while True:
        try:
            header = json.loads(requests.recv_bytes())
            page = requests.recv_bytes()
        except (EOFError, OSError):
            return
        failure = None
        try:
            result = extract(page, header.get("url"), header.get("charset"),
                             ExtractOptions(merge_paragraphs=bool(header.get("merge_paragraphs"))))
            if isinstance(result, Rejected) and result.reason == PARSE_ERROR:
                failure = result.detail
            elif isinstance(result, Rejected):
                replies.send_bytes(json.dumps({"reason": result.reason, "detail": result.detail}).encode())
            else:
                body = dump_json(result.segments).encode("utf-8", errors="replace")  # a lone surrogate: "?"
                replies.send_bytes(json.dumps({"title": result.title, "lang": result.lang,
                                               "encoding": result.encoding}).encode())
                replies.send_bytes(body)
        except MemoryError:
            failure = "MemoryError"
        except Exception as exc:  # a library failure on this page: the page's drop
            failure = f"{type(exc).__name__}: {exc}"[:500]
        if failure is not None:
            result = page = body = None  # free what can be freed before answering
            detail = f"{failure} (child peak {_peak_mib()}, max_memory_mb {max_memory_mb})"
            replies.send_bytes(json.dumps({"reason": PARSE_ERROR, "restart": True, "detail": detail}).encode())
            return


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
