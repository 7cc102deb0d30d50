"""The web client's drop codes and the exception that carries one.

A fetch that fails ends as a `FetchResult` whose `reason` is one of these short stable codes (the
`Drop` style of curate/stages/base.py), or `http_<status>` for a final status outside 2xx, or a
caller's gate code (robots.txt). Inside the client a failure travels as `FetchFailure(reason,
detail)` up to `Fetcher.fetch`, which turns it into that result; nothing outside the client sees
the exception. Details are deterministic (no object ids, no timings) and pass through
`clean_text`, so ledgers are reproducible and safe to print.
"""

from __future__ import annotations

import re

BAD_URL = "bad_url"
DNS_ERROR = "dns_error"
BLOCKED = "blocked"
TOO_MANY_REDIRECTS = "too_many_redirects"
TIMEOUT = "timeout"
TOO_LARGE = "too_large"
BAD_CONTENT = "bad_content"
CONNECTION_ERROR = "connection_error"
OPTED_OUT = "opted_out"


class FetchFailure(Exception):
    """A refused or failed request: `reason` is the drop code, `detail` the ledger's text."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def clean_text(text: object, limit: int = 200) -> str:
    """Untrusted or exception text made fit for a ledger: printable, bounded, no memory addresses."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(text))
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]
