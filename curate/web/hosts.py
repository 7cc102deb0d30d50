"""Per-domain politeness that holds for the whole Dask cluster, not per process.

DESIGN.md ("Fetching from the web") asks for per-domain concurrency and rate limits that hold for
the whole cluster. Downloads run in thread pools inside Dask tasks on many worker processes, so a
process-local semaphore would multiply every limit by the number of processes. `DomainLimiter`
shares one `distributed.Semaphore` per host instead: the leases live on the scheduler, so every
worker process (and the driver, through its client) draws from the same `max_concurrency` leases.

    limiter = DomainLimiter(max_concurrency=2, max_rate=10.0)
    with limiter.slot("images.example.com"):   # or slot(url): the key is the URL's host
        send_one_request()                     # ONE request to that host: one lease each

    fetcher = LimitedFetcher(Fetcher(policy, resolver), limiter)   # a slot for every request
    fetcher.fetch(url)                         # of every fetch, each redirect hop under its own host

Each request is one lease. `LimitedFetcher` hands `limiter.slot` to `Fetcher.fetch`, which takes
a slot of each hop's own host around that hop's exchange only (curate/web/fetcher.py): a redirect chain
A -> A -> A is three leases of A, a hop from A to B is limited under B, and a hop refused before
sending (robots.txt, a blocked address) takes none. A fetch holds one slot at a time (hop N's is
given back before hop N+1 asks), so slots never nest for one host in one thread; `slot` raises
RuntimeError rather than wait for a slot its own thread holds.

Concurrency: a request is sent only while its caller holds a lease of the request's host, and the
scheduler grants at most `max_concurrency` leases of one host's semaphore at a time, so at most
`max_concurrency` requests to a host are in flight across the cluster (per namespace: the download
stage's robots.txt requests have their own, see `LimitedFetcher`).

Rate (`max_rate` = R requests per second, N = `max_concurrency`): every lease is held for at least
H = N / R seconds, counted from the moment its holder got it, and is never released early -- not
when the request fails, not when it raises. A lease covers one request (one hop), so the request
starts counted below are all requests, redirect hops included. The scheduler grants a lease
before its holder hears of it and frees it only after the holder asked, so on the scheduler each
lease is held for at least H too. Bound: the lease intervals [grant, release) overlap at most N
at a time; intervals that overlap at most N deep split into N chains of disjoint intervals
(greedy colouring by start time), and in one chain consecutive grants are at least H apart, so a
window [t, t + W) holds at most ceil(W / H) of its grants. Hence, in ANY window of W seconds, at most

    N * ceil(W * R / N)  <  W * R + N        lease grants (= request starts),

which is exactly W * R whenever W * R / N is a whole number (N = 2, R = 10/s, W = 1 s: at most
10), and tends to R per second over long windows. The holder sends its request a little after the
grant (the scheduler's reply, a thread waking, the connect): seen at the server, starts may bunch
by that delay D, and a window of W seconds there holds at most N * ceil((W + D) / H) -- one more
per lease when D is small. When the caller finishes before H has passed, its thread is not kept
waiting: the lease is released by a background timer at grant + H (see `_Releaser`).

`distributed.Semaphore.release()` frees the OLDEST lease its instance holds, not the caller's
own; the bound survives that: the k-th release of an instance happens when k holds have each been
held for H, so at least k of its leases were granted H earlier, and the one released (the k-th
granted, FIFO) is one of them.

Without a cluster (a plain function call in a test, a sequential run: no Dask worker in this
process and no client) the same rules run on a process-local `threading.BoundedSemaphore` per
host: correct for the threads of this process only.

Which cluster: the Dask worker of the current task (`get_worker()`), else a running Dask worker of
this process (the stage's fetch threads are the pool's threads, not the task's, and Dask's
worker context does not follow into them), else the current client (`default_client()`), else
the process-local fallback. `backend()` tells which one a slot would use.

Many hosts: semaphores are created lazily, one per (scheduler, namespace, host), cached per
process in an LRU of `MAX_CACHED` entries; only idle ones (no slot held, no release pending) are
dropped, and dropping one stops its lease-refresh timer. On the scheduler each host's semaphore
is a few small dict entries that stay until `close_idle(client)` forgets the idle ones (from the
driver, after the stage; a process that still caches a forgotten host registers it afresh).

A worker that dies holding a lease: its leases stop being refreshed (each process's Semaphore
refreshes its leases every lease-timeout / 5 seconds) and the scheduler frees them after
`distributed.scheduler.locks.lease-timeout` (30 s by default), checked every
`lease-validation-interval` (10 s): for at most ~40 s that host gets fewer slots, never more.
The converse risk is distributed's documented overbooking: a worker whose event loop is blocked
longer than the lease timeout (a task holding the GIL for 30 s) loses its leases while their
requests may still be running, and the scheduler logs "Refreshing an unknown lease ID". Keep the
lease timeout well above any GIL-holding stretch.

Cost: a lease from the scheduler costs two round trips (acquire, release), served by the
scheduler's one event loop and each process's own: about 1.2 ms of CPU per slot in all on a
2-process LocalCluster on a 2-core machine, a tenth of what downloading and resizing an image
costs. So a lease is handed from one request of a process to the next one waiting there for the
same host, at the moment it would have been released, up to MAX_HANDOFFS times in a row
(`_pooled`): a busy host then costs about 0.15 ms per request. The bounds above are untouched (a
hand-off is a release and a grant at the same instant, inside one process), and a process holds
no lease that none of its threads waits for. For cluster-wide request rates well beyond what
the scheduler can spare, partition the work by host instead.

All limiters sharing a `namespace` must use the same limits: the scheduler refuses a second
`max_concurrency` for a registered name (ValueError), and mixed hold times weaken the rate bound.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

DEFAULT_NAMESPACE = "mm1-domain"
MAX_CACHED = 4096  # idle per-host semaphores kept per process before the least recently used go


def host_key(host_or_url: str | None) -> str:
    """The key a host is limited under: lower case, no trailing dot, no brackets, no port.
    Accepts a bare host or a URL; "" when there is none."""
    text = (host_or_url or "").strip()
    if "://" in text:
        try:
            text = urlsplit(text).hostname or ""
        except ValueError:
            return ""
    elif text.startswith("[") and "]" in text:  # [::1] or [::1]:8080
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # host:port
        text = text.split(":", 1)[0]
    return text.lower().rstrip(".")


def interleave_by_host(urls: Sequence[str]) -> list[int]:
    """The indices of `urls` in the order to fetch them: one URL of each host in turn (round
    robin), hosts in the order they first appear, each host's URLs in their own order. A pool of
    threads working down this order spreads over the hosts instead of all blocking on the slots
    of the first one. Deterministic: depends on the URLs' host keys and positions only."""
    groups: dict[str, list[int]] = {}
    for i, url in enumerate(urls):
        groups.setdefault(host_key(url), []).append(i)
    return [i for turn in itertools.zip_longest(*groups.values()) for i in turn if i is not None]


