"""curate.web's client (fetcher, addresses, headers, deadlines) against real servers on loopback:
a threaded HTTP server with routes for every behaviour the web has (redirect chains and loops,
lying lengths, endless bodies, drips, gzip bombs, idle-closed keep-alive connections), a TLS
server with a throwaway certificate, and a canary listener that proves a blocked address is never
dialled.

Nothing leaves the machine: a module-wide guard fails any connect to a non-loopback address and
any name lookup that is not an IP literal, so even a broken fetcher cannot reach out.
"""

from __future__ import annotations

import gzip
import http.server
import io
import json
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image
from skimage import data

from curate.web.addresses import ResolveError, Resolver, StaticResolver, address_class
from curate.web.deadlines import Watchdog
from curate.web.fetcher import Fetcher, FetchPolicy
from curate.web.headers import parse_retry_after

LOOPBACK = ("127.0.0.0/8",)
DRIP_LIMIT_S = 30.0  # a dripping handler gives up on its own after this long


# --------------------------------------------------------------------------------------------
# The network guard
# --------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("loopback_only")  # tests/conftest.py


# --------------------------------------------------------------------------------------------
# The servers
# --------------------------------------------------------------------------------------------


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


JPEG = _jpeg()
BOMB = gzip.compress(b"\0" * 10_000_000, compresslevel=9)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # an idle keep-alive connection's handler thread ends after this

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "text/plain", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _drip(self, data: bytes) -> None:
        """Write one byte every 0.2 s until the client goes away (or DRIP_LIMIT_S passes)."""
        end = time.monotonic() + DRIP_LIMIT_S
        try:
            for i in range(len(data)):
                if time.monotonic() > end:
                    break
                self.wfile.write(data[i : i + 1])
                time.sleep(0.2)
        except OSError:
            pass
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        if path == "/img.jpg":
            return self._send(200, JPEG, "image/jpeg")
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            return self._send(code, f"status {code}\n".encode())
        if path.startswith("/redirect/"):  # /redirect/N: N hops, then the image
            n = int(path.rsplit("/", 1)[1])
            return self._send(302, Location="/img.jpg" if n <= 1 else f"/redirect/{n - 1}")
        if path == "/loop":
            return self._send(301, Location="/loop")
        if path == "/redirect-to":
            return self._send(302, Location=query["url"][0])
        if path == "/xrt":  # the image with one X-Robots-Tag header per `v`, the body as large as `n`
            size = int(query.get("n", ["0"])[0])
            body = JPEG + b"\0" * max(0, size - len(JPEG))
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            for value in query.get("v", []):
                self.send_header("X-Robots-Tag", value)
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:  # the client read the headers and hung up: the opt-out at work
                pass
            self.close_connection = self.close_connection or size > 0  # no reading after a hang-up
            return
        if path == "/retry-after":  # `code` with Retry-After `ra` (when given)
            extra = {"Retry_After": query["ra"][0]} if "ra" in query else {}
            return self._send(int(query["code"][0]), b"later\n", **extra)
        if path == "/headers":
            return self._send(200, json.dumps(dict(self.headers.items())).encode(), "application/json")
        if path == "/big":  # declares 1 GB, sends nothing
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            self.close_connection = True
            return
        if path == "/endless":  # chunked, never ends (stops when the client leaves)
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
            try:
                for _ in range(20_000):  # 1.3 GB at most
                    self.wfile.write(chunk)
            except OSError:
                pass
            self.close_connection = True
            return
        if path == "/drip":  # headers at once, then the body one byte every 0.2 s
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            return self._drip(b"x" * 100_000)
        if path == "/drip-headers":  # the header block itself one byte every 0.2 s
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            return self._drip(b"X-Pad: " + b"a" * 50_000)
        if path == "/gzip-bomb":
            return self._send(200, BOMB, "image/jpeg", Content_Encoding="gzip")
        if path == "/gzip":
            return self._send(200, gzip.compress(JPEG), "image/jpeg", Content_Encoding="gzip")
        if path == "/deflate":
            return self._send(200, zlib.compress(JPEG), "image/jpeg", Content_Encoding="deflate")
        if path == "/gzip-garbage":
            return self._send(200, b"\x1f\x8b not really gzip", "image/jpeg", Content_Encoding="gzip")
        if path == "/gzip-cut":
            return self._send(200, gzip.compress(JPEG)[:5000], "image/jpeg", Content_Encoding="gzip")
        if path == "/brotli":
            return self._send(200, b"\x0b\x02\x80hello\x03", "image/jpeg", Content_Encoding="br")
        if path == "/truncated":  # promises 1000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.close_connection = True
            return
        if path == "/hang-up":  # a whole response, then a close the headers did not announce
            self._send(200, JPEG, "image/jpeg")
            self.close_connection = True
            return
        self._send(404, b"not found\n")


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, tls: ssl.SSLContext | None = None):
        self.accepted = 0
        self._lock = threading.Lock()
        self.tls = tls
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn (a reverse lookup); skip it
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        if self.tls is not None:
            self.socket = self.tls.wrap_socket(self.socket, server_side=True)

    def get_request(self):
        request = super().get_request()
        with self._lock:
            self.accepted += 1
        return request

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that hung up on an unread body (a cap, a bad encoding, an opt-out)
        super().handle_error(request, client_address)


