"""The HTTP(S) client of the download stage: stdlib only, every request one bounded operation.

Contracts (DESIGN.md, "Fetching from the web"):
- `Fetcher.fetch(url)` never raises for anything a URL or a server can do. A failure is a
  `FetchResult` with a short stable code in `reason` (the `Drop` style of stages/base.py) and a
  deterministic `detail` (no object ids, no timings), so ledgers are reproducible.
- Names resolve through one injectable `Resolver`. Every resolved address is classified before any
  connection, on every redirect hop, and the socket dials the checked address itself: nothing
  re-resolves the name later, so DNS rebinding cannot swap the target after the check.
- `deadline_s` bounds the whole request (connect, TLS, redirects, headers, body). Each socket call
  gets the time left as its timeout, and one watchdog thread shuts the socket down at the deadline,
  so a server dripping one byte at a time cannot stretch a request.
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
- `max_bytes` bounds the body after decompression; memory stays bounded whatever the server sends.
- Opt-out (`X-Robots-Tag`): a response whose X-Robots-Tag headers carry one of
  `FetchPolicy.opt_out_directives` (noai, noimageai, noindex by default), for every agent or scoped
  to `FetchPolicy.robots_agent` ("mm1-pipeline: noimageai"), ends as `opted_out`: its body is never
  returned (at most a small one is drained so the connection can be reused). `none` is Google's
  shorthand for "noindex, nofollow", so it counts wherever noindex does. Directives scoped to other
  agents ("otherbot: noai") are ignored. Checked on the final 2xx response and on every redirect
  hop (a publisher's opt-out on the URL that redirects to a CDN still holds).
- `FetchResult.retry_after`: the server's Retry-After (delta-seconds or HTTP-date) in seconds,
  capped at `RETRY_AFTER_CAP_S`, for the caller's retry policy; the fetcher itself never retries
  (except once on a pooled keep-alive connection the server had already closed).

Drop codes: bad_url, dns_error, blocked, too_many_redirects, timeout, too_large, bad_content,
connection_error, opted_out, and http_<status> for a final status outside 2xx. A caller's `gate`
(robots.txt, see curate/web/robots.py) may end a fetch with its own code before a hop is requested.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import heapq
import http.client
import io
import ipaddress
import itertools
import re
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import quote, urljoin, urlsplit

BAD_URL = "bad_url"
DNS_ERROR = "dns_error"
BLOCKED = "blocked"
TOO_MANY_REDIRECTS = "too_many_redirects"
TIMEOUT = "timeout"
TOO_LARGE = "too_large"
BAD_CONTENT = "bad_content"
CONNECTION_ERROR = "connection_error"
OPTED_OUT = "opted_out"

RETRY_AFTER_CAP_S = 60.0  # a Retry-After longer than this is reported as this

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_BLOCK = 64 * 1024  # the most one body read asks for
_DRAIN_LIMIT = 64 * 1024  # a redirect or error body up to this size is read to keep the connection
_PATH_SAFE = "!$%&'()*+,/:;=?@[]~"  # kept as they are when a path is percent-encoded
_HOSTNAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fec0::/10")
)
# A pooled connection failing like this before any response byte was closed by the server while idle.
_STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, ssl.SSLEOFError,
          ssl.SSLZeroReturnError)


class ResolveError(Exception):
    """A host name has no usable address."""


class Resolver:
    """The one place names become addresses: system DNS via `socket.getaddrinfo`.

    Note the system resolver blocks and is not bounded by the request deadline."""

    def resolve(self, host: str, port: int) -> list[str]:
        if (literal := _literal(host)) is not None:
            return [literal]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise ResolveError(f"{host}: {getattr(exc, 'strerror', None) or exc}") from None
        return list(dict.fromkeys(str(info[4][0]) for info in infos))


class StaticResolver(Resolver):
    """A fixed {name: ip or [ips]} map; IP literals resolve to themselves. An unknown name raises
    `ResolveError` and never falls back to DNS (tests, the demo, pinned hosts)."""

    def __init__(self, hosts: Mapping[str, str | Sequence[str]]):
        self.hosts = {
            name.lower().rstrip("."): _ips([ips] if isinstance(ips, str) else ips)
            for name, ips in hosts.items()
        }

    def resolve(self, host: str, port: int) -> list[str]:
        if (literal := _literal(host)) is not None:
            return [literal]
        try:
            return list(self.hosts[host.lower().rstrip(".")])
        except KeyError:
            raise ResolveError(f"{host}: not in the static host map") from None


def _ips(ips: Sequence[str]) -> list[str]:
    return [str(ipaddress.ip_address(ip)) for ip in ips]  # ValueError names a bad entry


# The spellings inet_aton accepts besides dotted decimal: 2130706433, 0177.0.0.1, 0x7f.1, 127.1.
_LEGACY_V4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$", re.IGNORECASE)


@functools.lru_cache(maxsize=4096)  # pure; a fetch asks again for each hop and its robots.txt
def _literal(host: str) -> str | None:
    """The address an IP-literal host names, or None for a name. Legacy IPv4 spellings are
    decoded as the C resolver would (so `http://2130706433/` is 127.0.0.1 and is checked as
    such), without asking any name server."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _LEGACY_V4.match(host):
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _embedded_v4(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries to its destination (mapped, NAT64, 6to4), if any."""
    if addr.version != 6:
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return addr.sixtofour


@functools.lru_cache(maxsize=4096)  # pure: a host's few addresses are checked on every request
def address_class(ip: str) -> str | None:
    """Why an address must not be fetched from ("loopback", "private", "link_local", "cgnat",
    "multicast", "reserved", "unspecified"), or None for a public address. An IPv6 address that
    carries an IPv4 one (::ffff:10.0.0.1) is judged by the IPv4 address. ValueError if not an IP."""
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(ip)
    addr = _embedded_v4(addr) or addr
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link_local"
    if addr.is_multicast:
        return "multicast"
    if addr in _CGNAT:
        return "cgnat"
    if any(addr in net for net in _PRIVATE):
        return "private"
    if not addr.is_global:  # documentation, benchmarking, "this network", 240/4, ...
        return "reserved"
    return None


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


class _Failure(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class _Target(NamedTuple):
    scheme: str
    host: str  # lower-case, IDNA-encoded, or a normalised IP literal
    port: int
    path: str  # request target, percent-encoded
    host_header: str


@functools.lru_cache(maxsize=1024)  # pure: robots.txt's check, the gate and the fetch each parse it
def _parse_url(url: str) -> _Target:
    """Check and split an http(s) URL; everything else is `bad_url` (raised, so never cached)."""
    if not isinstance(url, str) or not url.strip():
        raise _Failure(BAD_URL, "empty URL")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise _Failure(BAD_URL, f"unparseable URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _Failure(BAD_URL, f"scheme {scheme!r} is not http or https")
    host = parts.hostname or ""
    if (literal := _literal(host)) is not None and "%" not in host:
        host = literal
    else:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            host = ""
        if not host or len(host) > 253 or not _HOSTNAME.fullmatch(host):
            raise _Failure(BAD_URL, f"bad or missing host in {url[:200]!r}")
    default = 443 if scheme == "https" else 80
    port = default if port is None else port
    if not 0 < port < 65536:
        raise _Failure(BAD_URL, f"bad port {port}")
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_PATH_SAFE)
    name = f"[{host}]" if ":" in host else host
    return _Target(scheme, host, port, path, name if port == default else f"{name}:{port}")


def _clean(text: object, limit: int = 200) -> str:
    """Untrusted or exception text made fit for a ledger: printable, bounded, no memory addresses."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(text))
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


# Directives that take a value after a colon: "max-snippet: 20" is a directive, not an agent scope.
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_AGENT_TOKEN = re.compile(r"[a-z0-9_.*-]+")
_NUMBER = re.compile(r"[+-]?[0-9]+")
_IMPLIED = {"none": ("noindex", "nofollow")}


def x_robots_opt_out(values: Iterable[str], agent: str, directives: Iterable[str]) -> str | None:
    """The first X-Robots-Tag directive among `values` (the headers' values, in order) that opts
    the resource out for `agent`, described for a ledger (`"noai"`, `"mm1-pipeline: noimageai"`,
    `"none" (implies noindex)`), or None.

    Each value is a comma-separated list of directives. `agent: directive` scopes that directive,
    and the ones after it in the same value, to one agent (until the next scope); unscoped
    directives apply to every agent. Only unscoped ones, ones scoped to `agent` and ones scoped to
    `*` count; names compare case-insensitively. `none` means "noindex, nofollow", so it opts out
    wherever `noindex` does."""
    agent = agent.strip().lower()
    wanted = [d.strip().lower() for d in directives]
    for value in values:
        scope: str | None = None
        for token in str(value).split(","):
            token = token.strip()
            head, colon, rest = token.partition(":")
            name = head.strip().lower()
            if (colon and name not in _VALUED_DIRECTIVES and _AGENT_TOKEN.fullmatch(name)
                    and not _NUMBER.fullmatch(rest.strip())):
                scope, token = name, rest.strip()  # "otherbot: noai": a new scope
                name = token.partition(":")[0].strip().lower()
            if not name or scope not in (None, "*", agent):
                continue
            named = (name, *_IMPLIED.get(name, ()))
            hit = next((d for d in wanted if d in named), None)
            if hit is not None:
                said = _clean(f"{scope}: {name}" if scope else name, 80)
                return f'"{said}"' + (f" (implies {hit})" if hit != name else "")
    return None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After in seconds from now: delta-seconds or an HTTP-date (a date in the past is 0),
    at most RETRY_AFTER_CAP_S; None when absent or unparseable."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]+", value):
        seconds = float(int(value[:12]))
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:  # HTTP-dates are GMT
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


