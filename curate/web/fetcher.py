"""The HTTP(S) client of the download stage: stdlib only, every request one bounded operation.

Contracts (DESIGN.md, "Fetching from the web"):
- `Fetcher.fetch(url)` never raises for anything a URL or a server can do. A failure is a
  `FetchResult` with a short stable code in `reason` (curate/web/drops.py) and a deterministic
  `detail` (no object ids, no timings), so ledgers are reproducible.
- Names resolve through one injectable `Resolver` (curate/web/addresses.py). Every resolved
  address is classified before any connection, on every redirect hop, and the socket dials the
  checked address itself: nothing re-resolves the name later, so DNS rebinding cannot swap the
  target after the check.
- `deadline_s` bounds the whole request (connect, TLS, redirects, headers, body). Each socket call
  gets the time left as its timeout, and one watchdog thread shuts the socket down at the deadline
  (curate/web/deadlines.py), so a server dripping one byte at a time cannot stretch a request.
- Politeness slots (`fetch(url, slot=...)`, curate.web.hosts.LimitedFetcher): every request -- every
  redirect hop -- is sent inside a slot of ITS OWN host, `slot(host)`, taken after that hop's gate
  and address checks (a hop refused without sending takes none) and held until the hop's response
  is done with (body read, or drained and the connection pooled or closed). Hops run one after
  another and hop N's slot is given back before hop N+1's gate runs, so a fetch holds at most one
  slot at a time and never nests them. Time spent WAITING for a slot, on any hop, does not count
  against the deadline (the clock and the watchdog are pushed back by the wait): a busy host never
  turns into a `timeout` (which a caller would retry, sending more requests), and the deadline
  still bounds everything the request spends on the network. A fetch's wall time is therefore
  at most the deadline plus its slot waits, each bounded by the requests ahead of it in that
  host's queue (each one bounded by its own deadline).
- `max_bytes` bounds the body after decompression; memory stays bounded whatever the server sends
  (curate/web/headers.py: ContentDecoder).
- Opt-out (`X-Robots-Tag`, curate/web/headers.py: x_robots_opt_out): a response whose
  X-Robots-Tag headers carry one of `FetchPolicy.opt_out_directives` (noai, noimageai, noindex by
  default), for every agent or scoped to `FetchPolicy.robots_agent` ("mm1-pipeline: noimageai"),
  ends as `opted_out`: its body is never returned (at most a small one is drained so the
  connection can be reused). Checked on the final 2xx response and on every redirect hop (a
  publisher's opt-out on the URL that redirects to a CDN still holds).
- `FetchResult.retry_after`: the server's Retry-After in seconds, capped at `RETRY_AFTER_CAP_S`,
  for the caller's retry policy; the fetcher itself never retries (except once on a pooled
  keep-alive connection the server had already closed).

Drop codes: bad_url, dns_error, blocked, too_many_redirects, timeout, too_large, bad_content,
connection_error, opted_out, and http_<status> for a final status outside 2xx. A caller's `gate`
(robots.txt, see curate/web/robots.py) may end a fetch with its own code before a hop is requested.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from urllib.parse import urljoin

from curate.web.addresses import Resolver, Target, allowed_networks, checked_addresses, parse_url
from curate.web.deadlines import Clock, DeadlineResponse, Watch, Watchdog
from curate.web.drops import (
    BAD_URL,
    CONNECTION_ERROR,
    OPTED_OUT,
    TIMEOUT,
    TOO_LARGE,
    TOO_MANY_REDIRECTS,
    FetchFailure,
    clean_text,
)
from curate.web.headers import ContentDecoder, parse_retry_after, x_robots_opt_out
from curate.web.netstats import BYTES, CONN_FAILURES, note, note_request

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_BLOCK = 64 * 1024  # the most one body read asks for
_DRAIN_LIMIT = 64 * 1024  # a redirect or error body up to this size is read to keep the connection
# A pooled connection failing like this before any response byte was closed by the server while idle.
_STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, ssl.SSLEOFError,
          ssl.SSLZeroReturnError)


@dataclass(frozen=True)
class FetchPolicy:
    deadline_s: float = 10.0  # total per request: connect, TLS, every redirect hop, headers, body
    max_bytes: int = 16 * 1024 * 1024  # body cap, counted after decompression
    max_redirects: int = 5
    allow_networks: tuple[str, ...] = ()  # CIDRs exempt from blocking, e.g. ("127.0.0.0/8",)
    user_agent: str = "mm1-pipeline/0.1 (+https://github.com/mm1-pipeline)"
    accept: str = "image/*"
    # X-Robots-Tag directives that opt a resource out (case-insensitive), and the product token
    # whose scoped directives ("mm1-pipeline: noai") apply to us (robots.txt matches it too)
    opt_out_directives: tuple[str, ...] = ("noai", "noimageai", "noindex")
    robots_agent: str = "mm1-pipeline"


@dataclass
class FetchResult:
    ok: bool
    status: int | None  # the last HTTP status seen, None if no response came
    body: bytes | None  # only when ok
    reason: str | None  # the drop code when not ok
    detail: str
    final_url: str  # the URL of the last hop tried
    content_type: str | None
    dialled: list[str] = field(default_factory=list)  # the IP each hop connected to, in order
    retry_after: float | None = None  # seconds, from the last response's Retry-After, if any


# A fetch's gate: called with each hop's URL before it is resolved or dialled; a (code, detail)
# answer ends the fetch as a failure with that code (robots.txt: curate.web.robots.RobotsCache.gate).
Gate = Callable[[str], "tuple[str, str] | None"]

# A fetch's politeness slot: called with the host of each request about to be sent (the hop's
# target host: lower case, IDNA-encoded, or a normalised IP literal) and held around that one
# request; may block until the host is free (curate.web.hosts.DomainLimiter.slot). An OSError it
# raises (a TimeoutError of a slot with a timeout) ends the fetch as `timeout` or
# `connection_error` "waiting for a slot for HOST"; anything else propagates to the caller.
Slot = Callable[[str], AbstractContextManager[object]]


class _Conn(http.client.HTTPConnection):
    """A keep-alive connection to one checked IP. It never dials by itself (auto_open is off and
    connect() refuses): the Fetcher connects the socket, so nothing can re-resolve the name."""

    def __init__(self, key: tuple[str, str, int, str], sock: socket.socket):
        super().__init__(key[1], key[2])
        self.key, self.ip, self.sock, self.auto_open = key, key[3], sock, 0
        self.clock: Clock | None = None
        self.response_class = lambda sock, **kw: DeadlineResponse(sock, self.clock, **kw)  # type: ignore[assignment]

    def connect(self) -> None:
        raise http.client.NotConnected("a pinned connection is only connected by the Fetcher")


class _Pool:
    """Idle keep-alive connections by (scheme, host, port, ip); LIFO, bounded, aged out."""

    def __init__(self, per_key: int = 8, total: int = 256, idle_s: float = 30.0):
        self.per_key, self.total, self.idle_s = per_key, total, idle_s
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str, int, str], list[tuple[float, _Conn]]] = {}
        self._count = 0

    def take(self, scheme: str, host: str, port: int, ips: list[str]) -> _Conn | None:
        found: _Conn | None = None
        old: list[_Conn] = []
        now = time.monotonic()
        with self._lock:
            for ip in ips:
                key = (scheme, host, port, ip)
                idle = self._idle.get(key, [])
                while idle and found is None:
                    since, conn = idle.pop()
                    self._count -= 1
                    if now - since > self.idle_s:
                        old.append(conn)  # the newest is too old, so the rest are too
                    else:
                        found = conn
                if not idle:
                    self._idle.pop(key, None)
                if found is not None:
                    break
        for conn in old:
            conn.close()
        return found

    def put(self, conn: _Conn) -> None:
        with self._lock:
            idle = self._idle.setdefault(conn.key, [])
            if len(idle) < self.per_key and self._count < self.total:
                idle.append((time.monotonic(), conn))
                self._count += 1
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [conn for idle in self._idle.values() for _, conn in idle]
            self._idle.clear()
            self._count = 0
        for conn in conns:
            conn.close()


class _Request:
    """The state of one fetch across its hops."""

    def __init__(
        self, url: str, clock: Clock, watch: Watch, *, accept: str, max_bytes: int, opt_out: bool,
        gate: Gate | None, slot: Slot | None,
    ):
        self.url, self.clock, self.watch = url, clock, watch
        self.accept, self.max_bytes, self.opt_out, self.gate = accept, max_bytes, opt_out, gate
        self.slot = slot
        self.retry_after: float | None = None
        self.dialled: list[str] = []
        self.phase = "starting"
        self.conn: _Conn | None = None
        self.resp: http.client.HTTPResponse | None = None
        self.status: int | None = None
        self.content_type: str | None = None


class Fetcher:
    """Fetches URLs under one `FetchPolicy`. Thread-safe: one Fetcher serves a thread pool, sharing
    its keep-alive pool and its watchdog. `close()` once the fetches are done."""

    def __init__(
        self, policy: FetchPolicy, resolver: Resolver | None = None, *, ssl_context: ssl.SSLContext | None = None
    ):
        self.policy = policy
        self.resolver = resolver if resolver is not None else Resolver()
        self._allow = allowed_networks(policy.allow_networks)
        self._ssl = ssl_context if ssl_context is not None else ssl.create_default_context()
        self._watchdog = Watchdog()
        self._pool = _Pool()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle connections and stop the watchdog (a later fetch starts them again)."""
        self._pool.close()
        self._watchdog.stop()

    def fetch(
        self,
        url: str,
        *,
        accept: str | None = None,
        max_bytes: int | None = None,
        opt_out: bool = True,
        gate: Gate | None = None,
        slot: Slot | None = None,
    ) -> FetchResult:
        """One bounded GET. `accept` and `max_bytes` override the policy's for this request (a
        robots.txt is text, and has its own cap); `opt_out=False` skips the X-Robots-Tag check
        (robots.txt itself often carries "noindex"); `gate` is asked about every hop's URL
        before it is resolved or dialled; `slot(host)` is held around every request actually
        sent, one hop at a time, and waiting for it does not count against the deadline (see
        the module docstring)."""
        clock = Clock(self.policy.deadline_s)
        req = _Request(
            url, clock, self._watchdog.arm(clock.expires),
            accept=self.policy.accept if accept is None else accept,
            max_bytes=self.policy.max_bytes if max_bytes is None else max_bytes,
            opt_out=opt_out, gate=gate, slot=slot,
        )
        try:
            return self._follow(req)
        except (FetchFailure, OSError, http.client.HTTPException) as exc:
            failure = self._classify(exc, req)
            if isinstance(exc, OSError):  # refused, reset, timed out: per-domain stats (netstats)
                note(parse_url(req.url).host, CONN_FAILURES)
            return FetchResult(
                False, req.status, None, failure.reason, failure.detail, req.url, req.content_type,
                req.dialled, req.retry_after,
            )
        finally:
            self._watchdog.release(req.watch)
            _abandon(req)

    def _classify(self, exc: Exception, req: _Request) -> FetchFailure:
        if isinstance(exc, FetchFailure):
            return exc
        if isinstance(exc, TimeoutError) or req.clock.expired():
            return FetchFailure(TIMEOUT, f"deadline of {self.policy.deadline_s:g}s passed {req.phase}")
        return FetchFailure(CONNECTION_ERROR, f"{type(exc).__name__}: {clean_text(exc)} ({req.phase})")

    def _follow(self, req: _Request) -> FetchResult:
        for hop in range(self.policy.max_redirects + 1):
            req.status = req.content_type = req.retry_after = None
            target = parse_url(req.url)
            if req.gate is not None and (closed := req.gate(req.url)) is not None:
                raise FetchFailure(*closed)
            req.phase = f"resolving {target.host}"
            ips = checked_addresses(self.resolver, target, self._allow, req.clock.remaining())
            with self._held(req, target.host):
                outcome = self._hop(req, target, ips, last=hop == self.policy.max_redirects)
            if isinstance(outcome, FetchResult):
                return outcome
            req.url = outcome
        raise AssertionError("unreachable: the last hop returns or raises")

    @contextmanager
    def _held(self, req: _Request, host: str) -> Iterator[None]:
        """The hop's politeness slot (none without `req.slot`), held until the hop is done with:
        a hop that fails inside closes its connection before the slot is given back. The time
        spent waiting for the slot is added to the deadline, the watchdog's included."""
        if req.slot is None:
            yield
            return
        req.phase = f"waiting for a slot for {host}"
        asked = time.monotonic()
        with req.slot(host):
            req.clock.postpone(time.monotonic() - asked)
            self._watchdog.release(req.watch)  # its deadline was the old one: arm the new one
            req.watch = self._watchdog.arm(req.clock.expires)
            try:
                yield
            except BaseException:
                _abandon(req)
                raise

    def _hop(self, req: _Request, target: Target, ips: list[str], last: bool) -> FetchResult | str:
        """One request: the final result, or the URL a redirect points to (its response already
        drained and its connection pooled or closed). Raises `FetchFailure` for a refused answer."""
        resp = self._exchange(req, target, ips)
        req.status, req.content_type = resp.status, resp.getheader("Content-Type")
        req.retry_after = parse_retry_after(resp.getheader("Retry-After"))
        if req.opt_out and 200 <= resp.status < 400:
            said = x_robots_opt_out(
                resp.headers.get_all("X-Robots-Tag") or (), self.policy.robots_agent,
                self.policy.opt_out_directives,
            )
            if said is not None:
                self._finish(req, drain=True)  # the body is never kept: at most a small one drained
                raise FetchFailure(OPTED_OUT, f"X-Robots-Tag {said}")
        location = resp.getheader("Location") if resp.status in _REDIRECTS else None
        if location:
            self._finish(req, drain=True)
            try:
                next_url = urljoin(req.url, location.strip())
            except ValueError:
                raise FetchFailure(BAD_URL, f"unparseable redirect Location {clean_text(location)!r}") from None
            if last:
                detail = f"more than {self.policy.max_redirects} redirects, the next to {clean_text(next_url)}"
                raise FetchFailure(TOO_MANY_REDIRECTS, detail)
            return next_url
        if not 200 <= resp.status < 300:
            line = f"HTTP {resp.status} {clean_text(resp.reason, 80)}".rstrip()
            self._finish(req, drain=True)
            raise FetchFailure(f"http_{resp.status}", line)
        body = self._read_body(req, resp)
        note(target.host, BYTES, len(body))
        self._finish(req, drain=False)
        return FetchResult(True, resp.status, body, None, "", req.url, req.content_type, req.dialled,
                           req.retry_after)

    def _exchange(self, req: _Request, target: Target, ips: list[str]) -> http.client.HTTPResponse:
        """Send the GET and read the status line and headers, on a pooled connection if there is
        one (retried once on a fresh connection if the pooled one turns out closed)."""
        slot = len(req.dialled)
        conn = self._pool.take(target.scheme, target.host, target.port, ips)
        for fresh in (False, True) if conn is not None else (True,):
            if fresh:
                conn = self._open(req, target, ips, slot)
            assert conn is not None
            req.dialled[slot:] = [conn.ip]
            note_request(target.host, fresh)
            req.conn, conn.clock = conn, req.clock
            self._watchdog.watch(req.watch, conn.sock)
            try:
                req.phase = "sending the request"
                conn.sock.settimeout(req.clock.remaining())
                conn.putrequest("GET", target.path, skip_host=True, skip_accept_encoding=True)
                conn.putheader("Host", target.host_header)
                conn.putheader("User-Agent", self.policy.user_agent)
                conn.putheader("Accept", req.accept)
                conn.putheader("Accept-Encoding", "identity")
                conn.endheaders()
                req.phase = "waiting for the response headers"
                req.resp = conn.getresponse()
                return req.resp
            except (OSError, http.client.HTTPException) as exc:
                if fresh or req.clock.expired() or not isinstance(exc, _STALE):
                    raise
                conn.close()
                req.conn = None
        raise AssertionError("unreachable: a fresh connection returns or raises")

    def _open(self, req: _Request, target: Target, ips: list[str], slot: int) -> _Conn:
        """Dial the checked addresses in order until one answers; TLS with SNI and a hostname
        check against the URL's host. Never resolves anything."""
        error: OSError | None = None
        for ip in ips:
            req.dialled[slot:] = [ip]
            req.phase = f"connecting to {ip}"
            sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
            try:
                self._watchdog.watch(req.watch, sock)
                sock.settimeout(req.clock.remaining())
                sock.connect((ip, target.port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if target.scheme == "https":
                    req.phase = "in the TLS handshake"
                    sock = self._ssl.wrap_socket(
                        sock, server_hostname=target.host, do_handshake_on_connect=False
                    )
                    self._watchdog.watch(req.watch, sock)
                    sock.settimeout(req.clock.remaining())
                    sock.do_handshake()
                return _Conn((target.scheme, target.host, target.port, ip), sock)
            except BaseException as exc:
                sock.close()
                # only a refused or unreachable address moves on to the next one
                final = isinstance(exc, (TimeoutError, ssl.SSLError)) or req.clock.expired()
                if final or not isinstance(exc, OSError):
                    raise
                error = exc
        assert error is not None
        raise error

    def _read_body(self, req: _Request, resp: http.client.HTTPResponse) -> bytes:
        """The body, decoded, at most `max_bytes`; stops reading the moment the cap is passed."""
        cap = req.max_bytes
        if resp.length is not None and resp.length > cap:
            raise FetchFailure(TOO_LARGE, f"Content-Length {resp.length} exceeds the cap of {cap} bytes")
        decoder = ContentDecoder(resp.getheader("Content-Encoding"), cap)
        req.phase = "reading the body"
        if resp.length is not None and decoder.encoding == "identity":
            # The common case, read straight into the body's bytes: no growing buffer, no copy, one
            # Python call per recv (each still under the deadline): 0.38 -> 0.28 ms of CPU per fetch
            # of the download bench's images (250 KiB on average).
            try:
                return resp.read()
            except http.client.IncompleteRead as exc:  # a short body is an error here too
                got = len(exc.partial)
                raise ConnectionError(f"body ended after {got} of {got + exc.expected} bytes") from None
        body, received = bytearray(), 0
        while chunk := resp.read1(_BLOCK):
            received += len(chunk)
            if received > cap:
                raise FetchFailure(TOO_LARGE, f"body exceeds the cap of {cap} bytes")
            body += decoder.feed(chunk)
            if len(body) > cap:
                detail = f"{decoder.encoding} body decodes to more than the cap of {cap} bytes"
                raise FetchFailure(TOO_LARGE, detail)
        if resp.length:  # http.client stops at EOF without complaint: a short body is an error here
            raise ConnectionError(f"body ended after {received} of {received + resp.length} bytes")
        decoder.finish()
        return bytes(body)

    def _finish(self, req: _Request, drain: bool) -> None:
        """Done with the hop's response: pool its connection when the response was read to its end
        and the server keeps the connection open, else close it. Never raises."""
        conn, resp = req.conn, req.resp
        req.conn = req.resp = None
        assert conn is not None and resp is not None
        try:
            if drain:
                _drain(resp)
            complete = resp.isclosed() or resp.length == 0
        except (OSError, http.client.HTTPException):
            complete = False
        passed = self._watchdog.watch(req.watch, None)
        resp.close()
        if complete and not resp.will_close and conn.sock is not None and not passed:
            self._pool.put(conn)
        else:
            conn.close()


def _abandon(req: _Request) -> None:
    """Close the connection of a hop that failed half way (its state is unknown); no-op when the
    hop's response was already done with."""
    conn, resp = req.conn, req.resp
    req.conn = req.resp = None
    if resp is not None:
        resp.close()
    if conn is not None:
        conn.close()


def _drain(resp: http.client.HTTPResponse) -> None:
    """Read a small unwanted body (a redirect's, an error page) so the connection can be reused."""
    if resp.length is not None:
        if resp.length <= _DRAIN_LIMIT:
            resp.read()
    elif resp.chunked:
        left = _DRAIN_LIMIT
        while left > 0 and (chunk := resp.read1(min(left, _BLOCK))):
            left -= len(chunk)