def _serve(tls: ssl.SSLContext | None = None):
    server = Server(("127.0.0.1", 0), Handler, tls)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="module")
def server():
    srv, thread = _serve()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def base(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def fetcher():
    with Fetcher(FetchPolicy(allow_networks=LOOPBACK, deadline_s=10.0)) as f:
        yield f


def _fetch(url: str, **policy) -> object:
    policy.setdefault("allow_networks", LOOPBACK)
    resolver = policy.pop("resolver", None)
    with Fetcher(FetchPolicy(**policy), resolver) as f:
        return f.fetch(url)


# --------------------------------------------------------------------------------------------
# Success, statuses, redirects
# --------------------------------------------------------------------------------------------


def test_200_returns_the_jpeg(fetcher, base):
    r = fetcher.fetch(f"{base}/img.jpg")
    assert r.ok and r.reason is None and r.status == 200
    assert r.body == JPEG and r.content_type == "image/jpeg"
    assert r.final_url == f"{base}/img.jpg" and r.dialled == ["127.0.0.1"]
    assert Image.open(io.BytesIO(r.body)).size == (512, 512)


def test_request_headers(fetcher, base):
    r = fetcher.fetch(f"{base}/headers")
    sent = {k.lower(): v for k, v in json.loads(r.body).items()}
    assert sent["accept-encoding"] == "identity" and sent["accept"] == "image/*"
    assert sent["user-agent"] == FetchPolicy().user_agent
    assert sent["host"] == base.removeprefix("http://")


@pytest.mark.parametrize("code", [404, 500, 429])
def test_error_status_is_http_code(fetcher, base, code):
    r = fetcher.fetch(f"{base}/status/{code}")
    assert not r.ok and r.reason == f"http_{code}" and r.status == code and r.body is None
    assert r.detail.startswith(f"HTTP {code} ")


def test_redirect_chain_of_two(fetcher, base):
    r = fetcher.fetch(f"{base}/redirect/2")
    assert r.ok and r.body == JPEG and r.final_url == f"{base}/img.jpg"
    assert r.dialled == ["127.0.0.1"] * 3


def test_redirect_loop(base):
    r = _fetch(f"{base}/loop", max_redirects=5)
    assert r.reason == "too_many_redirects" and "more than 5 redirects" in r.detail
    assert len(r.dialled) == 6


def test_redirect_to_a_blocked_address_never_dials_it(base):
    canary = socket.socket()
    canary.bind(("127.0.0.2", 0))  # loopback, but outside the allowed 127.0.0.1/32
    canary.listen(8)
    try:
        port = canary.getsockname()[1]
        r = _fetch(f"{base}/redirect-to?url=http://127.0.0.2:{port}/x.jpg", allow_networks=("127.0.0.1/32",))
        assert r.reason == "blocked" and r.detail == "127.0.0.2: loopback address"
        assert r.final_url == f"http://127.0.0.2:{port}/x.jpg" and r.dialled == ["127.0.0.1"]
        canary.setblocking(False)
        with pytest.raises(BlockingIOError):
            canary.accept()  # nothing ever connected
    finally:
        canary.close()


def test_an_allowed_address_on_a_port_it_does_not_name_is_blocked_without_connecting(base, server):
    """allow_networks entries may name ports: a redirect from the allowed port to another port of
    the same address is refused (`blocked`) and that port sees no connection; the named port
    works; a bad entry fails where the policy is built, naming it."""
    port = server.server_address[1]
    canary = socket.socket()
    canary.bind(("127.0.0.1", 0))  # an allowed address, another port
    canary.listen(8)
    try:
        other = canary.getsockname()[1]
        allow = (f"127.0.0.1:{port}",)
        assert _fetch(f"{base}/img.jpg", allow_networks=allow).ok
        r = _fetch(f"{base}/redirect-to?url=http://127.0.0.1:{other}/x.jpg", allow_networks=allow)
        assert r.reason == "blocked" and r.detail == f"127.0.0.1: loopback address, port {other} not allowed"
        assert r.dialled == ["127.0.0.1"]  # the first hop only
        canary.setblocking(False)
        with pytest.raises(BlockingIOError):
            canary.accept()  # nothing ever connected
        assert _fetch(f"{base}/img.jpg", allow_networks=(f"127.0.0.0/8:{other},{port}",)).ok
        assert _fetch(f"{base}/img.jpg", allow_networks=(f"[::1]:{port}", "127.0.0.1/32")).ok
    finally:
        canary.close()
    for bad in ("127.0.0.1:0", "127.0.0.1:http", "[::1", "10.0.0.0/33:80"):
        with pytest.raises(ValueError, match="allow_networks entry"):
            Fetcher(FetchPolicy(allow_networks=(bad,)))


def test_redirect_to_another_scheme_is_bad_url(fetcher, base):
    r = fetcher.fetch(f"{base}/redirect-to?url=file:///etc/passwd")
    assert r.reason == "bad_url" and r.final_url == "file:///etc/passwd"


# --------------------------------------------------------------------------------------------
# Names and addresses
# --------------------------------------------------------------------------------------------


def test_static_resolver_name_dials_the_mapped_ip(server):
    port = server.server_address[1]
    r = _fetch(f"http://images.test:{port}/img.jpg", resolver=StaticResolver({"images.test": "127.0.0.1"}))
    assert r.ok and r.body == JPEG and r.dialled == ["127.0.0.1"]


def test_name_mapped_to_private_address_is_blocked_without_connecting(server):
    # the module guard would fail the test on any connect to 10.0.0.1
    r = _fetch("http://intranet.test/img.jpg", resolver=StaticResolver({"intranet.test": "10.0.0.1"}))
    assert r.reason == "blocked" and r.dialled == []
    assert r.detail == "intranet.test resolves to 10.0.0.1: private address"


def test_one_private_address_among_several_blocks_the_host(server):
    resolver = StaticResolver({"mixed.test": ["127.0.0.1", "192.168.1.1"]})
    r = _fetch(f"http://mixed.test:{server.server_address[1]}/img.jpg", resolver=resolver)
    assert r.reason == "blocked" and r.dialled == []


def test_loopback_blocked_by_default(base):
    r = _fetch(f"{base}/img.jpg", allow_networks=())
    assert r.reason == "blocked" and r.detail == "127.0.0.1: loopback address" and r.dialled == []


def test_unknown_host_is_dns_error():
    r = _fetch("http://nowhere.test/img.jpg", resolver=StaticResolver({}))
    assert r.reason == "dns_error" and r.detail == "nowhere.test: not in the static host map"


def test_resolvers():
    static = StaticResolver({"A.Test": "127.0.0.1"})
    assert static.resolve("a.test", 80) == ["127.0.0.1"] and static.resolve("a.test.", 80) == ["127.0.0.1"]
    assert static.resolve("::1", 80) == ["::1"]
    with pytest.raises(ResolveError):
        static.resolve("b.test", 80)
    assert Resolver().resolve("127.0.0.1", 80) == ["127.0.0.1"]  # a literal asks no one


class _ScriptedDns(Resolver):
    """The system resolver's bounding and caching over a scripted lookup: `answers` maps a name
    to its addresses, a ResolveError, or None for a server that never answers (until `release`)."""

    def __init__(self, answers, **kwargs):
        super().__init__(**kwargs)
        self.answers, self.release, self.asked = answers, threading.Event(), []

    def lookup(self, host, port):
        self.asked.append(host)
        answer = self.answers[host]
        if answer is None:
            self.release.wait(60)
            raise ResolveError(f"{host}: released")
        if isinstance(answer, ResolveError):
            raise answer
        return list(answer)


def test_a_resolver_that_never_answers_ends_as_a_timeout_within_the_deadline(server):
    port = server.server_address[1]
    dns = _ScriptedDns({"silent.test": None})
    try:
        started = time.monotonic()
        r = _fetch(f"http://silent.test:{port}/img.jpg", resolver=dns, deadline_s=1.0)
        assert r.reason == "timeout" and "did not answer within" in r.detail, (r.reason, r.detail)
        assert time.monotonic() - started < 10  # about the 1 s deadline; only a hang reaches 10
        assert r.dialled == []
    finally:
        dns.release.set()


def test_names_are_asked_once_while_cached_answers_and_failures_alike(server):
    port = server.server_address[1]
    dns = _ScriptedDns({"images.test": ["127.0.0.1"], "gone.test": ResolveError("gone.test: no such name")})
    with Fetcher(FetchPolicy(allow_networks=LOOPBACK, deadline_s=10.0), resolver=dns) as f:
        assert all(f.fetch(f"http://images.test:{port}/img.jpg").ok for _ in range(3))
        assert [f.fetch(f"http://gone.test:{port}/img.jpg").reason for _ in range(2)] == ["dns_error"] * 2
    assert dns.asked == ["images.test", "gone.test"] and dns.lookups == 2
    expired = _ScriptedDns({"images.test": ["127.0.0.1"]}, ttl_s=0.0)
    for _ in range(2):
        assert expired.resolve("images.test", port) == ["127.0.0.1"]
    assert expired.asked == ["images.test", "images.test"]  # a TTL of 0 caches nothing


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://127.0.0.1/x.jpg", "data:image/png;base64,AAAA", "http:///x.jpg",
     "http://127.0.0.1:99999/", "http://127.0.0.1:abc/", "http://[::1/", "", "img.jpg",
     "http://bad host/x.jpg", "gopher://127.0.0.1:70/"],
)
def test_bad_urls(url):
    r = _fetch(url)
    assert r.reason == "bad_url" and r.dialled == []