class _Clock:
    """A request's deadline. `remaining()` raises TimeoutError once it has passed."""

    def __init__(self, seconds: float):
        self.expires = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.expires - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def expired(self) -> bool:
        return time.monotonic() >= self.expires

    def postpone(self, seconds: float) -> None:
        """Push the deadline back by `seconds` (time that is not the request's own). A deadline
        that had passed before those seconds began stays passed."""
        self.expires += seconds


class _Watch:
    """One request as the watchdog sees it: its deadline and the socket it is using now."""

    __slots__ = ("when", "sock", "fired", "done")

    def __init__(self, when: float):
        self.when, self.sock, self.fired, self.done = when, None, False, False


def _shut(sock: socket.socket) -> None:
    try:  # the C-level shutdown: on an SSLSocket, SSLSocket.shutdown would also drop its TLS state
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Watchdog:
    """One daemon thread that shuts down the socket of every request whose deadline passed, which
    wakes a thread blocked in recv/send at once. Started on demand; exits after a minute idle."""

    IDLE_EXIT_S = 60.0

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False

    def arm(self, when: float) -> _Watch:
        watch = _Watch(when)
        with self._cv:
            heapq.heappush(self._heap, (when, next(self._seq), watch))
            if self._thread is None:
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="mm1-fetch-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is watch:  # the new earliest deadline: the thread must wait less
                self._cv.notify()
        return watch

    def watch(self, watch: _Watch, sock: socket.socket | None) -> bool:
        """Make `sock` the one shut at the deadline (None: none). Returns whether it has passed."""
        with self._cv:
            watch.sock = sock
            if watch.fired and sock is not None:
                _shut(sock)
            return watch.fired

    def release(self, watch: _Watch) -> None:
        with self._cv:
            watch.done, watch.sock = True, None

    def stop(self) -> None:
        with self._cv:
            self._stop, thread = True, self._thread
            self._cv.notify_all()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        with self._cv:
            idle_since: float | None = None
            while not self._stop:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                now = time.monotonic()
                if not self._heap:
                    idle_since = now if idle_since is None else idle_since
                    if now - idle_since >= self.IDLE_EXIT_S:
                        break
                    self._cv.wait(self.IDLE_EXIT_S)
                    continue
                idle_since = None
                when, _, watch = self._heap[0]
                if when > now:
                    self._cv.wait(when - now)
                    continue
                heapq.heappop(self._heap)
                watch.fired = True
                if watch.sock is not None:
                    _shut(watch.sock)
            self._thread = None


