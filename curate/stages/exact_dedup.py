"""Exact deduplication as global passes through Dask: of image bytes, and of URLs.

Both group rows by a key and keep, within a group, the row with the smallest `id`, whatever the
partitioning or worker count, so the result is deterministic; the others are dropped with code
`duplicate` and the kept id in the detail. Only (id, partition, key) move through the shuffle,
never image bytes, and nothing is collected on the client. Rows whose key is null take no part.

- `exact_dedup` keys on `image_sha256` (which the sources and the image stage keep equal to the
  hash of the current image bytes).
- `url_dedup` keys on the url after a light normalisation (`normalize_url`): URLs that name the
  same resource by the letter of RFC 3986's case and port rules collapse, nothing more; it runs
  before a download, so the same image is not fetched twice.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from curate.contract import DUPLICATE
from curate.stages.base import GlobalStage, StageConfig, register

DEFAULT_PORTS: dict[str, str] = {"http": "80", "https": "443", "ws": "80", "wss": "443", "ftp": "21"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def keep_smallest_id(live: Any, key: str, detail: str) -> Any:
    """The drop decisions of a dedup on `key`: in every group of rows with equal, non-null `key`,
    all but the smallest `id`, with detail `"<detail> <kept id>"`. `live` is a dask dataframe
    with at least `id`, `_partition` and `key`; the result has the GlobalStage decision columns."""
    live = live[live[key].notnull()][["id", "_partition", key]]
    groups = max(1, live.npartitions)
    kept = live.groupby(key)["id"].min(split_out=groups).rename("kept_id").reset_index()
    joined = live.merge(kept, on=key, how="inner", npartitions=groups)
    dups = joined[joined["id"] != joined["kept_id"]]
    dups = dups.assign(drop_reason=DUPLICATE, drop_detail=f"{detail} " + dups["kept_id"])
    return dups[["id", "_partition", "drop_reason", "drop_detail"]]


@register
class ExactDedup(GlobalStage):
    """Drops pairs whose image bytes are identical to a pair with a smaller id (a global pass)."""

    name = "exact_dedup"
    kinds = ("pair",)
    columns: ClassVar[list[str]] = ["image_sha256"]

    class Config(StageConfig):
        kind: Literal["exact_dedup"] = "exact_dedup"

    def decide(self, live: Any) -> Any:
        return keep_smallest_id(live, "image_sha256", "same image bytes as")


def normalize_url(url: Any) -> str | None:
    """The url as url_dedup compares it: surrounding whitespace stripped, the fragment dropped,
    the scheme and host lower-cased and the scheme's default port (http 80, https 443, ...)
    dropped. User info, path and query are kept as they are (a path's case matters on most
    servers, and a query may be signed). A blank or missing url becomes None (no key: never a
    duplicate). Pure and total: any string maps to a string.

        HTTP://Example.COM:80/A?b=1#top  ->  http://example.com/A?b=1
    """
    if not isinstance(url, str):
        return None
    url = url.strip().partition("#")[0]
    if not url:
        return None
    match = _SCHEME.match(url)
    if not match:
        return url
    scheme, rest = match.group(1).lower(), url[match.end():]
    if not rest.startswith("//"):
        return f"{scheme}:{rest}"
    end = next((i for i, ch in enumerate(rest[2:], 2) if ch in "/?"), len(rest))
    authority, tail = rest[2:end], rest[end:]
    userinfo, at, hostport = authority.rpartition("@")
    bracket = hostport.rfind("]")  # an IPv6 literal holds colons of its own
    host, colon, port = hostport.rpartition(":") if hostport.rfind(":") > bracket else (hostport, "", "")
    if colon and port in ("", DEFAULT_PORTS.get(scheme)):
        colon = port = ""
    return f"{scheme}://{userinfo}{at}{host.lower()}{colon}{port}{tail}"


@register
class UrlDedup(GlobalStage):
    """Drops rows whose url names the same resource as a row with a smaller id."""

    name = "url_dedup"
    kinds = ("pair",)
    columns: ClassVar[list[str]] = ["url"]

    class Config(StageConfig):
        kind: Literal["url_dedup"] = "url_dedup"

    def decide(self, live: Any) -> Any:
        keyed = live.assign(url_key=live["url"].map(normalize_url, meta=("url_key", "object")))
        return keep_smallest_id(keyed.drop(columns=["url"]), "url_key", "same url as")