@pytest.mark.parametrize(
    "ip, kind",
    [("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
     ("192.168.1.1", "private"), ("100.64.0.1", "cgnat"), ("169.254.169.254", "link_local"),
     ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"), ("::1", "loopback"),
     ("fe80::1", "link_local"), ("fc00::1", "private"), ("::ffff:10.0.0.1", "private"),
     ("::ffff:127.0.0.1", "loopback"), ("64:ff9b::a00:1", "private"), ("192.0.2.1", "reserved"),
     ("240.0.0.1", "reserved"), ("8.8.8.8", None), ("2606:4700:4700::1111", None)],
)
def test_address_class(ip, kind):
    assert address_class(ip) == kind


# --------------------------------------------------------------------------------------------
# Caps, encodings, deadlines, broken connections
# --------------------------------------------------------------------------------------------


def test_declared_length_over_cap_is_too_large(base):
    r = _fetch(f"{base}/big", max_bytes=1_000_000)
    assert r.reason == "too_large" and "Content-Length 1000000000" in r.detail and r.status == 200


def test_endless_chunked_body_is_too_large(base):
    r = _fetch(f"{base}/endless", max_bytes=1_000_000)
    assert r.reason == "too_large" and r.body is None


def test_gzip_bomb_is_too_large(base):
    r = _fetch(f"{base}/gzip-bomb", max_bytes=1_000_000)
    assert r.reason == "too_large" and "decodes to more than" in r.detail


@pytest.mark.parametrize("route", ["gzip", "deflate"])
def test_compressed_body_is_decoded(fetcher, base, route):
    r = fetcher.fetch(f"{base}/{route}")
    assert r.ok and r.body == JPEG


def test_unknown_encoding_is_bad_content(fetcher, base):
    r = fetcher.fetch(f"{base}/brotli")
    assert r.reason == "bad_content" and "'br'" in r.detail


@pytest.mark.parametrize("route", ["gzip-garbage", "gzip-cut"])
def test_broken_compressed_body_is_bad_content(fetcher, base, route):
    r = fetcher.fetch(f"{base}/{route}")
    assert r.reason == "bad_content"
    assert r.detail.startswith("bad gzip body" if route == "gzip-garbage" else "gzip body ends")


def test_watchdog_shuts_a_socket_blocked_without_timeout_at_the_deadline():
    """The backstop behind the per-recv timeouts: a recv with no timeout at all still returns."""
    dog = Watchdog()
    a, b = socket.socketpair()
    try:
        watch = dog.arm(time.monotonic() + 0.3)
        dog.watch(watch, a)
        a.settimeout(None)
        start = time.monotonic()
        assert a.recv(10) == b""  # woken by the shutdown, not by data
        assert watch.fired and time.monotonic() - start < 10
        dog.release(watch)
    finally:
        dog.stop()
        a.close()
        b.close()


def test_slow_drip_body_ends_at_the_total_deadline(base):
    start = time.monotonic()
    r = _fetch(f"{base}/drip", deadline_s=1.0)
    assert r.reason == "timeout" and r.detail == "deadline of 1s passed reading the body"
    assert time.monotonic() - start < 10


def test_slow_drip_headers_end_at_the_total_deadline(base):
    start = time.monotonic()
    r = _fetch(f"{base}/drip-headers", deadline_s=1.0)
    assert r.reason == "timeout" and r.status is None
    assert time.monotonic() - start < 10


def test_connection_closed_mid_body(fetcher, base):
    r = fetcher.fetch(f"{base}/truncated")
    assert r.reason == "connection_error" and "body ended after 10 of 1000 bytes" in r.detail


def test_connection_refused():
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    r = _fetch(f"http://127.0.0.1:{port}/img.jpg")
    assert r.reason == "connection_error" and "ConnectionRefusedError" in r.detail
    assert r.dialled == ["127.0.0.1"]


def test_details_are_deterministic(base):
    urls = [f"{base}/status/404", f"{base}/truncated", f"{base}/big", "ftp://x/", f"{base}/brotli"]
    first = [(_fetch(u, max_bytes=1000).detail) for u in urls]
    again = [(_fetch(u, max_bytes=1000).detail) for u in urls]
    assert first == again and not any("0x" in d for d in first)


# --------------------------------------------------------------------------------------------
# X-Robots-Tag opt-outs and Retry-After
# --------------------------------------------------------------------------------------------


def test_x_robots_tag_opt_out_returns_no_body(server, base):
    before = server.accepted
    with Fetcher(FetchPolicy(allow_networks=LOOPBACK)) as f:
        r = f.fetch(f"{base}/xrt?v=nofollow&v=noai")
        assert (r.ok, r.reason, r.status, r.body) == (False, "opted_out", 200, None)
        assert r.detail == 'X-Robots-Tag "noai"' and r.content_type == "image/jpeg"
        assert f.fetch(f"{base}/img.jpg").ok  # a small opted-out body is drained: the connection is kept
    assert server.accepted - before == 1


def test_x_robots_tag_opt_out_of_a_large_body_closes_the_connection(server, base):
    before = server.accepted
    with Fetcher(FetchPolicy(allow_networks=LOOPBACK)) as f:
        r = f.fetch(f"{base}/xrt?v=noimageai&n=3000000")
        assert (r.reason, r.body) == ("opted_out", None)
        assert f.fetch(f"{base}/img.jpg").ok
    assert server.accepted - before == 2  # not read: a new connection for the next request


def test_x_robots_tag_scope_and_policy(base):
    assert _fetch(f"{base}/xrt?v=otherbot:%20noai").ok
    r = _fetch(f"{base}/xrt?v=mm1-pipeline:%20noimageai")
    assert (r.reason, r.detail) == ("opted_out", 'X-Robots-Tag "mm1-pipeline: noimageai"')
    assert _fetch(f"{base}/xrt?v=mybot:%20noai", robots_agent="MyBot").reason == "opted_out"
    assert _fetch(f"{base}/xrt?v=noindex", opt_out_directives=("noai",)).ok
    with Fetcher(FetchPolicy(allow_networks=LOOPBACK)) as f:
        r = f.fetch(f"{base}/xrt?v=noai", opt_out=False)  # e.g. a robots.txt marked noindex
    assert r.ok and r.body == JPEG


def test_per_request_accept_and_cap(fetcher, base):
    r = fetcher.fetch(f"{base}/headers", accept="text/plain")
    assert json.loads(r.body)["Accept"] == "text/plain"
    with Fetcher(FetchPolicy(allow_networks=LOOPBACK, max_bytes=1024)) as small:
        assert small.fetch(f"{base}/big").reason == "too_large"
        assert small.fetch(f"{base}/big", max_bytes=2 * 10**9).reason != "too_large"  # the override
        assert small.fetch(f"{base}/img.jpg", max_bytes=len(JPEG)).body == JPEG


def test_retry_after_on_the_result(fetcher, base):
    r = fetcher.fetch(f"{base}/retry-after?code=429&ra=7")
    assert (r.reason, r.retry_after) == ("http_429", 7.0)
    assert fetcher.fetch(f"{base}/retry-after?code=503&ra=86400").retry_after == 60.0  # capped
    assert fetcher.fetch(f"{base}/retry-after?code=503").retry_after is None
    assert fetcher.fetch(f"{base}/img.jpg").retry_after is None


def test_parse_retry_after():
    now = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after("5", now) == 5.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now) == 0.0  # in the past
    assert parse_retry_after("Thu, 22 Oct 2015 07:28:00 GMT", now) == 60.0  # capped
    assert parse_retry_after("99999999999999999999", now) == 60.0
    for bad in (None, "", "soon", "-5", "1.5", "Wed, 99 Foo 2015"):
        assert parse_retry_after(bad, now) is None, bad


