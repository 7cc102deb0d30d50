"""The storage seam: where curated data lives (a local folder or an fsspec URL) and how it is read.

Curate (its steps, sources and retry rounds), train (the shard reader) and tools (stats, report,
verify; these two through `curate.contract`) read through here; writing and publishing are the
commit protocol's (curate/engine/commit.py), which builds on these locations.

- Locations: `location` turns a local path or an fsspec URL into a path object (`pathlib.Path`,
  or a `upath.UPath` on a store); `is_url` tells them apart (file:// is local). `inside` (a path
  object) and `join` (a string, spelled as the output was given) put a name from a manifest under
  an output, refusing one that would leave it; `relative` is their inverse.
- Reads: `read_table` (a parquet file or a folder of them), `parquet_file`, `read_schema`,
  `read_range` (bytes [start, end) of a file), `read_json`, `open_read`, `exists`, and listings
  (`parquet_files`, `list_names`, `missing_files`: one listing per folder, never one request per
  file).
- On a store every read is retried on a transient error (`is_transient_error`: a connection reset,
  a timeout, a 5xx, 408 or 429) with bounded exponential backoff, counted in `RETRIES` by what was
  read and logged rate-limited. When the tries run out it raises `StoreUnavailable` naming the URL:
  a store that stays down stops the caller; it is not a bad sample. A missing object is not
  transient. Local reads are never retried.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from http.client import IncompleteRead as HTTPIncompleteRead
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

# a listing cache would let one process miss what another just wrote (s3fs caches listings)
STORE_OPTIONS = {"use_listings_cache": False}

# Transient store errors: tries per read, and the backoff between them (doubling from
# RETRY_FIRST_S up to RETRY_MAX_S, each wait scaled by a random 0.5-1 so that a thousand workers
# do not come back in step). 6 tries wait at most 0.25 + 0.5 + 1 + 2 + 4 = 7.75 s: a blip (a load
# balancer dropping connections, a burst of 503 SlowDown) clears within that, and every training
# rank waits on a stalled worker at its next collective, so a longer outage is better ended: it
# stops the run (StoreUnavailable), which resumes from its checkpoint. These tries come on top of
# the client's own (botocore: 5 attempts a call by default; s3fs: a few for dropped connections).
RETRY_ATTEMPTS = 6
RETRY_FIRST_S = 0.25
RETRY_MAX_S = 4.0

_T = TypeVar("_T")


class StoreUnavailable(OSError):
    """The object store kept failing one read (RETRY_ATTEMPTS tries of transient errors): an
    infrastructure failure that stops the caller, never a bad sample. Names the URL and the last
    error (also its `__cause__`)."""


class RateLimitedLog:
    """Logs the first `first` events of each reason, then every `every`-th (a bad shard of 10,000
    samples must not flood the log)."""

    def __init__(self, logger: logging.Logger, first: int = 10, every: int = 1000):
        self.logger, self.first, self.every = logger, first, every
        self.seen: Counter[str] = Counter()

    def __call__(self, reason: str, msg: str, *args: Any) -> None:
        self.seen[reason] += 1
        n = self.seen[reason]
        if n <= self.first or n % self.every == 0:
            self.logger.warning(f"[{reason} #{n}] " + msg, *args)


RETRIES: Counter[str] = Counter()  # transient store errors retried by this process, by read ("range", ...)
retry_log = RateLimitedLog(log, first=10, every=100)  # where `retrying` reports (a test may swap it)
_jitter = random.Random()  # its own generator: a training's seeded `random` state stays untouched
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


# ---------------------------------------------------------------------------------------------
# Transient store errors
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _client_errors() -> tuple[type[BaseException], ...]:
    """The HTTP clients' transient errors that are not OSErrors, as they come out of s3fs and the
    other fsspec backends. Read against a failing server (tools/servers/s3.py `FlakyProxy`, botocore's
    retries off): aiohttp re-sends a GET or HEAD once after a reset connection; a second reset
    comes out of s3fs as botocore's EndpointConnectionError (a botocore ConnectionError, not an
    OSError, and not retried by s3fs); a 5xx comes out as an OSError caused by a ClientError
    (`_http_status`). Each client is an optional dependency: imported here, when first needed."""
    found: list[type[BaseException]] = []
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError  # refused, reset, connect timeout
        from botocore.exceptions import HTTPClientError  # connection closed mid-answer, read timeout
        from botocore.parsers import ResponseParserError  # a throttling proxy's garbled answer (as s3fs)

        found += [BotoConnectionError, HTTPClientError, ResponseParserError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError  # gcsfs, adlfs, http; a body cut short

        found += [ClientConnectionError, ClientPayloadError]
    except ImportError:
        pass
    try:
        from urllib3.exceptions import IncompleteRead, ProtocolError  # botocore's synchronous client

        found += [IncompleteRead, ProtocolError]
    except ImportError:
        pass
    return (*found, HTTPIncompleteRead)


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of a botocore ClientError that is `exc` or caused it (s3fs turns a
    ClientError into an OSError with the ClientError as its cause), else None."""
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
    return None


