"""Per-domain politeness (curate/web/hosts.py): limits that hold for the whole cluster.

Loopback HTTP servers (tools.demo.server.LoopbackHTTPServer, threads of this process) record, per
request, when it arrived and how many requests were in flight at once; every answer waits a little
so that requests overlap when nothing stops them. The requests come from thread pools inside Dask
tasks on BOTH processes of a real LocalCluster (as the download stage sends them), or from plain
threads for the process-local fallback.

Timing: the limiter bounds when leases are GRANTED; the server sees a request a little later (the
scheduler's reply, a thread waking, the TCP connect), and that delay varies, so two starts
granted H = N / R apart may arrive closer together. A 1-second window at the server can then
catch one extra start per lease: N * ceil((1 s + delay) / H) = 2 * 6 = 12 for N = 2, R = 10/s
(docs/politeness.md, "Rate bound"). Hence the tolerance of N on the rate. Everything
else is a lower bound on spacing or a generous bound on waiting.
"""

from __future__ import annotations

import http.client
import http.server
import importlib
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any

import cloudpickle
import dask
import pytest
from distributed import Client, LocalCluster

from curate.web import hosts as domains
from curate.web.hosts import DomainLimiter, LimitedFetcher, close_idle, host_key, interleave_by_host
from tools.demo.server import LoopbackHTTPServer

WAIT = 120  # seconds: many times what any step here takes; only a hang reaches it
N = 2  # max_concurrency in the rate tests
RATE = 10.0  # max_rate in the rate tests (requests per second)
SERVE_S = 0.1  # every answer waits this long: without the limiter, requests overlap
TOLERANCE = N  # one extra start per lease in a window at the server (see above)

# the task functions below are shipped to the workers by value (this module is not importable there)
if __name__ in sys.modules:
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------------------------------
# Recording servers
# ---------------------------------------------------------------------------------------------


class Recorder:
    """Arrivals and in-flight counts of one or more servers (monotonic clock of this process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arrivals: list[tuple[float, str, str]] = []  # (time, server, path)
        self.inflight: Counter[str] = Counter()
        self.max_inflight: Counter[str] = Counter()
        self.total = 0
        self.max_total = 0  # over all servers at once

    def enter(self, server: str, path: str) -> None:
        with self.lock:
            self.arrivals.append((time.monotonic(), server, path))
            self.inflight[server] += 1
            self.max_inflight[server] = max(self.max_inflight[server], self.inflight[server])
            self.total += 1
            self.max_total = max(self.max_total, self.total)

    def leave(self, server: str) -> None:
        with self.lock:
            self.inflight[server] -= 1
            self.total -= 1

    def times(self, server: str | None = None) -> list[float]:
        return sorted(t for t, s, _ in self.arrivals if server is None or s == server)


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most arrivals in any half-open window [t, t + window) (it suffices to start at one)."""
    best = 0
    for i, t in enumerate(times):
        k = i
        while k < len(times) and times[k] < t + window:
            k += 1
        best = max(best, k - i)
    return best


