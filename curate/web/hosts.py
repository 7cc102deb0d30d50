"""Per-host politeness that holds for the whole Dask cluster, not per process.

Contracts (the why and the proofs: docs/politeness.md):
- `DomainLimiter(max_concurrency=N, max_rate=R).slot(host)` holds one slot of `host` (a host or a
  URL, keyed by `host_key`) for ONE request. At most N requests to a host are in flight across
  the cluster, and in any window of W seconds at most N * ceil(W * R / N) < W * R + N of them
  start: every lease is held at least N / R seconds from its grant and never released early,
  whatever the body raises (a lease ending sooner is released later by a background thread, so
  the caller is not kept waiting). A nested slot for one host in one thread is a RuntimeError.
- `LimitedFetcher(fetcher, limiter)`: every request of every fetch, each redirect hop under its
  own host, holds a slot; a hop refused before sending takes none (curate/web/fetcher.py).
- Backends: the cluster's `distributed.Semaphore` per host (leases on the scheduler, handed
  between requests of one process up to MAX_HANDOFFS times in a row) when this process works for
  a Dask cluster, else a process-local semaphore; `backend()` says which. A dead worker's leases
  come back after the scheduler's lease timeout; `close_idle(client)` forgets idle hosts there.
- All limiters sharing a `namespace` must use the same limits (ValueError otherwise).
"""

from __future__ import annotations

import heapq
import itertools
import logging
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
_LOG = logging.getLogger(__name__)


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
                _LOG.exception("releasing a domain slot failed")


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
    # distributed (~0.4 s of import) is imported on first use, here and below: importing the
    # stages (and the CLI's start-up) does not load it
    from distributed.core import Status
    from distributed.worker import Worker, get_worker

    try:
        worker = get_worker()
    except ValueError:
        worker = next((w for w in list(Worker._instances) if w.status == Status.running), None)
    if worker is not None and worker.status == Status.running:
        return worker.scheduler, worker.loop
    from distributed.client import default_client  # on first use, as above

    try:
        client = default_client()
    except ValueError:
        return None
    if client.status != "running" or client.asynchronous:
        return None
    return client.scheduler, client.loop


def _dask_gate(scheduler: Any, loop: Any, name: str, max_leases: int) -> _Gate:
    from distributed import Semaphore  # on first use, as in _cluster

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
    second to each host, across every process of the Dask cluster (docs/politeness.md: the bound
    and what happens when a worker dies). Cheap to create and to pickle: it holds only
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