def is_transient_error(exc: BaseException) -> bool:
    """Whether another try may succeed: a 5xx, 408 or 429 answer; a connection error or timeout
    (ConnectionError, TimeoutError, the HTTP clients' own); any other OSError but a missing file,
    a permission refused or a path of the wrong type (a 404 stays a 404)."""
    if isinstance(exc, (StoreUnavailable, *_PERMANENT)):
        return False
    status = _http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    return isinstance(exc, (OSError, *_client_errors()))  # ConnectionError, TimeoutError are OSErrors


def retrying(what: str, url: str, call: Callable[[], _T]) -> _T:
    """`call()`, tried again after a transient store error (`is_transient_error`), RETRY_ATTEMPTS
    tries in all with exponential backoff; each retry is counted in `RETRIES[what]` and logged
    (rate-limited). Any other error propagates at once. When every try failed, raises
    StoreUnavailable naming `url`, the tries and the last error."""
    start = time.monotonic()
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - sorted by is_transient_error; the rest re-raised as is
            if not is_transient_error(exc):
                raise
            status = _http_status(exc)
            error = f"{type(exc).__name__}: {exc}" + (f" (HTTP {status})" if status else "")
            if attempt == RETRY_ATTEMPTS:
                raise StoreUnavailable(f"{url}: the store failed {attempt} tries in {time.monotonic() - start:.1f}s "
                                       f"({what}); last error: {error}") from exc
            wait = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (attempt - 1)) * _jitter.uniform(0.5, 1.0)
            RETRIES[what] += 1
            retry_log("store_retry", "%s %s: %s; try %d of %d in %.2fs", what, url, error, attempt + 1,
                      RETRY_ATTEMPTS, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Locations
# ---------------------------------------------------------------------------------------------


def is_url(path: Any) -> bool:
    """An fsspec URL of a store (not a plain path, not file://)."""
    if isinstance(path, Path):
        return False
    if hasattr(path, "protocol"):  # a UPath
        return getattr(path, "protocol") not in ("", "file", "local")
    s = str(path)
    return "://" in s and not s.startswith("file://")


def location(path: Any, **storage_options: Any) -> Path:
    """A local path as a `pathlib.Path`, an fsspec URL as a `upath.UPath` (same operators: `/`,
    `.name`, `.parent`, `.exists()`, `.open()`, `.iterdir()`, `.rglob()`)."""
    if is_url(path):
        if hasattr(path, "protocol"):
            return path
        from upath import UPath  # with fsspec (and asyncio): 0.2 s of import, paid only for a URL

        return UPath(str(path), **{**STORE_OPTIONS, **storage_options})
    s = str(path)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def check_url(url: str) -> None:
    """Fail now, with what to install, when no fsspec implementation serves `url`'s protocol or
    it cannot be written to."""
    import fsspec  # 0.2 s of import (asyncio), paid only for a URL

    protocol = str(url).split("://", 1)[0]
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ValueError(f"{url!r}: no fsspec filesystem is known for {protocol}://") from None
    except ImportError as exc:
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol)
        hint = f" (pip install 'mm1-pipeline[{extra}]')" if extra else ""
        raise ValueError(f"{url!r}: {protocol}:// needs a package that is not installed{hint}: {exc}") from None
    if protocol in ("http", "https") or getattr(cls, "read_only", False):
        raise ValueError(f"{url!r}: {protocol}:// cannot be written to")


def relative(path: Any, root: Any) -> str:
    """`path` under `root` as a posix relative name (what markers and the manifest record)."""
    p, r = str(path).rstrip("/"), str(root).rstrip("/")
    if not p.startswith(r + "/"):
        raise ValueError(f"{path} is not under {root}")
    return p[len(r) + 1:]


def _checked(out: Any, name: str) -> str:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"{out}: manifest names {name!r}, outside the output folder")
    return rel.as_posix()


def inside(out: Any, name: str) -> Path:
    """`out / name` (a local path, or a UPath on an object store), refusing a name from a
    manifest that would leave the output folder (ValueError naming both)."""
    return location(out) / _checked(out, name)


def join(out: Any, name: str) -> str:
    """`out/name` as a string, `out` spelled as given (a URL stays a URL, file:// included);
    refuses a name that would leave the output folder, as `inside` does."""
    rel, out = _checked(out, name), str(out)
    if "://" in out:
        return out.rstrip("/") + "/" + rel
    return str(Path(out) / rel)


def fs_path(path: Any) -> tuple[str, Any]:
    """(path, filesystem) for pyarrow and fsspec: the filesystem is None on a local disk."""
    if is_url(path):
        return path.path, path.fs
    return str(path), None


def dask_url(path: Any) -> tuple[str, dict[str, Any]]:
    """(url, storage_options) for dask's read_parquet / to_parquet."""
    if is_url(path):
        return str(path), dict(getattr(path, "storage_options", {}) or {})
    return str(path), {}