@contextmanager
def recording_server(recorder: Recorder, name: str, serve_s: float = SERVE_S) -> Iterator[int]:
    """A loopback server answering every GET with 200 after `serve_s`; yields its port. The
    request counts as in flight from its arrival until just before the answer is written, so the
    server's in-flight interval lies inside the client's slot whatever the thread timing."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            recorder.enter(name, self.path)
            try:
                time.sleep(serve_s)
            finally:
                recorder.leave(name)
            body = b"ok\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = LoopbackHTTPServer(("127.0.0.1", 0), Handler)
    server.request_queue_size = 128
    thread = threading.Thread(target=server.serve_forever, name=f"domains-{name}", daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# What a task does: the download stage's shape, a thread pool calling through the limiter
# ---------------------------------------------------------------------------------------------


def burst(limiter: DomainLimiter, targets: list[tuple[str, int]], threads: int, tag: str) -> dict[str, Any]:
    """GET each (host key, port) target through `limiter.slot(host)` from a pool of `threads`."""
    pid = os.getpid()

    def one(i_target: tuple[int, tuple[str, int]]) -> int:
        i, (host, port) = i_target
        with limiter.slot(host):
            return get(port, f"/{host}/{tag}/{i}?pid={pid}")

    with ThreadPoolExecutor(threads, thread_name_prefix="domains-test") as pool:
        backend = pool.submit(limiter.backend).result()  # as the stage's fetch threads see it
        statuses = list(pool.map(one, enumerate(targets)))
    return {"pid": pid, "backend": backend, "statuses": statuses}


def pids_seen(recorder: Recorder) -> set[int]:
    return {int(path.rsplit("pid=", 1)[1]) for _, _, path in recorder.arrivals}


def check_rate(times: list[float], n_requests: int) -> None:
    assert len(times) == n_requests
    worst = max_in_window(times)
    assert worst <= RATE + TOLERANCE, f"{worst} request starts in one second (limit {RATE:g}/s)"
    # the same bound, the other way round: n starts need at least ceil(n / N) - 1 holds of N / R
    # seconds between the first and the last grant (less one server-side delay, well under 0.5 s)
    least = (-(-n_requests // N) - 1) * N / RATE - 0.5
    assert times[-1] - times[0] >= least, f"{n_requests} requests in {times[-1] - times[0]:.2f}s"


# ---------------------------------------------------------------------------------------------
# Across the processes of a real cluster
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_client(shared_cluster: Any) -> Any:
    """The session's LocalCluster (two worker processes, tests/conftest.py): each test here uses a
    namespace of its own, so the semaphores other runs left on its scheduler are not theirs. Its
    client is not the default one: the process-local tests in this module must see no cluster."""
    client = shared_cluster.client
    client.wait_for_workers(2, timeout=WAIT)
    return client


def workers(client: Any) -> list[str]:
    addrs = sorted(client.scheduler_info(n_workers=-1)["workers"])
    assert len(addrs) == 2
    return addrs


def test_limits_hold_across_worker_processes(cluster_client: Any) -> None:
    client = cluster_client
    addrs = workers(client)
    limiter = DomainLimiter(N, RATE, namespace="mm1-domain-test-rate")
    recorder = Recorder()
    n_tasks, per_task = 4, 8  # 32 requests: at RATE they span 3 s, so a 1-second window can overflow
    with recording_server(recorder, "one") as port:
        futures = [
            client.submit(burst, limiter, [("127.0.0.1", port)] * per_task, 4, f"t{i}",
                          key=f"domains-burst-{i}", workers=[addrs[i % 2]], pure=False)
            for i in range(n_tasks)
        ]
        results = client.gather(futures)
    assert all(r["statuses"] == [200] * per_task for r in results)
    assert {r["backend"] for r in results} == {"dask"}  # the pool threads found the cluster
    worker_pids = set(client.run(os.getpid).values())
    assert {r["pid"] for r in results} == worker_pids
    assert pids_seen(recorder) == worker_pids, "both worker processes must have sent requests"

    assert recorder.max_inflight["one"] <= N, f"{recorder.max_inflight['one']} requests in flight at once"
    assert recorder.max_inflight["one"] == N  # and the limit is used, not a lock in disguise
    check_rate(recorder.times("one"), n_tasks * per_task)

    # the per-host semaphore is forgotten on the scheduler once idle (the last releases may lag)
    deadline, closed = time.monotonic() + 30, 0
    while closed == 0 and time.monotonic() < deadline:
        closed = close_idle(client, namespace=limiter.namespace)
        time.sleep(0.1)
    assert closed == 1
    assert close_idle(client, namespace=limiter.namespace) == 0
    # the workers still cache the forgotten semaphore: their next slots register it afresh
    with recording_server(recorder, "again") as port:
        again = client.gather([
            client.submit(burst, limiter, [("127.0.0.1", port)] * 3, 2, f"again{i}",
                          key=f"domains-again-{i}", workers=[addrs[i % 2]], pure=False)
            for i in range(2)
        ])
    assert all(r["statuses"] == [200] * 3 for r in again)
    assert recorder.max_inflight["again"] <= N


def test_hosts_do_not_block_each_other_across_processes(cluster_client: Any) -> None:
    client = cluster_client
    addrs = workers(client)
    limiter = DomainLimiter(1, None, namespace="mm1-domain-test-hosts")
    recorder = Recorder()
    with recording_server(recorder, "a", 0.2) as port_a, recording_server(recorder, "b", 0.2) as port_b:
        targets = [("a.test", port_a), ("b.test", port_b)] * 4
        futures = [
            client.submit(burst, limiter, targets, 4, f"h{i}", key=f"domains-hosts-{i}",
                          workers=[addrs[i % 2]], pure=False)
            for i in range(2)
        ]
        results = client.gather(futures)
    assert all(r["statuses"] == [200] * len(targets) for r in results)
    assert len(pids_seen(recorder)) == 2
    assert recorder.max_inflight["a"] == recorder.max_inflight["b"] == 1  # one at a time per host
    assert recorder.max_total == 2, "the two hosts never had a request in flight at the same time"


def _acquired(name: str, dask_scheduler: Any = None) -> int:
    return dask_scheduler.extensions["semaphores"].metrics["acquire_total"][name]


def test_a_busy_host_hands_leases_on_within_a_process_and_back_to_the_cluster(cluster_client: Any) -> None:
    """Leases go from one request of a process to the next (domains._pooled): a busy host costs
    far fewer scheduler round trips than requests, the limit still holds, and after at most
    MAX_HANDOFFS hand-offs a lease goes back to the scheduler, where the other process's
    requests for the host wait: they are served while the busy process still has work."""
    client = cluster_client
    addrs = workers(client)
    limiter = DomainLimiter(4, None, namespace="mm1-domain-test-handoff")
    recorder = Recorder()
    n_big, n_small = 240, 24
    with recording_server(recorder, "busy", 0.01) as port:
        futures = [
            client.submit(burst, limiter, [("127.0.0.1", port)] * n, 8, tag, key=f"domains-handoff-{tag}",
                          workers=[addr], pure=False)
            for n, tag, addr in ((n_big, "big", addrs[0]), (n_small, "small", addrs[1]))
        ]
        results = client.gather(futures)
    assert [r["statuses"] for r in results] == [[200] * n_big, [200] * n_small]
    assert recorder.max_inflight["busy"] <= 4
    acquired = client.run_on_scheduler(_acquired, limiter.semaphore_name("127.0.0.1"))
    assert 0 < acquired <= (n_big + n_small) // 4, f"{acquired} scheduler acquires for {n_big + n_small} requests"
    first_small = min(t for t, _, path in recorder.arrivals if "/small/" in path)
    last_big = max(t for t, _, path in recorder.arrivals if "/big/" in path)
    assert first_small < last_big, "the other process got no lease until the busy one was done"


def test_handoffs_keep_the_limit_and_return_every_lease() -> None:
    """The hand-off layer over a counting gate: never more than N leases out, far fewer raw
    acquires than slots, nothing kept once nobody waits, and a waiter that times out leaves no
    lease stranded in the idle list."""
    raw_sem = threading.BoundedSemaphore(2)
    counts = Counter()
    lock = threading.Lock()

    def raw_acquire(timeout: float | None) -> Any:
        with lock:
            counts["acquire"] += 1
        return object() if raw_sem.acquire(timeout=timeout) else None

    def raw_release(token: Any) -> None:
        with lock:
            counts["release"] += 1
        raw_sem.release()

    gate = domains._pooled(domains._Gate(raw_acquire, raw_release), 2)
    inflight, worst = [0], [0]

    def one(_: int) -> None:
        lease = gate.acquire(WAIT)
        assert lease is not None
        with lock:
            inflight[0] += 1
            worst[0] = max(worst[0], inflight[0])
        time.sleep(0.001)
        with lock:
            inflight[0] -= 1
        gate.release(lease)

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(one, range(400)))
    assert worst[0] == 2
    assert counts["acquire"] == counts["release"] <= 400 // 4
    assert all(raw_sem.acquire(blocking=False) for _ in range(2))  # every lease is back
    raw_sem.release(), raw_sem.release()

    # a waiter that times out while every lease is in use
    a, b = gate.acquire(1), gate.acquire(1)
    assert gate.acquire(0.05) is None
    gate.release(a), gate.release(b)
    assert all(raw_sem.acquire(blocking=False) for _ in range(2)), "a lease stayed idle with nobody waiting"


# ---------------------------------------------------------------------------------------------
# The process-local fallback (no Dask worker, no client)
# ---------------------------------------------------------------------------------------------


def test_local_fallback_holds_the_same_limits() -> None:
    limiter = DomainLimiter(N, RATE, namespace="mm1-domain-test-local")
    assert limiter.backend() == "local"
    recorder = Recorder()
    n = 20
    with recording_server(recorder, "local") as port:
        result = burst(limiter, [("127.0.0.1", port)] * n, 16, "local")
    assert result["backend"] == "local"
    assert result["statuses"] == [200] * n
    assert recorder.max_inflight["local"] == N
    check_rate(recorder.times("local"), n)


def test_local_hosts_do_not_block_each_other() -> None:
    limiter = DomainLimiter(1, None, namespace="mm1-domain-test-local-hosts")
    recorder = Recorder()
    with recording_server(recorder, "a", 0.2) as port_a, recording_server(recorder, "b", 0.2) as port_b:
        result = burst(limiter, [("a.test", port_a), ("b.test", port_b)] * 4, 8, "lh")
    assert result["statuses"] == [200] * 8
    assert recorder.max_inflight["a"] == recorder.max_inflight["b"] == 1
    assert recorder.max_total == 2


def test_a_slot_is_held_for_the_rate_even_when_the_request_fails() -> None:
    limiter = DomainLimiter(1, 2.0, namespace="mm1-domain-test-hold")  # hold 0.5 s
    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        with limiter.slot("down.test"):
            raise ConnectionRefusedError  # the request failed at once
    assert time.monotonic() - start < 0.4  # the caller's thread is not kept waiting ...
    with limiter.slot("down.test"):  # ... but the next request to the host is
        waited = time.monotonic() - start
    assert waited >= 0.45


def test_slot_timeout_and_no_host() -> None:
    limiter = DomainLimiter(1, None, namespace="mm1-domain-test-timeout")
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with limiter.slot("busy.test"):
            held.set()
            done.wait(WAIT)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert held.wait(WAIT)
    try:
        with pytest.raises(TimeoutError):
            with limiter.slot("busy.test", timeout=0.2):
                pass
        with limiter.slot("other.test", timeout=5):  # another host is free
            pass
        with limiter.slot("", timeout=0.01):  # no host: nothing is sent, no slot
            pass
    finally:
        done.set()
        thread.join(WAIT)
    with limiter.slot("busy.test", timeout=5):
        pass


def test_many_hosts_do_not_pile_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(domains, "MAX_CACHED", 8)
    limiter = DomainLimiter(1, None, namespace="mm1-domain-test-many")
    for i in range(50):
        with limiter.slot(f"h{i}.test"):
            pass
    deadline = time.monotonic() + 10
    while any(g.users for g in list(domains._GATES.values())) and time.monotonic() < deadline:
        time.sleep(0.01)  # the last releases run on the background thread
    with limiter.slot("last.test"):
        pass
    assert len(domains._GATES) <= 8  # the idle ones beyond the cap were dropped


def test_host_key_and_settings() -> None:
    assert host_key("Images.Example.COM.") == "images.example.com"
    assert host_key("https://Img.Example.com:8443/a.jpg?x=1") == "img.example.com"
    assert host_key("example.com:80") == "example.com"
    assert host_key("[::1]:8080") == "::1"
    assert host_key("http://[::1]/x") == "::1"
    assert host_key("") == host_key(None) == ""
    assert DomainLimiter(2, 10).hold_s == pytest.approx(0.2)
    assert DomainLimiter(4).hold_s == 0.0
    assert DomainLimiter(2, 10).semaphore_name("A.test") == "mm1-domain-a.test"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            DomainLimiter(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DomainLimiter(1, 0)
    clone = cloudpickle.loads(cloudpickle.dumps(DomainLimiter(3, 5.0, namespace="x")))
    assert (clone.max_concurrency, clone.max_rate, clone.namespace) == (3, 5.0, "x")


def test_interleave_by_host() -> None:
    urls = ["http://a.test/1", "http://a.test/2", "http://A.test:80/3", "http://b.test/1", "",
            "http://c.test/1", "http://b.test/2", "not a url", "http://a.test/4"]
    # hosts in first-appearance order (a, b, "", c, "not a url"), one of each in turn
    assert interleave_by_host(urls) == [0, 3, 4, 5, 7, 1, 6, 2, 8]
    assert interleave_by_host([]) == []
    assert interleave_by_host(["http://x.test/"] * 3) == [0, 1, 2]  # one host: partition order


class FakeFetcher:
    """Counts concurrent fetches per host; like curate.web.fetcher, asks its `gate` (robots.txt) first,
    then sends its one request inside `slot(host)` when given one."""

    def __init__(self, serve_s: float = 0.05) -> None:
        self.serve_s, self.lock = serve_s, threading.Lock()
        self.inflight: Counter[str] = Counter()
        self.max_inflight: Counter[str] = Counter()
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def fetch(self, url: str, gate: Any = None, slot: Any = None, **kwargs: Any) -> str:
        if gate is not None:
            gate(url)
        host = host_key(url)
        with slot(host) if slot is not None else nullcontext():
            with self.lock:
                self.calls.append((url, kwargs))
                self.inflight[host] += 1
                self.max_inflight[host] = max(self.max_inflight[host], self.inflight[host])
            time.sleep(self.serve_s)
            with self.lock:
                self.inflight[host] -= 1
        return "ok"


def test_limited_fetcher_with_robots_in_another_namespace_does_not_deadlock() -> None:
    """The stage's shape: image requests hold a slot each, and the gate before a request asks
    for the same host's robots.txt through a limiter of another namespace."""
    inner = FakeFetcher()
    robots = LimitedFetcher(inner, DomainLimiter(1, None, namespace="mm1-domain-test-robots"))
    images = LimitedFetcher(inner, DomainLimiter(1, None, namespace="mm1-domain-test-images"))

    def gate(url: str) -> None:
        robots.fetch("http://a.test/robots.txt", accept="text/plain")

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(images.fetch, f"http://a.test/{i}.jpg", gate=gate) for i in range(8)]
        assert [f.result(timeout=WAIT) for f in futures] == ["ok"] * 8
    assert inner.max_inflight["a.test"] <= 2  # one image fetch and one robots.txt at most
    assert ("http://a.test/robots.txt", {"accept": "text/plain"}) in inner.calls  # kwargs pass through
    assert images.serve_s == inner.serve_s  # other attributes are the wrapped fetcher's