# --------------------------------------------------------------------------------------------
# Connection reuse and threads
# --------------------------------------------------------------------------------------------


def test_keep_alive_reuses_one_connection(server, base):
    before = server.accepted
    with Fetcher(FetchPolicy(allow_networks=LOOPBACK)) as f:
        for path in ("/img.jpg", "/status/404", "/redirect/1", "/img.jpg"):
            f.fetch(base + path)
    assert server.accepted - before == 1


def test_a_connection_closed_while_pooled_is_retried_on_a_fresh_one(server, base):
    before = server.accepted
    with Fetcher(FetchPolicy(allow_networks=LOOPBACK)) as f:
        assert f.fetch(f"{base}/hang-up").ok  # the server closes after this one
        time.sleep(0.2)
        r = f.fetch(f"{base}/img.jpg")
    assert r.ok and r.body == JPEG and r.dialled == ["127.0.0.1"]
    assert server.accepted - before == 2


def test_eight_threads_share_one_fetcher(base):
    with Fetcher(FetchPolicy(allow_networks=LOOPBACK)) as f:
        results: list = []
        lock = threading.Lock()

        def work(i: int) -> None:
            for j in range(5):
                r = f.fetch(f"{base}/img.jpg" if (i + j) % 2 else f"{base}/redirect/1")
                with lock:
                    results.append(r)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(results) == 40 and all(r.ok and r.body == JPEG for r in results)