class _DeadlineReader(io.RawIOBase):
    """The response's raw stream: every recv first gets the request's remaining time as timeout."""

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, clock: _Clock):
        self._raw, self._sock, self._clock = raw, sock, clock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int | None:  # type: ignore[override]
        self._sock.settimeout(self._clock.remaining())
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()  # the socket's makefile: releases its reference, not the socket
        super().close()


class _Response(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, clock: _Clock, **kwargs: object):
        super().__init__(sock, **kwargs)  # type: ignore[arg-type]
        self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, clock), 16 * 1024)


class _Conn(http.client.HTTPConnection):
    """A keep-alive connection to one checked IP. It never dials by itself (auto_open is off and
    connect() refuses): the Fetcher connects the socket, so nothing can re-resolve the name."""

    def __init__(self, key: tuple[str, str, int, str], sock: socket.socket):
        super().__init__(key[1], key[2])
        self.key, self.ip, self.sock, self.auto_open = key, key[3], sock, 0
        self.clock: _Clock | None = None
        self.response_class = lambda sock, **kw: _Response(sock, self.clock, **kw)  # type: ignore[assignment]

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


class _Decoder:
    """Undoes a Content-Encoding incrementally, never producing more than `limit` + 1 bytes in all
    (zlib's max_length), so a compression bomb costs no more memory than an honest body."""

    _WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

    def __init__(self, encoding: str | None, limit: int):
        self.encoding = (encoding or "identity").strip().lower() or "identity"
        self.limit, self.total = limit, 0
        self._z = None
        if self.encoding in self._WBITS:
            self._z = zlib.decompressobj(self._WBITS[self.encoding])
        elif self.encoding != "identity":
            raise _Failure(BAD_CONTENT, f"unsupported Content-Encoding {_clean(self.encoding, 60)!r}")

    def feed(self, data: bytes) -> bytes:
        if self._z is None:
            self.total += len(data)
            return data
        out = bytearray()
        try:
            while data and self.total + len(out) <= self.limit:
                out += self._z.decompress(data, self.limit - self.total - len(out) + 1)
                data = self._z.unconsumed_tail
        except zlib.error as exc:
            raise _Failure(BAD_CONTENT, f"bad {self.encoding} body: {exc}") from None
        self.total += len(out)
        return bytes(out)

    def finish(self) -> None:
        if self._z is not None and not self._z.eof:
            raise _Failure(BAD_CONTENT, f"{self.encoding} body ends before its compressed stream does")


