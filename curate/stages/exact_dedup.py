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

import numpy as np
import pandas as pd

from curate.contract import DUPLICATE
from curate.stages.base import GlobalStage, StageConfig, register

DEFAULT_PORTS: dict[str, str] = {"http": "80", "https": "443", "ws": "80", "wss": "443", "ftp": "21"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


# Input partitions per output partition of the digest shuffle. p2p frames every (input, output)
# pair's shard on its own: with as many outputs as inputs (10,000 rows each) a 10M-row pass wrote
# 1M shards of ~10 rows and 4.3x the bytes of its data to disk (2.6 GB for 0.6), and its time per
# row grew 1.4x from 1M to 10M rows (tools/bench/global_passes.py). Ten inputs per output: a
# tenth of the shards, ~100,000 rows (4 MB) an output.
SHUFFLE_GROUP = 10


def shuffle_partitions(inputs: int, group: int) -> int:
    """The output partitions of a shuffle of `inputs` partitions into one per `group` of them."""
    return max(1, -(-inputs // group))


def key_digest(part: pd.DataFrame, key: str) -> pd.DataFrame:
    """`part`'s (id, _partition) with `key` replaced by a 128-bit digest of it: `_k1`, `_k2`, two
    64-bit hashes under different keys (pandas' SipHash: the same in every process). Two
    different keys share a digest with probability about n^2 / 2^129: never, at any size a
    cluster holds."""
    values = part[key].astype(object)
    return pd.DataFrame({
        "id": part["id"], "_partition": part["_partition"],
        "_k1": pd.util.hash_array(values.to_numpy(), hash_key="mm1-dedup-key-01").view(np.int64),
        "_k2": pd.util.hash_array(values.to_numpy(), hash_key="mm1-dedup-key-02").view(np.int64),
    }, index=part.index)


def _smallest_id_drops(part: pd.DataFrame, detail: str) -> pd.DataFrame:
    """The decisions of one shuffled partition (every key's rows are in it): in each group of
    equal digests, every row but the smallest id."""
    ranked = part.sort_values(["_k1", "_k2", "id"], kind="stable", ignore_index=True)
    k1, k2 = ranked["_k1"].to_numpy(), ranked["_k2"].to_numpy()
    first = np.ones(len(ranked), dtype=bool)
    first[1:] = (k1[1:] != k1[:-1]) | (k2[1:] != k2[:-1])
    ids = ranked["id"].to_numpy(dtype=object)
    kept = ids[np.flatnonzero(first)[np.cumsum(first) - 1]]
    dups = ~first
    return pd.DataFrame({
        "id": pd.Series(ids[dups], dtype=part["id"].dtype),
        "_partition": ranked["_partition"].to_numpy()[dups],
        "drop_reason": pd.Series(DUPLICATE, index=range(int(dups.sum())), dtype=part["id"].dtype),
        "drop_detail": pd.Series([f"{detail} {k}" for k in kept[dups]], dtype=part["id"].dtype),
    })


def keep_smallest_id(live: Any, key: str, detail: str) -> Any:
    """The drop decisions of a dedup on `key`: in every group of rows with equal, non-null `key`,
    all but the smallest `id`, with detail `"<detail> <kept id>"`. `live` is a dask dataframe
    with at least `id`, `_partition` and `key`; the result has the GlobalStage decision columns.

    One shuffle of (id, partition, 128-bit digest of the key) on the digest, then each shuffled
    partition decides its groups alone: a group-by-min and a join back (three shuffles, the key
    strings in each) took 225 s for 1M URLs on 2 workers (tools/bench/global_passes.py)."""
    live = live[live[key].notnull()][["id", "_partition", key]]
    n = shuffle_partitions(live.npartitions, SHUFFLE_GROUP)
    meta = pd.DataFrame({"id": pd.Series(dtype=live.dtypes["id"]),
                         "_partition": pd.Series(dtype=live.dtypes["_partition"]),
                         "_k1": pd.Series(dtype=np.int64), "_k2": pd.Series(dtype=np.int64)})
    digests = live.map_partitions(key_digest, key, meta=meta).shuffle(on="_k1", npartitions=n)
    text = live.dtypes["id"]  # object on pandas 2, str on pandas 3
    out = pd.DataFrame({"id": pd.Series(dtype=text), "_partition": pd.Series(dtype=live.dtypes["_partition"]),
                        "drop_reason": pd.Series(dtype=text), "drop_detail": pd.Series(dtype=text)})
    return digests.map_partitions(_smallest_id_drops, detail, meta=out)


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