# --------------------------------------------------------------------------------------------
# Politeness slots: one per request actually sent, each under its own host
# --------------------------------------------------------------------------------------------


class SlotLog:
    """A `slot` for `Fetcher.fetch` (what curate.web.hosts.DomainLimiter.slot is in the stage): records
    every slot entered and left, in order, and makes each caller wait `wait_s` for its slot (a
    busy host)."""

    def __init__(self, wait_s: float = 0.0) -> None:
        self.wait_s = wait_s
        self.events: list[tuple[str, str]] = []
        self.held = 0

    @contextmanager
    def __call__(self, host: str) -> Iterator[None]:
        time.sleep(self.wait_s)
        assert self.held == 0, f"slot for {host} taken while another is held"
        self.held += 1
        self.events.append(("enter", host))
        try:
            yield
        finally:
            self.held -= 1
            self.events.append(("exit", host))

    def hosts(self) -> list[str]:
        return [host for what, host in self.events if what == "enter"]


def _names(*names: str) -> StaticResolver:
    return StaticResolver({name: "127.0.0.1" for name in names})


def test_every_hop_holds_a_slot_of_its_own_host_one_at_a_time(server, base):
    port = server.server_address[1]
    slot = SlotLog()
    with Fetcher(FetchPolicy(allow_networks=LOOPBACK), _names("a.test", "b.test")) as f:
        r = f.fetch(f"http://A.test:{port}/redirect-to?url=http://b.test:{port}/redirect/2", slot=slot)
    assert r.ok and r.body == JPEG and r.final_url == f"http://b.test:{port}/img.jpg"
    expected = [("enter", "a.test"), ("exit", "a.test")] + [("enter", "b.test"), ("exit", "b.test")] * 3
    assert slot.events == expected  # one slot per request, each under its own host, never two at once


