"""Where a request may go: URL checks, name resolution and address classes.

Contracts (DESIGN.md, "Fetching from the web"):
- `parse_url(url)` accepts http and https URLs only and splits them into a `Target` (host lower
  case, IDNA-encoded or a normalised IP literal, the request path percent-encoded); anything
  else raises `FetchFailure(BAD_URL, ...)`.
- Names resolve through one injectable `Resolver` (system DNS, bounded by the request's time left
  and cached per process, answers and failures) or `StaticResolver` (a fixed map:
  tests, the demo, pinned hosts; it never falls back to DNS). IP literals, legacy IPv4 spellings
  included (`http://2130706433/` is 127.0.0.1), resolve to themselves without asking anyone.
- `checked_addresses` resolves a target and classifies every address it gets (`address_class`):
  one non-public address outside the allowed networks blocks the host (`BLOCKED`), since a mixed
  answer is how rebinding attacks start. The fetcher dials exactly the addresses it returns.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import NamedTuple
from urllib.parse import quote, urlsplit

from curate.web.drops import BAD_URL, BLOCKED, DNS_ERROR, TIMEOUT, FetchFailure, clean_text
from curate.web.netstats import DNS_CACHED, DNS_ERRORS, DNS_LOOKUPS, DNS_MS, DNS_TIMEOUTS, note

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_PATH_SAFE = "!$%&'()*+,/:;=?@[]~"  # kept as they are when a path is percent-encoded
_HOSTNAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fec0::/10")
)


class ResolveError(Exception):
    """A host name has no usable address."""


class ResolveTimeout(ResolveError):
    """The resolver did not answer within the time the request had left."""


class Resolver:
    """The one place names become addresses: system DNS via `socket.getaddrinfo`, bounded and
    cached per process (a download stage's resolver lives as long as its worker's stage).

    - Bounded: a lookup runs on a daemon thread and the request waits for it at most `timeout`
      (the time its deadline has left): a resolver that never answers ends the request as a
      `timeout`, not a stall. At most `threads` lookups run at once (a dead DNS server cannot
      pile up threads); the others wait, each bounded by its caller's timeout.
    - Cached: an answer for `ttl_s`, a failure (no such name) for `negative_ttl_s` (getaddrinfo
      gives no TTLs); concurrent requests for one name share one lookup. A timeout is not cached.
    """

    def __init__(self, ttl_s: float = 300.0, negative_ttl_s: float = 60.0, threads: int = 8):
        self.ttl_s, self.negative_ttl_s = ttl_s, negative_ttl_s
        self._slots = threading.BoundedSemaphore(threads)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, list[str] | ResolveError]] = {}
        self._inflight: dict[str, Future] = {}
        self.lookups = 0  # system lookups started (cache misses): statistics and tests

    def lookup(self, host: str, port: int) -> list[str]:
        """The system's answer (no cache, no bound): what a test replaces."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise ResolveError(f"{host}: {getattr(exc, 'strerror', None) or exc}") from None
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    def resolve(self, host: str, port: int, timeout: float | None = None) -> list[str]:
        """The name's addresses; each call noted in the thread's tally (curate/web/netstats.py)
        as a lookup or a cached answer, and as a DNS error or timeout when it ends as one."""
        if (literal := _literal(host)) is not None:
            return [literal]
        with self._lock:
            cached = self._cache.get(host)
            if cached is not None and cached[0] > time.monotonic():
                answer = cached[1]
            else:
                answer = None
                future = self._inflight.get(host)
                started = future is None
                if future is None:
                    future = self._inflight[host] = Future()
                    self.lookups += 1
                    threading.Thread(target=self._run, args=(host, port, future), daemon=True,
                                     name="mm1-dns").start()
        if answer is not None:
            note(host, DNS_CACHED)
            if isinstance(answer, ResolveError):
                note(host, DNS_ERRORS)
                raise answer
            return list(answer)
        note(host, DNS_LOOKUPS if started else DNS_CACHED)
        waited = time.monotonic()
        try:
            return list(future.result(timeout))
        except FutureTimeout:
            note(host, DNS_TIMEOUTS)
            raise ResolveTimeout(f"{host}: the resolver did not answer within {timeout:g}s") from None
        except ResolveError:
            note(host, DNS_ERRORS)
            raise
        finally:
            if started:
                note(host, DNS_MS, 1000 * (time.monotonic() - waited))

    def _run(self, host: str, port: int, future: Future) -> None:
        with self._slots:
            try:
                answer: list[str] | ResolveError = self.lookup(host, port)
            except ResolveError as exc:
                answer = exc
            except Exception as exc:  # noqa: BLE001 - any failure of the lookup is this name's
                answer = ResolveError(f"{host}: {type(exc).__name__}: {exc}")
        ttl = self.negative_ttl_s if isinstance(answer, ResolveError) else self.ttl_s
        with self._lock:
            self._cache[host] = (time.monotonic() + ttl, answer)
            self._inflight.pop(host, None)
        if isinstance(answer, ResolveError):
            future.set_exception(answer)
        else:
            future.set_result(answer)


