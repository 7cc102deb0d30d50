"""Per-domain DNS and connection statistics of the download stage (issue 24 item 4): what each
domain cost in name lookups, connections and requests, per partition in the segment markers and
over the run in the manifest (`stages.<download stage>.domains`), printed by `mm1 stats`.

A domain is a host as curate/web/hosts.py keys it (`host_key`: lower case, no trailing dot). The
numbers (`FIELDS`):
- requests: HTTP requests sent to the host (every redirect hop, robots.txt fetch and retry; a
  request resent on a fresh connection after a pooled one turned out closed counts twice);
- bytes: body bytes of the responses read in full (images, robots.txt; not the drained bodies
  of redirects and errors);
- dns_lookups: lookups the worker's resolver started for the name (cache misses);
- dns_cached: resolutions answered without a new lookup: from the cache (answers and failures
  alike) or by a lookup of the name already in flight;
- dns_errors: resolutions that ended as `dns_error` (a failed lookup or its cached failure);
- dns_timeouts: resolutions the resolver did not answer within the request's time left;
- dns_ms: milliseconds the requests that started a lookup waited for it (a timed-out wait counts
  the time waited), so `dns_ms / dns_lookups` is the mean lookup time;
- opened, reused: requests sent on a connection just opened, on a pooled keep-alive one;
- conn_failures: fetches that ended on a network error once the name had resolved (refused,
  reset, timed out connecting or on the wire).
A name given as an IP literal is never looked up: its DNS numbers stay 0.

Recording takes no lock and costs a few dict operations per event: the resolver
(curate/web/addresses.py) and the fetcher (curate/web/fetcher.py) `note` each event into the
calling thread's current tally, which the download stage opens around one row's fetch (`Tally`)
and only that thread writes; outside a tally `note` does nothing. The download stage's task
thread adds the rows' tallies into its partition's `DomainStats` at the end of each batch.

Bounded: a marker carries `DomainStats.table()`, the top `TOP` domains by requests and one
`OTHER` row summing the rest, whatever the number of domains a partition has; the manifest
`merge`s the partitions' tables into one table of the same shape, holding at most 10 x
`MERGE_KEEP` domains at a time (folding all but the top `MERGE_KEEP` into `OTHER` when it gets
there), so the driver's memory does not grow with the partitions either. Totals over all rows
are exact at every level. A domain's own row in the manifest is exact when it was in the top
`TOP` of every partition that saw it and never folded by the merge; otherwise it lacks what went
to `OTHER` (a lower bound: the difference is in the `OTHER` row).
"""

from __future__ import annotations

import heapq
import operator
import threading
from collections.abc import Iterable
from typing import Any

from curate.web.hosts import host_key

FIELDS = ("requests", "bytes", "dns_lookups", "dns_cached", "dns_errors", "dns_timeouts", "dns_ms",
          "opened", "reused", "conn_failures")
(REQUESTS, BYTES, DNS_LOOKUPS, DNS_CACHED, DNS_ERRORS, DNS_TIMEOUTS, DNS_MS, OPENED, REUSED,
 CONN_FAILURES) = range(len(FIELDS))
TOP = 100  # domains a marker's or the manifest's table names; the rest are summed in OTHER
OTHER = "(other)"
MERGE_KEEP = 10 * TOP  # domains a merge keeps apart when it folds (at 10x this many) the rest into OTHER

Row = list[float]
_CURRENT = threading.local()  # .hosts: the open tally of this thread (host -> Row), or absent


def note(host: str, field: int, n: float = 1) -> None:
    """Add `n` to `field` of `host` in this thread's open tally (nothing when none is open)."""
    hosts = getattr(_CURRENT, "hosts", None)
    if hosts is not None:
        row = hosts.get(host)
        if row is None:
            row = hosts[host] = [0] * len(FIELDS)
        row[field] += n


def note_request(host: str, fresh: bool) -> None:
    """One request sent to `host`, on a connection just opened (`fresh`) or a pooled one."""
    hosts = getattr(_CURRENT, "hosts", None)
    if hosts is not None:
        row = hosts.get(host)
        if row is None:
            row = hosts[host] = [0] * len(FIELDS)
        row[REQUESTS] += 1
        row[OPENED if fresh else REUSED] += 1