def test_nested_slot_for_one_host_raises_instead_of_hanging() -> None:
    limiter = DomainLimiter(1, None, namespace="mm1-domain-test-nested")
    with limiter.slot("a.test"):
        with pytest.raises(RuntimeError, match="nested slot"):
            with limiter.slot("http://A.test/robots.txt"):
                pass
        with limiter.slot("b.test", timeout=5):  # another host nests fine
            pass
    with limiter.slot("a.test", timeout=5):  # the slot was given back
        pass


def hold_and_die(limiter: DomainLimiter, marker: str) -> str:
    """Take a slot and kill this worker process while holding it (once: a retry just returns)."""
    if os.path.exists(marker):
        return "retried"
    with limiter.slot("dying.test"):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(1)
    return "unreachable"


def take_slot(limiter: DomainLimiter) -> dict[str, Any]:
    """From a pool thread, as the stage would: first a short try, then a long one."""
    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            with limiter.slot("dying.test", timeout=0.2):
                out["short"] = "got"
        except TimeoutError:
            out["short"] = "timeout"
        start = time.monotonic()
        with limiter.slot("dying.test", timeout=WAIT):
            out["waited_s"] = time.monotonic() - start
        return out

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


def test_a_dead_workers_lease_comes_back_after_the_lease_timeout(tmp_path: Any) -> None:
    """A worker killed while it holds a host's only slot: the host is blocked until the
    scheduler's lease timeout (shortened here to 2 s) returns the lease, then usable again."""
    marker = str(tmp_path / "died")
    limiter = DomainLimiter(1, None, namespace="mm1-domain-test-death")
    config = {"distributed.scheduler.locks.lease-timeout": "2s",
              "distributed.scheduler.locks.lease-validation-interval": "0.5s"}
    with dask.config.set(config), \
            LocalCluster(n_workers=2, threads_per_worker=2, processes=True, host="127.0.0.1",
                         dashboard_address="127.0.0.1:0", memory_limit="2GiB") as cluster, \
            Client(cluster, set_as_default=False, timeout=WAIT) as client:
        client.wait_for_workers(2, timeout=WAIT)
        # A worker imports this module to unpickle its functions (tools.demo with it: seconds on a
        # busy machine); done first, so no import runs inside the 2 s lease timeout measured below.
        client.run(importlib.import_module, hold_and_die.__module__)
        a, b = workers(client)
        dying = client.submit(hold_and_die, limiter, marker, key="domains-die", workers=[a],
                              allow_other_workers=True, pure=False)  # its retry: wherever
        deadline = time.monotonic() + WAIT
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert os.path.exists(marker)
        got = client.submit(take_slot, limiter, key="domains-after-death", workers=[b], pure=False).result(WAIT)
        assert got["short"] == "timeout"  # the dead worker's lease still counted ...
        assert got["waited_s"] < 30  # ... until the lease timeout gave it back (2 s + checks)
        assert dying.result(WAIT) == "retried"  # the task itself ran again on the new worker