class _Request:
    """The state of one fetch across its hops."""

    def __init__(
        self, url: str, clock: _Clock, watch: _Watch, *, accept: str, max_bytes: int, opt_out: bool,
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
        self._allow = tuple(ipaddress.ip_network(net, strict=False) for net in policy.allow_networks)
        self._ssl = ssl_context if ssl_context is not None else ssl.create_default_context()
        self._watchdog = _Watchdog()
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
        clock = _Clock(self.policy.deadline_s)
        req = _Request(
            url, clock, self._watchdog.arm(clock.expires),
            accept=self.policy.accept if accept is None else accept,
            max_bytes=self.policy.max_bytes if max_bytes is None else max_bytes,
            opt_out=opt_out, gate=gate, slot=slot,
        )
        try:
            return self._follow(req)
        except (_Failure, OSError, http.client.HTTPException) as exc:
            failure = self._classify(exc, req)
            return FetchResult(
                False, req.status, None, failure.reason, failure.detail, req.url, req.content_type,
                req.dialled, req.retry_after,
            )
        finally:
            self._watchdog.release(req.watch)
            _abandon(req)

    def _classify(self, exc: Exception, req: _Request) -> _Failure:
        if isinstance(exc, _Failure):
            return exc
        if isinstance(exc, TimeoutError) or req.clock.expired():
            return _Failure(TIMEOUT, f"deadline of {self.policy.deadline_s:g}s passed {req.phase}")
        return _Failure(CONNECTION_ERROR, f"{type(exc).__name__}: {_clean(exc)} ({req.phase})")

    def _follow(self, req: _Request) -> FetchResult:
        for hop in range(self.policy.max_redirects + 1):
            req.status = req.content_type = req.retry_after = None
            target = _parse_url(req.url)
            if req.gate is not None and (closed := req.gate(req.url)) is not None:
                raise _Failure(*closed)
            ips = self._addresses(target)
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

    def _hop(self, req: _Request, target: _Target, ips: list[str], last: bool) -> FetchResult | str:
        """One request: the final result, or the URL a redirect points to (its response already
        drained and its connection pooled or closed). Raises `_Failure` for a refused answer."""
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
                raise _Failure(OPTED_OUT, f"X-Robots-Tag {said}")
        location = resp.getheader("Location") if resp.status in _REDIRECTS else None
        if location:
            self._finish(req, drain=True)
            try:
                next_url = urljoin(req.url, location.strip())
            except ValueError:
                raise _Failure(BAD_URL, f"unparseable redirect Location {_clean(location)!r}") from None
            if last:
                detail = f"more than {self.policy.max_redirects} redirects, the next to {_clean(next_url)}"
                raise _Failure(TOO_MANY_REDIRECTS, detail)
            return next_url
        if not 200 <= resp.status < 300:
            line = f"HTTP {resp.status} {_clean(resp.reason, 80)}".rstrip()
            self._finish(req, drain=True)
            raise _Failure(f"http_{resp.status}", line)
        body = self._read_body(req, resp)
        self._finish(req, drain=False)
        return FetchResult(True, resp.status, body, None, "", req.url, req.content_type, req.dialled,
                           req.retry_after)

    def _addresses(self, target: _Target) -> list[str]:
        """The host's addresses, all of them checked: one non-public address outside
        `allow_networks` blocks the host (a mixed answer is how rebinding attacks start)."""
        try:
            ips = self.resolver.resolve(target.host, target.port)
        except ResolveError as exc:
            raise _Failure(DNS_ERROR, _clean(exc)) from None
        if not ips:
            raise _Failure(DNS_ERROR, f"{target.host}: no addresses")
        for ip in ips:
            try:
                kind = address_class(ip)
                addr = ipaddress.ip_address(ip)
            except ValueError:
                detail = f"{target.host}: resolver gave {_clean(ip, 60)!r}, not an IP address"
                raise _Failure(DNS_ERROR, detail) from None
            inner = _embedded_v4(addr)
            if kind and not any(a in net for net in self._allow for a in (addr, inner) if a is not None):
                named = ip if target.host == ip else f"{target.host} resolves to {ip}"
                raise _Failure(BLOCKED, f"{named}: {kind} address")
        return ips

    def _exchange(self, req: _Request, target: _Target, ips: list[str]) -> http.client.HTTPResponse:
        """Send the GET and read the status line and headers, on a pooled connection if there is
        one (retried once on a fresh connection if the pooled one turns out closed)."""
        slot = len(req.dialled)
        conn = self._pool.take(target.scheme, target.host, target.port, ips)
        for fresh in (False, True) if conn is not None else (True,):
            if fresh:
                conn = self._open(req, target, ips, slot)
            assert conn is not None
            req.dialled[slot:] = [conn.ip]
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

    def _open(self, req: _Request, target: _Target, ips: list[str], slot: int) -> _Conn:
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
            raise _Failure(TOO_LARGE, f"Content-Length {resp.length} exceeds the cap of {cap} bytes")
        decoder = _Decoder(resp.getheader("Content-Encoding"), cap)
        body, received = bytearray(), 0
        req.phase = "reading the body"
        while chunk := resp.read1(_BLOCK):
            received += len(chunk)
            if received > cap:
                raise _Failure(TOO_LARGE, f"body exceeds the cap of {cap} bytes")
            body += decoder.feed(chunk)
            if len(body) > cap:
                detail = f"{decoder.encoding} body decodes to more than the cap of {cap} bytes"
                raise _Failure(TOO_LARGE, detail)
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