def _on_store(path: Any) -> tuple[Any, str] | None:
    """(filesystem, path on it) of a store's object or folder; None for a local one. A UPath
    keeps its own filesystem (and options); a URL string gets fsspec's for its protocol."""
    if not is_url(path):
        return None
    if hasattr(path, "fs"):
        return path.fs, path.path
    import fsspec  # 0.2 s of import (asyncio), paid only for a URL

    return fsspec.core.url_to_fs(str(path))


# ---------------------------------------------------------------------------------------------
# Reads
# ---------------------------------------------------------------------------------------------


def read_table(path: Any, columns: list[str] | None = None, *, what: str = "table") -> pa.Table:
    """A parquet file or a folder of them (hive `key=value` folders are not turned into columns).
    `what` names the read in `RETRIES` and the log ("sidecar", ...)."""
    store = _on_store(path)
    if store is None:
        return pq.read_table(str(location(path)), columns=columns, partitioning=None)
    fs, where = store
    return retrying(what, str(path), lambda: pq.read_table(where, columns=columns, filesystem=fs, partitioning=None))


def parquet_file(path: Any) -> pq.ParquetFile:
    """One parquet file opened for its metadata and batches (its footer read, retried on a store;
    the batches read later are not)."""
    store = _on_store(path)
    if store is None:
        return pq.ParquetFile(location(path))
    fs, where = store

    def read() -> pq.ParquetFile:
        f = fs.open(where, "rb")
        try:
            return pq.ParquetFile(f)
        except BaseException:
            f.close()
            raise

    return retrying("parquet", str(path), read)


def read_schema(path: Any) -> pa.Schema:
    store = _on_store(path)
    if store is None:
        return pq.read_schema(location(path))
    fs, where = store

    def read() -> pa.Schema:
        with fs.open(where, "rb") as f:
            return pq.read_schema(f)

    return retrying("schema", str(path), read)


def read_json(path: Any, *, what: str = "json") -> Any:
    """A JSON document (the manifest, a marker, sizes.json). FileNotFoundError when it is not there."""
    store = _on_store(path)
    if store is None:
        return json.loads(location(path).read_text())
    fs, where = store

    def read() -> Any:
        with fs.open(where, "rb") as f:
            return json.load(f)

    return retrying(what, str(path), read)


def read_range(path: Any, start: int, end: int, *, what: str = "range") -> bytes:
    """Bytes [start, end) of a file; fewer when the file is shorter (the caller checks). One
    request on a store."""
    store = _on_store(path)
    if store is None:
        with open(location(path), "rb") as f:
            f.seek(start)
            return f.read(end - start)
    fs, where = store

    def read() -> bytes:
        size = fs.size(where)  # some backends refuse a range past the end instead of shortening it
        return fs.cat_file(where, start=min(start, size), end=min(end, size)) if start < size else b""

    return retrying(what, str(path), read)


def open_read(path: Any) -> BinaryIO:
    """A file opened for reading (the open retried on a store; the reads that follow are not)."""
    store = _on_store(path)
    if store is None:
        return open(location(path), "rb")
    fs, where = store
    return retrying("open", str(path), lambda: fs.open(where, "rb"))


def exists(path: Any) -> bool:
    store = _on_store(path)
    if store is None:
        return location(path).exists()
    fs, where = store
    return retrying("exists", str(path), lambda: fs.exists(where))


# listings ------------------------------------------------------------------------------------


def parquet_files(folder: Any) -> list[Any]:
    """The parquet files under a folder, recursively, sorted (none when it does not exist)."""
    folder = location(folder) if not hasattr(folder, "rglob") else folder

    def listing() -> list[Any]:
        if not folder.exists():
            return []
        return sorted((f for f in folder.rglob("*.parquet")), key=str)

    return listing() if not is_url(folder) else retrying("listing", str(folder), listing)


def list_names(folder: Any) -> set[str]:
    """The names directly in `folder`, as the store has them now (no listing cache); empty when
    it does not exist."""
    store = _on_store(folder)
    try:
        if store is None:
            with os.scandir(location(folder)) as entries:
                return {e.name for e in entries}
        fs, where = store

        def listing() -> set[str]:
            fs.invalidate_cache(where)  # what is there now, not what this process saw before
            return {p.rstrip("/").rpartition("/")[2] for p in fs.ls(where, detail=False)}

        return retrying("listing", str(folder), listing)
    except (FileNotFoundError, NotADirectoryError):
        return set()


def missing_files(out: str, names: list[str]) -> list[str]:
    """Those of `names` (files relative to the output `out`) that it lacks, from one listing per
    folder (`list_names`), never one request per file. A folder that does not exist lacks all its
    files."""
    folders: dict[str, list[str]] = {}
    for name in names:
        folders.setdefault(name.rpartition("/")[0], []).append(name)
    missing = []
    for folder, files in folders.items():
        present = list_names(join(out, folder) if folder else out)
        missing += [f for f in files if f.rpartition("/")[2] not in present]
    return missing