# ---------------------------------------------------------------------------------------------
# Deferred releases: a lease whose request ended early is released at grant + hold by one daemon
# thread per process, so the caller's thread is free at once. Actions must not block.
# ---------------------------------------------------------------------------------------------


class _Releaser:
    def __init__(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def at(self, due: float, action: Callable[[], None]) -> None:
        """Run `action` at monotonic time `due` (or as soon as possible when that has passed)."""
        with self._cond:
            if self._pid != os.getpid():  # forked: the parent's thread and queue are not ours
                self._pid, self._heap, self._thread = os.getpid(), [], None
            heapq.heappush(self._heap, (due, next(self._seq), action))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mm1-domain-release", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, action = heapq.heappop(self._heap)
            try:
                action()
            except Exception:  # a release must never kill the thread that does all of them
                import logging

                logging.getLogger(__name__).exception("releasing a domain slot failed")


_RELEASER = _Releaser()


# ---------------------------------------------------------------------------------------------
# Per-host gates, cached per process
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Gate:
    """One host's semaphore in this process: Dask's (shared by the cluster) or a local one.
    `acquire(timeout)` gives a token (None on timeout) that `release(token)` gives back."""

    acquire: Callable[[float | None], Any]
    release: Callable[[Any], None]  # non-blocking
    forget: Callable[[], None] = lambda: None  # on eviction
    users: int = 0  # slots held or waiting here, plus releases pending
    lock: threading.Lock = field(default_factory=threading.Lock)


_GATES: OrderedDict[tuple[Any, ...], _Gate] = OrderedDict()
_GATES_LOCK = threading.Lock()
_HELD = threading.local()  # .names: the semaphore names this thread is inside a slot of


def _evict_idle() -> None:
    """Drop least recently used idle gates beyond MAX_CACHED (caller holds _GATES_LOCK)."""
    excess = len(_GATES) - MAX_CACHED
    if excess <= 0:
        return
    for key in [k for k, g in _GATES.items() if g.users == 0][:excess]:
        _GATES.pop(key).forget()


def _cluster() -> tuple[Any, Any] | None:
    """(scheduler rpc, IOLoop) of the Dask cluster this process works for, or None."""
    from distributed.core import Status
    from distributed.worker import Worker, get_worker

    try:
        worker = get_worker()
    except ValueError:
        worker = next((w for w in list(Worker._instances) if w.status == Status.running), None)
    if worker is not None and worker.status == Status.running:
        return worker.scheduler, worker.loop
    from distributed.client import default_client

    try:
        client = default_client()
    except ValueError:
        return None
    if client.status != "running" or client.asynchronous:
        return None
    return client.scheduler, client.loop


def _dask_gate(scheduler: Any, loop: Any, name: str, max_leases: int) -> _Gate:
    from distributed import Semaphore

    def make() -> Any:
        return Semaphore(max_leases=max_leases, name=name, scheduler_rpc=scheduler, loop=loop)

    def stop(sem: Any) -> None:
        callback = getattr(sem, "refresh_callback", None)  # absent when lease-timeout is "inf"
        if callback is not None:
            try:
                loop.add_callback(callback.stop)
            except RuntimeError:  # the loop is closed: nothing runs there any more
                pass

    current = [make()]
    swap = threading.Lock()

    def acquire(timeout: float | None) -> Any:
        for again in (False, True):
            sem = current[0]
            try:
                return sem if sem.acquire(timeout=timeout) else None
            except ValueError as exc:
                if "Inconsistent max leases" in str(exc):
                    raise ValueError(
                        f"domain semaphore {name!r} exists with another max_concurrency ({exc}); "
                        "limiters sharing a namespace must use the same limits"
                    ) from None
                raise
            except RuntimeError as exc:
                if again or "not known" not in str(exc):
                    raise
                with swap:  # forgotten on the scheduler (close_idle): register a fresh one
                    if current[0] is sem:
                        stop(sem)
                        current[0] = make()
        raise AssertionError("unreachable")

    def release(sem: Any) -> None:
        async def on_loop() -> None:
            await sem.release()  # on the loop, release() pops the oldest lease, returns a coroutine

        loop.add_callback(on_loop)  # thread-safe, returns at once

    return _Gate(acquire, release, lambda: stop(current[0]))


# A lease handed from one request of this process to the next, at most this many times in a row
# before it goes back to the scheduler (where other processes' requests for the host queue).
MAX_HANDOFFS = 16


@dataclass(eq=False)
class _Lease:
    token: Any  # the scheduler's lease (the raw gate's token)
    handoffs: int = 0


def _pooled(raw: _Gate, max_leases: int) -> _Gate:
    """`raw` (a scheduler-backed gate) with leases handed between this process's requests.

    A request that ends gives its lease back at grant + hold (as before); when another thread of
    this process is waiting for the same host, the lease goes straight to it instead of to the
    scheduler, at most MAX_HANDOFFS times in a row. A busy host then costs scheduler round
    trips once per MAX_HANDOFFS requests instead of twice per request (BENCHMARKS.md measures
    it). The bounds stay as they were: each lease still covers one request at a time
    (concurrency), and a lease handed on is granted again no sooner than hold after its last
    grant (the hand-off happens where the release would have), so every chain of grants of one
    scheduler lease keeps its H spacing (rate). Threads ask the scheduler only while this
    process holds fewer than `max_leases` leases; a waiting thread is woken by a lease handed
    to it, or when the process's count drops and it may ask. A lease nobody here waits for goes
    back to the scheduler at once, so an idle process holds none."""
    cond = threading.Condition()
    idle: list[_Lease] = []
    # leases held here (in use or idle); threads in raw.acquire; threads waiting on `cond`
    state = {"held": 0, "asking": 0, "waiting": 0}

    def surplus() -> list[_Lease]:
        """Idle leases no waiter here will take (caller holds cond): to go to the scheduler."""
        spare = len(idle) - state["waiting"]
        out = [idle.pop() for _ in range(max(0, spare))]
        state["held"] -= len(out)
        return out

    def give_up(leases: list[_Lease]) -> None:
        for lease in leases:
            raw.release(lease.token)

    def acquire(timeout: float | None) -> _Lease | None:
        due = None if timeout is None else time.monotonic() + timeout
        with cond:
            state["waiting"] += 1
            try:
                while True:
                    if idle:
                        lease = idle.pop(0)
                        lease.handoffs += 1
                        return lease
                    if state["held"] + state["asking"] < max_leases:
                        state["asking"] += 1
                        break
                    left = None if due is None else due - time.monotonic()
                    if left is not None and left <= 0:
                        return None
                    cond.wait(left)
            finally:
                state["waiting"] -= 1
                spare = surplus()
        give_up(spare)
        token = None
        try:
            token = raw.acquire(None if due is None else max(0.0, due - time.monotonic()))
        finally:
            with cond:
                state["asking"] -= 1
                if token is not None:
                    state["held"] += 1
                cond.notify()  # a waiter may ask in this thread's place
                spare = surplus()
            give_up(spare)
        return None if token is None else _Lease(token)

    def release(lease: _Lease) -> None:
        with cond:
            if lease.handoffs < MAX_HANDOFFS and state["waiting"] > len(idle):
                idle.append(lease)  # a thread here waits for this host: hand it over
                cond.notify()
                return
            state["held"] -= 1
            cond.notify()
        raw.release(lease.token)

    return _Gate(acquire, release, raw.forget)


def _local_gate(max_leases: int) -> _Gate:
    sem = threading.BoundedSemaphore(max_leases)
    return _Gate(lambda timeout: True if sem.acquire(timeout=timeout) else None, lambda _: sem.release())


class DomainLimiter:
    """At most `max_concurrency` requests in flight and at most `max_rate` request starts per
    second to each host, across every process of the Dask cluster (see the module docstring for
    the bound and what happens when a worker dies). Cheap to create and to pickle: it holds only
    its settings, and the per-host semaphores are found or made in whichever process uses it."""

    def __init__(self, max_concurrency: int, max_rate: float | None = None, *, namespace: str = DEFAULT_NAMESPACE):
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be an integer >= 1, not {max_concurrency!r}")
        if max_rate is not None and not max_rate > 0:
            raise ValueError(f"max_rate must be > 0 requests per second or None, not {max_rate!r}")
        self.max_concurrency = max_concurrency
        self.max_rate = None if max_rate is None else float(max_rate)
        self.namespace = namespace

    def __repr__(self) -> str:
        return (f"DomainLimiter(max_concurrency={self.max_concurrency}, max_rate={self.max_rate}, "
                f"namespace={self.namespace!r})")

    @property
    def hold_s(self) -> float:
        """The least time each lease is held: max_concurrency / max_rate (0 without a rate)."""
        return 0.0 if self.max_rate is None else self.max_concurrency / self.max_rate

    def semaphore_name(self, host: str) -> str:
        return f"{self.namespace}-{host_key(host)}"

    def backend(self) -> str:
        """"dask" when a slot taken here would be shared by the cluster, else "local"."""
        return "dask" if _cluster() is not None else "local"

    def _gate(self, host: str) -> _Gate:
        cluster = _cluster()
        name = self.semaphore_name(host)
        if cluster is None:
            key: tuple[Any, ...] = ("local", os.getpid(), name, self.max_concurrency)
        else:
            key = ("dask", cluster[0], name, self.max_concurrency)  # the rpc object: one per worker/client
        with _GATES_LOCK:
            gate = _GATES.get(key)
            if gate is None:
                gate = (_local_gate(self.max_concurrency) if cluster is None
                        else _pooled(_dask_gate(*cluster, name, self.max_concurrency), self.max_concurrency))
                _GATES[key] = gate
            else:
                _GATES.move_to_end(key)
            with gate.lock:
                gate.users += 1
            _evict_idle()
        return gate

    @staticmethod
    def _done(gate: _Gate) -> None:
        with gate.lock:
            gate.users -= 1

    @contextmanager
    def slot(self, host: str | None, timeout: float | None = None) -> Iterator[None]:
        """Block until one request to `host` may be sent, then hold the slot for the `with` body
        (and, for the rate, until `hold_s` after it was granted: released later in the background
        if the body ends sooner, never early, whatever the body raises).

        `host` may be a URL; its key is `host_key(host)`. No host ("" or None: a URL the fetcher
        will refuse without sending anything) means no slot. `timeout` (seconds, None = wait as
        long as it takes): TimeoutError when no slot came in time."""
        key = host_key(host)
        if not key:
            yield
            return
        name = self.semaphore_name(key)
        held: set[str] = _HELD.__dict__.setdefault("names", set())
        if name in held:  # waiting here for a slot this thread holds could wait for ever
            raise RuntimeError(
                f"nested slot for {key} in one thread ({self!r}): take one slot per request, "
                "or use another namespace for requests made inside a slot (robots.txt)"
            )
        gate = self._gate(key)
        try:
            token = gate.acquire(timeout)
        except BaseException:
            self._done(gate)
            raise
        if token is None:
            self._done(gate)
            raise TimeoutError(f"no slot for {key} within {timeout}s ({self!r})")
        start = time.monotonic()
        held.add(name)
        try:
            yield
        finally:
            held.discard(name)
            def release(gate: _Gate = gate, token: Any = token) -> None:
                try:
                    gate.release(token)
                finally:
                    self._done(gate)

            due = start + self.hold_s
            if time.monotonic() >= due:
                release()  # held long enough already (always, without a rate): no thread hop
            else:
                _RELEASER.at(due, release)


class LimitedFetcher:
    """A fetcher (anything whose `fetch(url, ..., slot=...)` holds `slot(host)` around each
    request it sends, as `curate.web.fetcher.Fetcher` does) whose every request holds a slot of
    `limiter` for its own host: one lease per request, every redirect hop included, each hop
    under the host it goes to. A hop refused without sending (robots.txt, a blocked address, a
    bad URL) takes no slot. Waiting for a slot does not count against the fetch's deadline, on
    any hop (curate/web/fetcher.py), so a busy host never turns into a spurious `timeout`.
    Other attributes are the wrapped fetcher's.

    A fetch holds at most one slot at a time, and none while its gate runs, so a robots.txt
    fetch asked from a redirect gate waits for no slot its own thread holds. The download stage
    still sends robots.txt through a limiter of ANOTHER namespace (its own per-host slots, the
    same limits), so a robots.txt request never queues behind a host's image requests."""

    def __init__(self, fetcher: Any, limiter: DomainLimiter):
        self.fetcher, self.limiter = fetcher, limiter

    def fetch(self, url: str, *args: Any, **kwargs: Any) -> Any:
        return self.fetcher.fetch(url, *args, slot=self.limiter.slot, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("fetcher", "limiter"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.fetcher, name)


def close_idle(client: Any, namespace: str = DEFAULT_NAMESPACE) -> int:
    """Forget, on the scheduler, this namespace's semaphores that nobody holds or waits for; the
    number forgotten. Call from the driver once the stage is done. Safe at any time: a process
    that still caches a forgotten host's semaphore registers it again at its next slot (which
    is also how a host forgotten while another process was about to ask for it comes back)."""
    prefix = f"{namespace}-"

    def _close(dask_scheduler: Any = None) -> int:
        ext = dask_scheduler.extensions["semaphores"]
        names = [
            n for n in list(ext.max_leases)
            if isinstance(n, str) and n.startswith(prefix)
            and not ext.leases.get(n) and not ext.metrics["pending"].get(n)
        ]
        for n in names:
            ext.close(name=n)
        return len(names)

    return int(client.run_on_scheduler(_close))