class Tally:
    """`with Tally() as hosts:` collects this thread's `note`s made inside the block into `hosts`
    (host -> a value per FIELDS); the tally open before is restored after."""

    __slots__ = ("hosts", "_outer")

    def __enter__(self) -> dict[str, Row]:
        self._outer = getattr(_CURRENT, "hosts", None)
        self.hosts: dict[str, Row] = {}
        _CURRENT.hosts = self.hosts
        return self.hosts

    def __exit__(self, *exc: object) -> None:
        _CURRENT.hosts = self._outer


class DomainStats:
    """Per-domain sums (a partition's, or a run's while merging); one thread writes it."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def add(self, hosts: dict[str, Row]) -> None:
        """Add one tally (host -> values), each host under its domain."""
        for host, values in hosts.items():
            self._add(host_key(host), values)

    def _add(self, domain: str, values: Row) -> None:
        row = self.rows.get(domain)
        self.rows[domain] = list(values) if row is None else list(map(operator.add, row, values))

    def folded(self, keep: int) -> dict[str, Row]:
        """The `keep` top domains by requests (then by resolutions, so a name that never resolved
        ranks by how often it was tried; then by name), then `OTHER` summing every other domain
        (and any OTHER row added before)."""
        def rank(d: str) -> tuple[float, float, str]:
            row = self.rows[d]
            return -row[REQUESTS], -(row[DNS_LOOKUPS] + row[DNS_CACHED]), d

        named = heapq.nsmallest(keep, (d for d in self.rows if d != OTHER), key=rank)
        rows = {d: self.rows[d] for d in named}
        rest = [values for d, values in self.rows.items() if d not in rows]
        if rest:
            rows[OTHER] = [sum(column) for column in zip(*rest)]
        return rows

    def table(self, top: int = TOP) -> dict[str, Any]:
        """{"columns": FIELDS, "rows": {domain: values}}: `folded(top)`, what a marker carries."""
        return {"columns": list(FIELDS), "rows": {d: _rounded(v) for d, v in self.folded(top).items()}}


class PartitionDomains:
    """A row stage's `DomainStats` of the partition each task thread is working on (one stage
    instance serves every task of its worker process, several at once on a worker with several
    threads), and the stage protocol the runner asks for them: `begin` when a segment task starts
    a partition, `summary()` for its marker, `merge_summaries` for the manifest."""

    def __init__(self) -> None:
        self._local = threading.local()

    def begin(self) -> None:
        """A partition starts on this thread: its numbers start at zero (whatever an earlier task
        of this thread left, a failed one included)."""
        self._local.stats = DomainStats()

    def current(self) -> DomainStats:
        """This thread's partition's numbers (started when `begin` was not called: a bare stage)."""
        stats = getattr(self._local, "stats", None)
        if stats is None:
            stats = self._local.stats = DomainStats()
        return stats

    def summary(self) -> dict[str, Any]:
        """{"domains": table} of this thread's partition ({} when nothing was fetched), which ends it."""
        stats, self._local.stats = getattr(self._local, "stats", None), None
        return {"domains": stats.table()} if stats is not None and stats.rows else {}

    @staticmethod
    def merge_summaries(entries: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """The partitions' summaries (or markers' stage entries holding one) as one."""
        tables = [e["domains"] for e in entries if "domains" in e]
        return {"domains": merge(tables)} if tables else {}


def merge(tables: Iterable[dict[str, Any]], top: int = TOP) -> dict[str, Any]:
    """One table of the same shape from many (the partitions' tables into the run's). Values are
    read by column name, so a table with other columns than FIELDS merges what they share."""
    stats = DomainStats()
    for table in tables:
        columns = table["columns"]
        where = None if columns == list(FIELDS) else [columns.index(f) if f in columns else None for f in FIELDS]
        for domain, values in table["rows"].items():
            stats._add(domain, values if where is None else [0 if w is None else values[w] for w in where])
        if len(stats.rows) > 10 * MERGE_KEEP:  # bounded, however many domains the partitions name
            stats.rows = stats.folded(MERGE_KEEP)
    return stats.table(top)


def _rounded(values: Row) -> Row:
    """Counts as ints; milliseconds to the microsecond (the marker is JSON)."""
    return [round(v, 3) if i == DNS_MS else int(v) for i, v in enumerate(values)]
