"""What the fetcher reads from response headers, each answer bounded.

- `x_robots_opt_out`: whether X-Robots-Tag headers opt a resource out for our agent (noai,
  noimageai, noindex; `none` implies noindex), unscoped or scoped to our agent or `*`.
- `parse_retry_after`: Retry-After (delta-seconds or an HTTP-date) in seconds, capped at
  `RETRY_AFTER_CAP_S`, for the caller's retry policy.
- `ContentDecoder`: undoes a Content-Encoding (gzip, deflate, identity) incrementally without
  ever producing more than the body cap, so a compression bomb costs no more memory than an
  honest body; a broken or unsupported encoding raises `FetchFailure(BAD_CONTENT, ...)`.
"""

from __future__ import annotations

import datetime
import email.utils
import re
import time
import zlib
from collections.abc import Iterable

from curate.web.drops import BAD_CONTENT, FetchFailure, clean_text

RETRY_AFTER_CAP_S = 60.0  # a Retry-After longer than this is reported as this

# Directives that take a value after a colon: "max-snippet: 20" is a directive, not an agent scope.
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_AGENT_TOKEN = re.compile(r"[a-z0-9_.*-]+")
_NUMBER = re.compile(r"[+-]?[0-9]+")
_IMPLIED = {"none": ("noindex", "nofollow")}


def x_robots_opt_out(values: Iterable[str], agent: str, directives: Iterable[str]) -> str | None:
    """The first X-Robots-Tag directive among `values` (the headers' values, in order) that opts
    the resource out for `agent`, described for a ledger (`"noai"`, `"mm1-pipeline: noimageai"`,
    `"none" (implies noindex)`), or None.

    Each value is a comma-separated list of directives. `agent: directive` scopes that directive,
    and the ones after it in the same value, to one agent (until the next scope); unscoped
    directives apply to every agent. Only unscoped ones, ones scoped to `agent` and ones scoped to
    `*` count; names compare case-insensitively. `none` means "noindex, nofollow", so it opts out
    wherever `noindex` does."""
    agent = agent.strip().lower()
    wanted = [d.strip().lower() for d in directives]
    for value in values:
        scope: str | None = None
        for token in str(value).split(","):
            token = token.strip()
            head, colon, rest = token.partition(":")
            name = head.strip().lower()
            if (colon and name not in _VALUED_DIRECTIVES and _AGENT_TOKEN.fullmatch(name)
                    and not _NUMBER.fullmatch(rest.strip())):
                scope, token = name, rest.strip()  # "otherbot: noai": a new scope
                name = token.partition(":")[0].strip().lower()
            if not name or scope not in (None, "*", agent):
                continue
            named = (name, *_IMPLIED.get(name, ()))
            hit = next((d for d in wanted if d in named), None)
            if hit is not None:
                said = clean_text(f"{scope}: {name}" if scope else name, 80)
                return f'"{said}"' + (f" (implies {hit})" if hit != name else "")
    return None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After in seconds from now: delta-seconds or an HTTP-date (a date in the past is 0),
    at most RETRY_AFTER_CAP_S; None when absent or unparseable."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]+", value):
        seconds = float(int(value[:12]))
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:  # HTTP-dates are GMT
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


class ContentDecoder:
    """Undoes a Content-Encoding incrementally, never producing more than `limit` + 1 bytes in all
    (zlib's max_length), so a compression bomb costs no more memory than an honest body."""

    _WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

    def __init__(self, encoding: str | None, limit: int):
        self.encoding = (encoding or "identity").strip().lower() or "identity"
        self.limit, self.total = limit, 0
        self._z = None
        if self.encoding in self._WBITS:
            self._z = zlib.decompressobj(self._WBITS[self.encoding])
        elif self.encoding != "identity":
            raise FetchFailure(BAD_CONTENT, f"unsupported Content-Encoding {clean_text(self.encoding, 60)!r}")

    def feed(self, data: bytes) -> bytes:
        if self._z is None:
            self.total += len(data)
            return data
        out = bytearray()
        try:
            while data and self.total + len(out) <= self.limit:
                out += self._z.decompress(data, self.limit - self.total - len(out) + 1)
                data = self._z.unconsumed_tail
        except zlib.error as exc:
            raise FetchFailure(BAD_CONTENT, f"bad {self.encoding} body: {exc}") from None
        self.total += len(out)
        return bytes(out)

    def finish(self) -> None:
        if self._z is not None and not self._z.eof:
            raise FetchFailure(BAD_CONTENT, f"{self.encoding} body ends before its compressed stream does")
