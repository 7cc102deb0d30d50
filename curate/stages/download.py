"""Downloading the images of URL-list pairs: the I/O half of what img2dataset does.

Network I/O runs on a thread pool inside the task (`threads` requests in flight), apart from the
CPU work of decoding and resizing, which the `image` stage does next on the downloaded bytes.
Every request goes through `curate.web.fetcher.Fetcher`: one injectable resolver, a total deadline,
a byte cap, checked redirects, and non-public addresses refused unless the recipe allows them.
A failure is a drop with the fetcher's stable code (`http_404`, `timeout`, `too_large`,
`blocked`, `dns_error`, `connection_error`, `bad_url`, `opted_out`, ...) and never stops the task.

Politeness (DESIGN.md, "Fetching from the web"):
- Transient failures (`timeout`, `connection_error`, `http_429`, `http_5xx`) are retried up to
  `retries` more times, inside the row's worker thread (the other rows keep going), after a sleep
  of full jitter over `backoff_s * 2**(n-1)` capped at `max_backoff_s`, and never less than the
  server's Retry-After. A Retry-After longer than `max_backoff_s` ends the row at once: we never
  come back sooner than asked. Everything else is permanent and fetched once. The real number of
  requests is the row's `attempts`; a row that failed after several has the last failure's
  detail plus " (after N attempts)". Jitter changes timing only, never a ledger field.
- `X-Robots-Tag` opt-outs (noai, noimageai, noindex, and `none`; unscoped or scoped to
  `robots_agent`) end as `opted_out` with no bytes kept (curate/web/fetcher.py).
- With `respect_robots_txt`, each origin's robots.txt is fetched once per worker process and
  matched for `robots_agent` before a URL, and every redirect hop, is requested; a disallowed
  row is `robots_disallowed` with `attempts` 0 when its own URL was disallowed (curate/web/robots.py
  says how a missing or unreachable robots.txt is read).

Per-host limits (`max_per_host`, `max_rate_per_host`; curate/web/hosts.py) hold for every request,
redirect hops included, each under its own host, across the cluster. The rows of a batch are
fetched in an order that interleaves their hosts round robin (`interleave_by_host`), so a batch
with many rows of one slow or rate-limited host does not park every thread on that host's slots
while the other hosts' rows wait; the output keeps the input's row order, each outcome in its row.

Only rows that have a URL and no image yet are fetched, so rows from local sources pass through.
A fetched pair gets `image_format`, `image_nbytes` and `image_sha256`, except that the digest is
left to the image stage when it runs next in the same task (`followed_by`): it digests the bytes it
keeps, so a pair's `image_sha256` is that of its bytes wherever a row is written or read by
another stage.

Docs: every image segment of a doc that has no bytes yet is fetched, with the same guards and
politeness, all of a batch's docs' images on one pool; a failed image removes its segment (with
the fetch's code, in the doc's `segment_drops`), not the document (`_process_docs`).

What each domain cost (DNS lookups and cache hits, connections opened and reused, failures,
requests, bytes) is tallied per row and summed per partition into its segment marker, then the
manifest (`stages.download.domains`; curate/web/netstats.py), for `mm1 stats`' Domains table.
"""

from __future__ import annotations

import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from curate.contract import image_digest
from curate.web.hosts import DomainLimiter, LimitedFetcher, interleave_by_host
from curate.web.addresses import Resolver, StaticResolver, allowed_networks
from curate.web.drops import CONNECTION_ERROR, TIMEOUT
from curate.web.fetcher import Fetcher, FetchPolicy, FetchResult
from curate.web.netstats import PartitionDomains, Tally
from curate.web.robots import ROBOTS_DISALLOWED, RobotsCache
from curate.documents import (
    EMPTY_DOCUMENT,
    dump_json,
    image_views,
    is_empty,
    load_segments,
    remove_segments,
    store_image_views,
    table_kind,
)
from curate.stages.base import STAGE_ERROR, Drop, RowStage, Stage, StageConfig, mark_dropped, register
from curate.units import parse_bytes

_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"WEBP", 8, "webp"),
    (b"GIF8", 0, "gif"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
)


_TRANSIENT = frozenset({TIMEOUT, CONNECTION_ERROR, "http_429"})
_SERVER_ERROR = re.compile(r"http_5[0-9][0-9]")


def is_transient(reason: str | None) -> bool:
    """Worth another try later: timeouts, connection errors, 429 and any 5xx."""
    return reason is not None and (reason in _TRANSIENT or _SERVER_ERROR.fullmatch(reason) is not None)