def test_a_redirect_chain_on_one_host_reuses_one_connection_across_its_slots(server, base):
    before = server.accepted
    slot = SlotLog()
    with Fetcher(FetchPolicy(allow_networks=LOOPBACK)) as f:
        r = f.fetch(f"{base}/redirect/3", slot=slot)
    assert r.ok and slot.hosts() == ["127.0.0.1"] * 4 and slot.held == 0
    assert server.accepted - before == 1  # each hop's response was done with before the next hop


def test_a_hop_refused_without_sending_takes_no_slot(server, base):
    port = server.server_address[1]
    slot = SlotLog()
    with Fetcher(FetchPolicy(allow_networks=("127.0.0.1/32",)), _names("a.test")) as f:
        blocked = f.fetch(f"{base}/redirect-to?url=http://127.0.0.2:{port}/x.jpg", slot=slot)
        assert blocked.reason == "blocked" and slot.hosts() == ["127.0.0.1"]  # not 127.0.0.2
        slot.events.clear()
        unknown = f.fetch(f"{base}/redirect-to?url=http://nowhere.test/x.jpg", slot=slot)
        assert unknown.reason == "dns_error" and slot.hosts() == ["127.0.0.1"]
        slot.events.clear()
        scheme = f.fetch(f"{base}/redirect-to?url=ftp://a.test/x.jpg", slot=slot)
        assert scheme.reason == "bad_url" and slot.hosts() == ["127.0.0.1"]
        slot.events.clear()

        def robots(url: str) -> tuple[str, str] | None:  # disallows the image, not the redirect
            return ("robots_disallowed", "no images") if url.endswith("/img.jpg") else None

        disallowed = f.fetch(f"http://a.test:{port}/redirect/1", slot=slot, gate=robots)
        assert disallowed.reason == "robots_disallowed" and slot.hosts() == ["a.test"]
        slot.events.clear()
        first = f.fetch(f"http://a.test:{port}/img.jpg", slot=slot, gate=robots)
        assert first.reason == "robots_disallowed" and slot.events == []
        for refused in ("http://10.0.0.1/x.jpg", "http://nowhere.test/x.jpg", "gopher://a.test/"):
            assert not f.fetch(refused, slot=slot).ok and slot.events == []
    assert slot.held == 0