class StaticResolver(Resolver):
    """A fixed {name: ip or [ips]} map; IP literals resolve to themselves. An unknown name raises
    `ResolveError` and never falls back to DNS (tests, the demo, pinned hosts). The map answers
    `Resolver`'s lookups, so it is cached and counted like DNS: a run with a host map shows the
    per-domain DNS statistics a run on DNS would."""

    def __init__(self, hosts: Mapping[str, str | Sequence[str]]):
        super().__init__()
        self.hosts = {
            name.lower().rstrip("."): _ips([ips] if isinstance(ips, str) else ips)
            for name, ips in hosts.items()
        }

    def lookup(self, host: str, port: int) -> list[str]:
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


class Target(NamedTuple):
    """Where one request goes, as `parse_url` checked it."""

    scheme: str
    host: str  # lower-case, IDNA-encoded, or a normalised IP literal
    port: int
    path: str  # request target, percent-encoded
    host_header: str


@functools.lru_cache(maxsize=1024)  # pure: robots.txt's check, the gate and the fetch each parse it
def parse_url(url: str) -> Target:
    """Check and split an http(s) URL; everything else is `bad_url` (raised, so never cached)."""
    if not isinstance(url, str) or not url.strip():
        raise FetchFailure(BAD_URL, "empty URL")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise FetchFailure(BAD_URL, f"unparseable URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchFailure(BAD_URL, f"scheme {scheme!r} is not http or https")
    host = parts.hostname or ""
    if (literal := _literal(host)) is not None and "%" not in host:
        host = literal
    else:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            host = ""
        if not host or len(host) > 253 or not _HOSTNAME.fullmatch(host):
            raise FetchFailure(BAD_URL, f"bad or missing host in {url[:200]!r}")
    default = 443 if scheme == "https" else 80
    port = default if port is None else port
    if not 0 < port < 65536:
        raise FetchFailure(BAD_URL, f"bad port {port}")
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_PATH_SAFE)
    name = f"[{host}]" if ":" in host else host
    return Target(scheme, host, port, path, name if port == default else f"{name}:{port}")


class Allowed(NamedTuple):
    """A network exempt from blocking, on `ports` only (None: every port)."""

    network: IPNetwork
    ports: frozenset[int] | None = None

    def admits(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        return addr in self.network and (self.ports is None or port in self.ports)


def allowed_network(entry: str) -> Allowed:
    """One `allow_networks` entry: a CIDR or address (every port), or with ports after a colon:
    `127.0.0.1:8080`, `10.0.0.0/8:80,443`, `[::1]:8080`, `[fd00::/8]:443`. ValueError names it."""
    text, ports = entry.strip(), None
    if text.startswith("["):
        net, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"allow_networks entry {entry!r}: write [IPv6 network]:port[,port...]")
        text, ports = net, rest[1:] if rest else None
    elif text.count(":") == 1:  # an IPv4 network with ports (an IPv6 one has several colons)
        text, ports = text.split(":")
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ValueError(f"allow_networks entry {entry!r}: {exc}") from None
    if ports is None:
        return Allowed(network)
    try:
        numbers = frozenset(int(p) for p in ports.split(","))
    except ValueError:
        numbers = frozenset()
    if not numbers or not all(0 < p < 65536 for p in numbers):
        raise ValueError(f"allow_networks entry {entry!r}: ports are numbers 1-65535 separated by commas")
    return Allowed(network, numbers)


def allowed_networks(entries: Iterable[str]) -> tuple[Allowed, ...]:
    """The networks exempt from blocking (`FetchPolicy.allow_networks`), each on its ports;
    ValueError names a bad entry."""
    return tuple(allowed_network(e) for e in entries)


def checked_addresses(resolver: Resolver, target: Target, allow: Sequence[Allowed],
                      timeout: float | None = None) -> list[str]:
    """The host's addresses, all of them checked: one non-public address outside `allow` (its
    network on the target's port) blocks the host (a mixed answer is how rebinding attacks start).
    An entry with ports admits those ports only: allowing a mirror at 10.0.0.5:443 does not allow
    a redirect to 10.0.0.5:22. Raises `FetchFailure` with `DNS_ERROR` (no usable answer) or
    `BLOCKED`, or `TIMEOUT` when the resolver does not answer within `timeout`."""
    try:
        ips = resolver.resolve(target.host, target.port, timeout)
    except ResolveTimeout as exc:  # transient: a retry round asks again
        raise FetchFailure(TIMEOUT, clean_text(exc)) from None
    except ResolveError as exc:
        raise FetchFailure(DNS_ERROR, clean_text(exc)) from None
    if not ips:
        raise FetchFailure(DNS_ERROR, f"{target.host}: no addresses")
    for ip in ips:
        try:
            kind = address_class(ip)
            addr = ipaddress.ip_address(ip)
        except ValueError:
            detail = f"{target.host}: resolver gave {clean_text(ip, 60)!r}, not an IP address"
            raise FetchFailure(DNS_ERROR, detail) from None
        inner = _embedded_v4(addr)
        if kind and not any(net.admits(a, target.port) for net in allow for a in (addr, inner) if a is not None):
            named = ip if target.host == ip else f"{target.host} resolves to {ip}"
            if any(a in net.network for net in allow for a in (addr, inner) if a is not None):
                raise FetchFailure(BLOCKED, f"{named}: {kind} address, port {target.port} not allowed")
            raise FetchFailure(BLOCKED, f"{named}: {kind} address")
    return ips