def sniff_image_format(data: bytes) -> str:
    """The format by magic bytes, not by the server's word; "unknown" lets the image stage drop
    it as `decode_error` with Pillow's reason."""
    for magic, at, fmt in _MAGIC:
        if data[at : at + len(magic)] == magic:
            return fmt
    return "unknown"


def binary_array(values: list[bytes | None], dtype: pa.DataType) -> pa.Array | pa.ChunkedArray:
    """`pa.array(values, dtype)` for a batch of image bodies, each copied once into one buffer of
    the exact size. pa.array grows its buffer as it goes (copying what it holds at each growth),
    and splicing its result into the batch's column (`pc.replace_with_mask`) copied every body
    again: on the download bench (250 KiB images) that was half of this stage's CPU on the task's
    thread and ~95 MiB of each worker's peak RSS."""
    sizes = np.fromiter((0 if v is None else len(v) for v in values), np.int64, len(values))
    offsets = np.zeros(len(values) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    if dtype != pa.binary() or offsets[-1] > np.iinfo(np.int32).max:  # over 2 GiB: pa.array chunks it
        return pa.array(values, dtype)
    data = pa.allocate_buffer(int(offsets[-1]))
    view = np.frombuffer(data, np.uint8)
    for value, start, end in zip(values, offsets[:-1].tolist(), offsets[1:].tolist()):
        if value is not None:
            view[start:end] = memoryview(value)
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    return pa.Array.from_buffers(dtype, len(values), [pa.py_buffer(np.packbits(valid, bitorder="little")),
                                                      pa.py_buffer(offsets.astype(np.int32)), data])


@register
class DownloadStage(RowStage):
    """Fetches each pair's image (and each document's images) over HTTP(S): a total deadline and
    a byte cap per fetch, redirects checked against the allowed networks, robots.txt and per-host
    rate limits respected, transient failures retried."""

    name = "download"
    kinds = ("pair", "doc")

    class Config(StageConfig):
        kind: Literal["download"] = "download"
        # requests in flight per task: execution only, not part of the recipe hash
        threads: int = Field(16, ge=1, le=512, json_schema_extra={"execution_only": True})
        deadline_s: float = Field(10.0, gt=0)  # total per request: connect, redirects, body
        max_bytes: int = Field(16 * 2**20, ge=1024)  # counted after any decompression
        max_redirects: int = Field(5, ge=0, le=20)
        # CIDRs exempt from the non-public address block (the demo allows 127.0.0.0/8), on every
        # port, or on the ports an entry names: "10.0.0.5:443", "10.0.0.0/8:80,443", "[::1]:8080"
        # (then a redirect to another port of the address is blocked too)
        allow_networks: list[str] = Field(default_factory=list)
        # a static name -> IP map; when given, no DNS is asked at all (tests, the demo)
        hosts: dict[str, str] | None = None
        user_agent: str = "mm1-pipeline/0.1"
        # extra attempts for a transient failure (timeout, connection error, 429, 5xx)
        retries: int = Field(3, ge=0, le=20)
        # backoff before retry n: full jitter over backoff_s * 2**(n-1), at most max_backoff_s;
        # timing only, so execution-only. max_backoff_s is not: a longer Retry-After ends the row.
        backoff_s: float = Field(0.5, ge=0, json_schema_extra={"execution_only": True})
        max_backoff_s: float = Field(30.0, ge=0)
        respect_robots_txt: bool = True
        # cluster-wide, per host (curate/web/hosts.py: one distributed.Semaphore per host, each
        # lease held >= max_per_host / max_rate_per_host s); timing only, so execution-only
        max_per_host: int = Field(8, ge=1, json_schema_extra={"execution_only": True})
        max_rate_per_host: float | None = Field(None, gt=0, json_schema_extra={"execution_only": True})
        # the product token matched in robots.txt groups and X-Robots-Tag scopes (RFC 9309)
        robots_agent: str = Field("mm1-pipeline", pattern=r"^[A-Za-z0-9_-]+$")

        @field_validator("max_bytes", mode="before")
        @classmethod
        def _bytes(cls, v: Any) -> int:
            return parse_bytes(v)

        @field_validator("allow_networks")
        @classmethod
        def _networks(cls, v: list[str]) -> list[str]:
            allowed_networks(v)  # ValueError names the bad entry
            return v

    config: Config

    def __init__(self, config: StageConfig):
        super().__init__(config)
        self.domains = PartitionDomains()  # per-domain DNS and connection numbers (curate/web/netstats.py)
        self.digest_pairs = True  # image_sha256 of each fetched pair (followed_by)

    # the runner's per-partition protocol (curate/engine/steps.py run_segment, manifest.stage_times)
    def begin_partition(self) -> None:
        self.domains.begin()

    def partition_summary(self) -> dict[str, Any]:
        return self.domains.summary()

    def followed_by(self, stage: Stage | None) -> None:
        # the image stage digests the bytes of each pair it keeps and drops the rest, whose
        # as-fetched digest nothing reads (the ledger has none): ours would be thrown away
        # (0.15 ms a 250 KB body, ~2% of the download + resize path's CPU)
        self.digest_pairs = stage is None or not stage.rewrites_image_digest

    merge_summaries = staticmethod(PartitionDomains.merge_summaries)

    def setup(self) -> None:
        cfg = self.config
        policy = FetchPolicy(
            deadline_s=cfg.deadline_s,
            max_bytes=cfg.max_bytes,
            max_redirects=cfg.max_redirects,
            allow_networks=tuple(cfg.allow_networks),
            user_agent=cfg.user_agent,
            robots_agent=cfg.robots_agent,
        )
        resolver: Resolver = StaticResolver(cfg.hosts) if cfg.hosts is not None else Resolver()
        fetcher = Fetcher(policy, resolver)

        def limiter(namespace: str) -> DomainLimiter:
            # the limit is in the name: a resume with another limit on a long-lived scheduler
            # must not meet semaphores created with the old one
            return DomainLimiter(cfg.max_per_host, cfg.max_rate_per_host,
                                 namespace=f"{namespace}-c{cfg.max_per_host}")

        self.fetcher = LimitedFetcher(fetcher, limiter("mm1-domain"))
        # one per stage instance, i.e. per worker process (tasks._stage caches stages). robots.txt
        # has its own namespace: it never queues behind the host's image requests (the gate runs
        # between hops, while the image fetch holds no slot).
        self.robots = (
            RobotsCache(LimitedFetcher(fetcher, limiter("mm1-robots")), cfg.robots_agent)
            if cfg.respect_robots_txt else None
        )
        self.pool = ThreadPoolExecutor(cfg.threads, thread_name_prefix="mm1-download")
        self._jitter = random.Random()  # timing only: never reaches a row

    def _delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to sleep before the next attempt, or None when the server asked for a longer
        wait than max_backoff_s (the row ends rather than coming back early)."""
        cfg = self.config
        if retry_after is not None and retry_after > cfg.max_backoff_s:
            return None
        ceiling = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** min(attempt - 1, 30))
        return max(retry_after or 0.0, self._jitter.uniform(0.0, ceiling))

    def _fetch(self, url: str) -> tuple[FetchResult | Drop, int]:
        """Fetch one row's URL with retries: the outcome and the number of requests made."""
        attempts = 0
        try:
            if self.robots is not None:
                allowed, why = self.robots.allowed(url)
                if not allowed:
                    return Drop(ROBOTS_DISALLOWED, why), 0
            gate = self.robots.gate if self.robots is not None else None
            notes: list[str] = []
            while True:
                attempts += 1
                result = self.fetcher.fetch(url, gate=gate)
                if result.ok or not is_transient(result.reason) or attempts > self.config.retries:
                    break
                wait = self._delay(attempts, result.retry_after)
                if wait is None:
                    notes.append(f"Retry-After over max_backoff_s {self.config.max_backoff_s:g}s")
                    break
                time.sleep(wait)
            if not result.ok and attempts > 1:
                notes.insert(0, f"after {attempts} attempts")
            if notes:
                result.detail += f" ({'; '.join(notes)})"
            return result, attempts
        except Exception as exc:  # the fetcher never raises for what a server does: a bug
            if self.config.on_error == "raise":
                raise
            return Drop(STAGE_ERROR, f"{type(exc).__name__}: {exc}"), attempts

    def _fetch_all(self, urls: list[str]) -> list[tuple[FetchResult | Drop, int]]:
        """Fetch URLs on the pool, hosts interleaved; outcomes in the order of `urls`."""
        order = interleave_by_host(urls)  # the fetch order only: each outcome goes to its own row
        outcomes: list[Any] = [None] * len(urls)
        domains = self.domains.current()
        for k, (outcome, hosts) in zip(order, self.pool.map(self._tallied, [urls[k] for k in order])):
            outcomes[k] = outcome
            domains.add(hosts)
        return outcomes

    def _tallied(self, url: str) -> tuple[tuple[FetchResult | Drop, int], dict[str, list[float]]]:
        """`_fetch(url)` and what its requests cost per host (curate/web/netstats.py)."""
        with Tally() as hosts:
            return self._fetch(url), hosts

    def _process_docs(self, table: pa.Table) -> pa.Table:
        """The images of docs: every image segment without bytes yet, of every live doc of the
        batch, fetched together on the pool. A fetched image joins the doc's image lists in
        reading order; a failed one removes its segment with the fetch's code (curate/documents.py),
        never the doc, unless nothing is left of it. A doc's `attempts` is the sum of its images'."""
        rows = table.to_pylist()
        wanted: list[tuple[int, int, str]] = []  # (row, segment, url)
        for r, row in enumerate(rows):
            if row.get("drop_reason"):
                continue
            for s, seg in enumerate(load_segments(row)):
                if seg.get("type") == "image" and seg.get("image") is None:
                    wanted.append((r, s, seg.get("url") or ""))
        if not wanted:
            return table
        fetched: dict[int, dict[int, tuple[FetchResult | Drop, int]]] = {}
        for (r, s, _), outcome in zip(wanted, self._fetch_all([u for _, _, u in wanted])):
            fetched.setdefault(r, {})[s] = outcome
        for r, outcomes in fetched.items():
            row = rows[r]
            segments = load_segments(row)
            views = image_views(row)
            new_views, failed = [], {}
            for s, seg in enumerate(segments):
                if seg.get("type") != "image":
                    continue
                if s not in outcomes:  # fetched before (or local): keep it, renumbered in order
                    new_views.append(views[int(seg["image"])])
                    seg["image"] = len(new_views) - 1
                    continue
                result, attempts = outcomes[s]
                row["attempts"] = (row.get("attempts") or 0) + attempts
                if isinstance(result, FetchResult) and not result.ok:
                    result = Drop(result.reason, result.detail)
                if isinstance(result, Drop):
                    failed[s] = (result.reason, result.detail)
                    continue
                body = result.body
                new_views.append({"image": body, "image_format": sniff_image_format(body),
                                  "image_sha256": image_digest(body), "image_nbytes": len(body)})
                seg["image"] = len(new_views) - 1
            row["segments"] = dump_json(segments)
            store_image_views(row, new_views)
            remove_segments("doc", row, failed, self.name)
            if is_empty("doc", row):
                mark_dropped(row, self.name, Drop(EMPTY_DOCUMENT, "every segment removed"))
        return pa.Table.from_pylist(rows, schema=table.schema)

    def process(self, table: pa.Table) -> pa.Table:
        """Fetch every live row that has a URL and no image yet. Columnar: only the columns a
        fetch sets are rebuilt (the rest of the batch, captions and carried columns, is never
        turned into Python objects)."""
        self.ensure_setup()
        if table_kind(table.schema) == "doc":
            return self._process_docs(table)
        todo_mask = pc.and_(pc.is_null(table.column("drop_reason")), pc.is_null(table.column("image")))
        todo = pc.indices_nonzero(todo_mask).to_pylist()
        if not todo:
            return table
        url_column = table.column("url").to_pylist()
        outcomes = self._fetch_all([url_column[i] or "" for i in todo])
        names = ("attempts", "drop_stage", "drop_reason", "drop_detail", "image_format", "image_sha256",
                 "image_nbytes")
        cols = {name: table.column(name).to_pylist() for name in names}
        fetched_rows: list[int] = []
        bodies: list[bytes] = []
        for i, (result, attempts) in zip(todo, outcomes):
            cols["attempts"][i] = (cols["attempts"][i] or 0) + attempts
            if isinstance(result, FetchResult) and not result.ok:
                result = Drop(result.reason, result.detail)
            if isinstance(result, Drop):
                cols["drop_stage"][i], cols["drop_reason"][i], cols["drop_detail"][i] = (
                    self.name, result.reason, result.detail)
                continue
            body = result.body
            cols["image_format"][i] = sniff_image_format(body)
            cols["image_sha256"][i] = image_digest(body) if self.digest_pairs else None
            cols["image_nbytes"][i] = len(body)
            fetched_rows.append(i)
            bodies.append(body)
        for name, values in cols.items():
            i = table.schema.get_field_index(name)
            table = table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))
        if bodies:
            i = table.schema.get_field_index("image")
            images = table.column(i).to_pylist()  # all None unless rows came with their bytes
            for row, body in zip(fetched_rows, bodies):
                images[row] = body
            table = table.set_column(i, table.schema.field(i), binary_array(images, table.schema.field(i).type))
        return table