def test_waiting_for_slots_does_not_count_against_the_deadline(base):
    """Three hops, each waiting 0.6 s for its slot: 1.8 s of waiting under a 1 s deadline."""
    slot = SlotLog(wait_s=0.6)
    with Fetcher(FetchPolicy(allow_networks=LOOPBACK, deadline_s=1.0)) as f:
        r = f.fetch(f"{base}/redirect/2", slot=slot)
        assert r.ok and r.body == JPEG and len(slot.hosts()) == 3
        # the deadline still bounds the request itself, and a failed hop gives its slot back
        start = time.monotonic()
        drip = f.fetch(f"{base}/drip", slot=slot)
    assert drip.reason == "timeout" and drip.detail == "deadline of 1s passed reading the body"
    assert time.monotonic() - start < 10
    assert slot.held == 0 and slot.events[-1] == ("exit", "127.0.0.1")


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=images.test", "-addext", "subjectAltName=DNS:images.test",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    srv, thread = _serve(ctx)
    yield srv, ssl.create_default_context(cafile=str(d / "cert.pem"))
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def test_https_with_sni_and_hostname_check(tls_server):
    srv, trust = tls_server
    port = srv.server_address[1]
    resolver = StaticResolver({"images.test": "127.0.0.1", "other.test": "127.0.0.1"})
    with Fetcher(FetchPolicy(allow_networks=LOOPBACK), resolver, ssl_context=trust) as f:
        r = f.fetch(f"https://images.test:{port}/img.jpg")
        assert r.ok and r.body == JPEG and r.dialled == ["127.0.0.1"]
        wrong = f.fetch(f"https://other.test:{port}/img.jpg")  # the certificate names images.test
        assert wrong.reason == "connection_error" and "SSLCertVerificationError" in wrong.detail
    untrusted = _fetch(f"https://images.test:{port}/img.jpg", resolver=resolver)  # system CAs only
    assert untrusted.reason == "connection_error" and "certificate verify failed" in untrusted.detail


@pytest.mark.parametrize("host, ip", [
    ("2130706433", "127.0.0.1"),  # decimal
    ("0177.0.0.1", "127.0.0.1"),  # octal
    ("0x7f.0.0.1", "127.0.0.1"),  # hex
    ("127.1", "127.0.0.1"),  # short form
    ("167772161", "10.0.0.1"),
    ("0xa9.254.169.254", "169.254.169.254"),
])
def test_legacy_ipv4_spellings_are_literals_checked_as_such(host, ip):
    """Pure: the static resolver (no DNS) reads them as the C resolver would, and the address
    class follows the decoded address, so none slips past the guard as a 'name'."""
    assert StaticResolver({}).resolve(host, 80) == [ip]
    assert address_class(ip) is not None


def test_legacy_spelling_of_a_blocked_address_is_refused_without_connecting():
    with Fetcher(FetchPolicy(deadline_s=2), StaticResolver({})) as fetcher:
        result = fetcher.fetch("http://167772161:8080/x.jpg")  # 10.0.0.1
    assert result.reason == "blocked" and result.dialled == []
