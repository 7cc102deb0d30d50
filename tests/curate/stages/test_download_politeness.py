"""The download stage as a good citizen (issue 5): retries, X-Robots-Tag opt-outs, robots.txt.

Each test starts its own real HTTP server on 127.0.0.1 (tools.demo.server.LoopbackHTTPServer, no
reverse lookup) whose handler counts the requests for every (host, path), so "fetched exactly
once" and "never requested" are read off the server, not the client. Several host names map to
127.0.0.1 through the stage's `hosts:` map (no DNS is asked; a module guard fails any lookup and any
connection off loopback), which gives each origin its own robots.txt.

Every bad input ends as one row with a stable code and the real request count in `attempts`;
opted-out and disallowed rows carry no bytes. Backoffs are tiny so the suite stays fast; waits are
bounded generously and no test asserts an upper bound on time.
"""

from __future__ import annotations

import http.server
import io
import socket
import threading
import time
from collections import Counter, defaultdict
from urllib.parse import urlsplit

import pyarrow as pa
import pytest
from PIL import Image

from curate.contract import record_schema
from curate.recipe import parse_recipe
from curate.stages import download
from curate.stages.download import DownloadStage, is_transient
from curate.web.headers import x_robots_opt_out
from tools.demo.server import LoopbackHTTPServer

HOSTS = ("img.test", "rules.test", "down.test", "norobots.test", "slowrobots.test", "limited.test")
ROBOTS = {  # per host: (status, body); a host not named here answers 404
    "rules.test": (200, b"User-agent: *\nDisallow: /cgi/\n\nUser-agent: mm1-pipeline\nDisallow: /private/\n"),
    "slowrobots.test": (200, b"User-agent: mm1-pipeline\nDisallow: /private/\n"),
    "down.test": (500, b"oops\n"),
    "limited.test": (429, b"slow down\n"),
}
XRT = {  # /xrt/NAME -> the X-Robots-Tag headers the image is served with, and whether it is kept
    "noai": (["noai"], False),
    "noimageai": (["noimageai"], False),
    "noindex": (["noindex"], False),
    "noindex-nofollow": (["noindex, nofollow"], False),
    "upper": (["NoAI"], False),
    "none": (["none"], False),  # "none" is "noindex, nofollow": it opts out wherever noindex does
    "otherbot": (["otherbot: noai"], True),  # scoped to another agent: ignored
    "otherbot-two": (["otherbot: noai, noimageai"], True),  # the scope covers both
    "ours": (["mm1-pipeline: noimageai"], False),
    "ours-upper": (["MM1-Pipeline: noai"], False),
    "several": (["nofollow", "otherbot: noindex", "noai"], False),  # three headers, the third counts
    "harmless": (["nofollow", "nosnippet, noarchive", "max-image-preview: none"], True),
    "mixed": (["googlebot: nofollow, mm1-pipeline: noai"], False),
    "plain": ([], True),
}


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg()


pytestmark = pytest.mark.usefixtures("loopback_only")  # tests/conftest.py


class Site:
    """What the server saw: requests per (host, path), when each came, all arrivals in order, and
    how many requests per host were in flight at once (robots.txt aside: it has its own limits).
    A request counts as in flight from its arrival until just before its answer is written, which
    lies inside the client's slot whatever the thread timing."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hits: Counter[tuple[str, str]] = Counter()
        self.times: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.arrivals: list[tuple[float, str, str]] = []  # (time, host, path), in arrival order
        self.inflight: Counter[str] = Counter()
        self.max_inflight: Counter[str] = Counter()

    def hit(self, host: str, path: str) -> int:
        with self.lock:
            self.hits[host, path] += 1
            self.times[host, path].append(time.monotonic())
            self.arrivals.append((time.monotonic(), host, path))
            if path != "/robots.txt":
                self.inflight[host] += 1
                self.max_inflight[host] = max(self.max_inflight[host], self.inflight[host])
            return self.hits[host, path]

    def answered(self, host: str, path: str) -> None:
        if path != "/robots.txt":
            with self.lock:
                self.inflight[host] -= 1

    def starts(self, host: str) -> list[float]:
        """When the requests to `host` (robots.txt aside) arrived, in order."""
        with self.lock:
            return [t for t, h, p in self.arrivals if h == host and p != "/robots.txt"]

    def count(self, url: str) -> int:
        parts = urlsplit(url)
        with self.lock:
            return self.hits[parts.hostname, parts.path]


class Handler(http.server.BaseHTTPRequestHandler):
    site: Site
    protocol_version = "HTTP/1.1"
    timeout = 10

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "text/plain",
              headers: list[tuple[str, str]] = ()) -> None:
        self.site.answered(*self._request)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
        path = self.path.split("?")[0]
        n = self.site.hit(host, path)
        self._request = (host, path)
        parts = path.strip("/").split("/")
        if path == "/robots.txt":
            if host == "slowrobots.test":
                time.sleep(0.3)  # every thread asks while the first fetch is under way
            status, body = ROBOTS.get(host, (404, b"no robots here\n"))
            # robots.txt itself often says noindex: that must not stop us reading it
            return self._send(status, body, headers=[("X-Robots-Tag", "noindex")])
        if parts[0] == "status":  # /status/CODE/NAME: always CODE
            return self._send(int(parts[1]), f"status {parts[1]}\n".encode())
        if parts[0] == "flaky":  # /flaky/N/CODE/NAME: CODE for the first N requests, then the image
            if n <= int(parts[1]):
                return self._send(int(parts[2]), b"try again\n")
            return self._send(200, JPEG, "image/jpeg")
        if parts[0] == "retry-after":  # /retry-after/VALUE/NAME: 429 with Retry-After once, then 200
            if n == 1:
                return self._send(429, b"slow down\n", headers=[("Retry-After", parts[1])])
            return self._send(200, JPEG, "image/jpeg")
        if parts[0] == "xrt" and parts[1] in XRT:
            return self._send(200, JPEG, "image/jpeg", [("X-Robots-Tag", v) for v in XRT[parts[1]][0]])
        if parts[0] == "xrt-redirect":  # an opt-out on the hop that redirects to a plain image
            return self._send(302, b"", headers=[("Location", "/img/a.jpg"), ("X-Robots-Tag", "noai")])
        if parts[0] == "redirect":  # /redirect/PATH...: 302 to /PATH...
            return self._send(302, b"", headers=[("Location", "/" + "/".join(parts[1:]))])
        if parts[0] == "to":  # /to/HOST/PATH...: 302 to http://HOST:port/PATH... (another host)
            where = f"http://{parts[1]}:{self.server.server_address[1]}/" + "/".join(parts[2:])
            return self._send(302, b"", headers=[("Location", where)])
        if parts[0] == "slow":  # /slow/MS/NAME: the image after MS ms, its path appended (per row)
            time.sleep(int(parts[1]) / 1000)
            return self._send(200, JPEG + path.encode(), "image/jpeg")
        if parts[0] in ("img", "public", "private", "cgi"):
            return self._send(200, JPEG, "image/jpeg")
        self._send(404, b"not found\n")


@pytest.fixture
def site():
    """A fresh server (and fresh counts) per test; yields (Site, port)."""
    state = Site()
    server = LoopbackHTTPServer(("127.0.0.1", 0), type("PolitenessHandler", (Handler,), {"site": state}))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _table(urls: list[str]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"id": f"t:{i}", "source": "t", "url": u, "caption": "c"} for i, u in enumerate(urls)],
        schema=record_schema("pair"),
    )


def _run(urls: list[str], **cfg) -> list[dict]:
    cfg.setdefault("allow_networks", ["127.0.0.0/8"])
    cfg.setdefault("hosts", {h: "127.0.0.1" for h in HOSTS})
    cfg.setdefault("backoff_s", 0.05)
    cfg.setdefault("deadline_s", 10)
    stage = DownloadStage(DownloadStage.Config(**cfg))
    try:
        return stage.process(_table(urls)).to_pylist()
    finally:
        stage.fetcher.close()
        stage.pool.shutdown()


def _url(port: int, path: str, host: str = "img.test") -> str:
    return f"http://{host}:{port}{path}"


# ---------------------------------------------------------------------------------------------
# Retries
# ---------------------------------------------------------------------------------------------


def test_permanent_errors_are_fetched_exactly_once(site):
    state, port = site
    codes = (400, 403, 404, 410, 451)
    urls = [_url(port, f"/status/{code}/x.jpg") for code in codes]
    out = _run(urls, retries=3)
    assert [(r["drop_stage"], r["drop_reason"], r["attempts"]) for r in out] == [
        ("download", f"http_{code}", 1) for code in codes
    ]
    assert [state.count(u) for u in urls] == [1] * len(codes)
    assert all(r["image"] is None and "after" not in r["drop_detail"] for r in out)


def test_500_then_200_succeeds_on_a_retry(site):
    state, port = site
    url = _url(port, "/flaky/1/500/a.jpg")
    (row,) = _run([url])
    assert row["drop_reason"] is None and row["image"] == JPEG and row["attempts"] == 2
    assert state.count(url) == 2


def test_503_forever_is_bounded(site):
    state, port = site
    urls = [_url(port, "/status/503/a.jpg"), _url(port, "/status/502/b.jpg")]
    out = _run(urls, retries=2)
    assert [(r["drop_reason"], r["attempts"]) for r in out] == [("http_503", 3), ("http_502", 3)]
    assert [state.count(u) for u in urls] == [3, 3]
    # deterministic: the last failure's detail and the count, nothing about timing
    assert out[0]["drop_detail"] == "HTTP 503 Service Unavailable (after 3 attempts)"


def test_no_retries_means_one_attempt(site):
    state, port = site
    url = _url(port, "/status/503/a.jpg")
    (row,) = _run([url], retries=0)
    assert (row["drop_reason"], row["attempts"], state.count(url)) == ("http_503", 1, 1)
    assert row["drop_detail"] == "HTTP 503 Service Unavailable"


def test_connection_refused_is_retried(site):
    _, port = site
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead = probe.getsockname()[1]  # bound, never listening: connections are refused
    try:
        (row,) = _run([f"http://127.0.0.1:{dead}/x.jpg"], retries=2, respect_robots_txt=False)
    finally:
        probe.close()
    assert (row["drop_reason"], row["attempts"]) == ("connection_error", 3)


def test_429_with_retry_after_waits_then_succeeds(site):
    state, port = site
    url = _url(port, "/retry-after/1/a.jpg")
    (row,) = _run([url], backoff_s=0.01)
    assert row["drop_reason"] is None and row["image"] == JPEG and row["attempts"] == 2
    first, second = state.times["img.test", "/retry-after/1/a.jpg"]
    assert second - first >= 0.9  # the server asked for 1 s (a generous lower bound; no upper one)


def test_retry_after_longer_than_max_backoff_ends_the_row(site):
    state, port = site
    url = _url(port, "/retry-after/120/a.jpg")
    (row,) = _run([url], max_backoff_s=5)
    assert (row["drop_reason"], row["attempts"], state.count(url)) == ("http_429", 1, 1)
    assert row["drop_detail"] == "HTTP 429 Too Many Requests (Retry-After over max_backoff_s 5s)"


def test_transient_codes():
    assert all(is_transient(c) for c in ("timeout", "connection_error", "http_429", "http_500", "http_599"))
    assert not any(is_transient(c) for c in ("http_404", "http_410", "http_400", "opted_out",
                                             "robots_disallowed", "too_large", "bad_content", "blocked",
                                             "dns_error", "bad_url", "http_5000", None))


# ---------------------------------------------------------------------------------------------
# X-Robots-Tag
# ---------------------------------------------------------------------------------------------


def test_x_robots_tag_variants(site):
    state, port = site
    names = list(XRT)
    urls = [_url(port, f"/xrt/{name}") for name in names]
    out = _run(urls, threads=4)
    for name, url, row in zip(names, urls, out):
        kept = XRT[name][1]
        if kept:
            assert row["drop_reason"] is None and row["image"] == JPEG, (name, row["drop_detail"])
        else:
            assert (row["drop_stage"], row["drop_reason"]) == ("download", "opted_out"), name
            assert row["image"] is None and row["image_nbytes"] is None and row["image_sha256"] is None
            assert row["drop_detail"].startswith("X-Robots-Tag "), row["drop_detail"]
        assert row["attempts"] == 1 and state.count(url) == 1, name  # an opt-out is never retried
    details = {name: row["drop_detail"] for name, row in zip(names, out)}
    assert details["noai"] == 'X-Robots-Tag "noai"'
    assert details["ours"] == 'X-Robots-Tag "mm1-pipeline: noimageai"'
    assert details["none"] == 'X-Robots-Tag "none" (implies noindex)'
    assert details["several"] == 'X-Robots-Tag "noai"'


def test_opt_out_on_a_redirect_hop_holds(site):
    state, port = site
    (row,) = _run([_url(port, "/xrt-redirect/a.jpg")])
    assert row["drop_reason"] == "opted_out" and row["image"] is None
    assert state.count(_url(port, "/img/a.jpg")) == 0  # the target was never requested


def test_robots_agent_scopes_x_robots_tag(site):
    """Another agent token: "mm1-pipeline: ..." no longer applies, "otherbot: ..." does."""
    _, port = site
    out = _run([_url(port, "/xrt/ours"), _url(port, "/xrt/otherbot")], robots_agent="otherbot")
    assert [r["drop_reason"] for r in out] == [None, "opted_out"]


@pytest.mark.parametrize(("values", "expected"), [
    (["noai"], '"noai"'),
    (["NOIMAGEAI"], '"noimageai"'),
    (["noindex, nofollow"], '"noindex"'),
    (["none"], '"none" (implies noindex)'),
    (["all"], None),
    (["nofollow", "noarchive"], None),
    (["otherbot: noai"], None),
    (["otherbot: noai, noimageai"], None),
    (["mm1-pipeline: noimageai"], '"mm1-pipeline: noimageai"'),
    (["googlebot: nofollow, mm1-pipeline: noai"], '"mm1-pipeline: noai"'),
    (["*: noai"], '"*: noai"'),
    (["max-image-preview: none"], None),  # a valued directive, not an agent scope
    (["max-snippet: -1, noai"], '"noai"'),
    (["unavailable_after: Friday, 25-Jun-2010 15:00:00 PST, noai"], '"noai"'),
    (["noimageindex"], None),  # not in the default set
    ([], None),
])
def test_x_robots_opt_out_parser(values, expected):
    assert x_robots_opt_out(values, "mm1-pipeline", ("noai", "noimageai", "noindex")) == expected


def test_x_robots_opt_out_directive_set_is_configurable():
    assert x_robots_opt_out(["noindex"], "mm1-pipeline", ("noai",)) is None
    assert x_robots_opt_out(["none"], "mm1-pipeline", ("noai",)) is None  # none implies noindex only
    assert x_robots_opt_out(["noimageindex"], "mm1-pipeline", ("noimageindex",)) == '"noimageindex"'


# ---------------------------------------------------------------------------------------------
# robots.txt
# ---------------------------------------------------------------------------------------------


def test_robots_txt_disallow_is_never_requested(site):
    state, port = site
    private, public = _url(port, "/private/x.jpg", "rules.test"), _url(port, "/public/y.jpg", "rules.test")
    cgi = _url(port, "/cgi/z.jpg", "rules.test")  # only the * group disallows it: not our group
    out = _run([private, public, cgi])
    assert (out[0]["drop_stage"], out[0]["drop_reason"]) == ("download", "robots_disallowed")
    assert out[0]["attempts"] == 0
    assert out[0]["image"] is None
    assert out[0]["drop_detail"] == (
        f"http://rules.test:{port}/robots.txt: Disallow: /private/ (user-agent mm1-pipeline)"
    )
    assert out[1]["drop_reason"] is None and out[1]["image"] == JPEG and out[1]["attempts"] == 1
    assert out[2]["drop_reason"] is None
    assert state.count(private) == 0 and state.count(public) == 1
    assert state.count(_url(port, "/robots.txt", "rules.test")) == 1


def test_robots_txt_fetched_once_per_origin_with_eight_threads(site):
    state, port = site
    urls = [_url(port, f"/{'private' if i % 3 == 0 else 'public'}/{i}.jpg", "slowrobots.test")
            for i in range(40)]
    out = _run(urls, threads=8)
    assert state.count(_url(port, "/robots.txt", "slowrobots.test")) == 1
    for i, (url, row) in enumerate(zip(urls, out)):
        if i % 3 == 0:
            assert row["drop_reason"] == "robots_disallowed" and state.count(url) == 0
        else:
            assert row["drop_reason"] is None and state.count(url) == 1


def test_robots_txt_answering_5xx_or_429_disallows_the_host(site):
    state, port = site
    down = [_url(port, f"/img/{i}.jpg", "down.test") for i in range(5)]
    limited = [_url(port, "/img/a.jpg", "limited.test")]
    fine = [_url(port, "/img/a.jpg", "img.test")]  # another origin on the same server: no robots.txt
    out = _run(down + limited + fine, threads=4)
    assert [r["drop_reason"] for r in out] == ["robots_disallowed"] * 6 + [None]
    assert all(state.count(u) == 0 for u in down + limited)
    assert state.count(_url(port, "/robots.txt", "down.test")) == 1  # not retried per URL
    assert out[0]["drop_detail"] == (
        f"http://down.test:{port}/robots.txt unreachable (http_500: HTTP 500 Internal Server Error): "
        "every URL of the origin disallowed"
    )
    assert out[0]["attempts"] == 0


def test_robots_txt_404_allows_everything(site):
    state, port = site
    urls = [_url(port, "/private/a.jpg", "norobots.test"), _url(port, "/img/b.jpg", "norobots.test")]
    out = _run(urls)
    assert [r["drop_reason"] for r in out] == [None, None]
    assert state.count(_url(port, "/robots.txt", "norobots.test")) == 1


def test_robots_txt_checked_on_every_redirect_hop(site):
    state, port = site
    url = _url(port, "/redirect/private/x.jpg", "rules.test")
    (row,) = _run([url])
    assert (row["drop_reason"], row["attempts"]) == ("robots_disallowed", 1)
    assert state.count(url) == 1 and state.count(_url(port, "/private/x.jpg", "rules.test")) == 0


def test_robots_txt_can_be_ignored(site):
    state, port = site
    url = _url(port, "/private/x.jpg", "rules.test")
    (row,) = _run([url], respect_robots_txt=False)
    assert row["drop_reason"] is None and state.count(url) == 1
    assert state.count(_url(port, "/robots.txt", "rules.test")) == 0


def test_robots_agent_picks_the_group(site):
    """With another agent token the mm1-pipeline group no longer applies, the * group does."""
    _, port = site
    out = _run([_url(port, "/private/x.jpg", "rules.test"), _url(port, "/cgi/y.jpg", "rules.test")],
               robots_agent="otherbot")
    assert [r["drop_reason"] for r in out] == [None, "robots_disallowed"]


# ---------------------------------------------------------------------------------------------
# Per-host limits: every request (every redirect hop) under its own host; hosts interleaved
# ---------------------------------------------------------------------------------------------


RATE = 5.0  # max_rate_per_host in these tests: with max_per_host 1, starts at least 0.2 s apart


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most arrivals in any half-open window [t, t + window) (it suffices to start at one)."""
    times = sorted(times)
    return max((sum(1 for u in times[i:] if u < t + window) for i, t in enumerate(times)), default=0)


def _names(*names: str) -> dict[str, str]:
    return {name: "127.0.0.1" for name in (*HOSTS, *names)}


def _run_bounded(urls: list[str], **cfg) -> list[dict]:
    """`_run` in a thread: a deadlock fails the test instead of hanging it."""
    out: list[list[dict]] = []
    thread = threading.Thread(target=lambda: out.append(_run(urls, **cfg)), daemon=True)
    thread.start()
    thread.join(120)
    assert out, "the stage did not finish in 120 s: a deadlock"
    return out[0]


def test_redirect_hops_are_limited_under_the_host_they_go_to(site):
    """16 rows on 16 hosts all redirect to one host allowed one request at a time at 5/s. Without
    per-hop slots the hops to it would be unlimited (8 threads: 8 at once, 16 within ~0.2 s)."""
    state, port = site
    sources = [f"a{i}.test" for i in range(16)]
    urls = [_url(port, f"/to/cdn.test/slow/50/{i}.jpg", host) for i, host in enumerate(sources)]
    out = _run_bounded(urls, threads=8, max_per_host=1, max_rate_per_host=RATE,
                       hosts=_names(*sources, "cdn.test"))  # robots.txt on: asked from each hop's gate
    assert [(r["drop_reason"], r["attempts"]) for r in out] == [(None, 1)] * 16
    assert [r["image"] for r in out] == [JPEG + f"/slow/50/{i}.jpg".encode() for i in range(16)]
    starts = state.starts("cdn.test")
    assert len(starts) == 16
    assert state.max_inflight["cdn.test"] == 1
    # R + N = 6 per second in theory (tests/curate/test_domains.py); one more for a loaded machine
    assert max_in_window(starts) <= RATE + 2, f"{max_in_window(starts)} starts at cdn.test in 1 s"
    assert starts[-1] - starts[0] >= 15 / RATE - 0.5  # 16 leases of one slot, 0.2 s each at least
    assert state.count(_url(port, "/robots.txt", "cdn.test")) == 1


def test_a_redirect_chain_on_one_host_counts_every_hop(site):
    """4 rows, each A -> A -> A: 12 requests, 12 leases. One lease per fetch would let the 3 hops
    of a row through together (12 starts within ~0.7 s)."""
    state, port = site
    urls = [_url(port, f"/redirect/redirect/slow/50/{i}.jpg", "chain.test") for i in range(4)]
    out = _run_bounded(urls, threads=4, max_per_host=1, max_rate_per_host=RATE, hosts=_names("chain.test"))
    assert [(r["drop_reason"], r["attempts"]) for r in out] == [(None, 1)] * 4  # no nested slot
    starts = state.starts("chain.test")
    assert len(starts) == 12
    assert state.max_inflight["chain.test"] == 1
    assert max_in_window(starts) <= RATE + 2, f"{max_in_window(starts)} starts at chain.test in 1 s"
    assert starts[-1] - starts[0] >= 11 / RATE - 0.5


def test_redirects_back_and_forth_with_robots_txt_do_not_deadlock(site):
    """x -> y -> x, y -> x -> y and x -> rules.test (disallowed there), one slot per host, 8 threads,
    robots.txt asked from the gates of hops on every host: everything finishes, one at a time."""
    state, port = site
    urls = []
    for i in range(8):
        urls.append(_url(port, f"/to/y.test/to/x.test/slow/20/x{i}.jpg", "x.test"))
        urls.append(_url(port, f"/to/x.test/to/y.test/slow/20/y{i}.jpg", "y.test"))
        urls.append(_url(port, f"/to/rules.test/private/{i}.jpg", "x.test"))
    out = _run_bounded(urls, threads=8, max_per_host=1, max_rate_per_host=50.0,
                       hosts=_names("x.test", "y.test"))
    for i in range(8):
        assert out[3 * i]["image"] == JPEG + f"/slow/20/x{i}.jpg".encode()
        assert out[3 * i + 1]["image"] == JPEG + f"/slow/20/y{i}.jpg".encode()
        assert (out[3 * i + 2]["drop_reason"], out[3 * i + 2]["attempts"]) == ("robots_disallowed", 1)
        assert state.count(_url(port, f"/private/{i}.jpg", "rules.test")) == 0
    assert state.max_inflight["x.test"] == state.max_inflight["y.test"] == 1
    assert state.max_inflight["rules.test"] == 0  # its robots.txt only


def test_rows_are_fetched_interleaved_by_host_and_kept_in_input_order(site):
    """30 rows of a slow host (one request at a time, 0.1 s each), then 10 rows of a fast one, 4
    threads. In partition order the fast rows would wait until every slow row was handed out (at
    least 27 slow requests before the first fast one); interleaved, the 10th fast row is the 20th
    handed out, when at most 10 slow rows have been."""
    state, port = site
    slow = [_url(port, f"/slow/100/s{i}.jpg", "slow.test") for i in range(30)]
    fast = [_url(port, f"/slow/0/f{i}.jpg", "fast.test") for i in range(10)]
    out = _run_bounded(slow + fast, threads=4, max_per_host=1, hosts=_names("slow.test", "fast.test"))
    assert [r["id"] for r in out] == [f"t:{i}" for i in range(40)]
    assert [r["url"] for r in out] == slow + fast
    assert [r["image"] for r in out] == [JPEG + urlsplit(u).path.encode() for u in slow + fast]
    assert [r["attempts"] for r in out] == [1] * 40
    with state.lock:
        arrivals = [(h, p) for _, h, p in state.arrivals if p != "/robots.txt"]
    slow_before = [sum(1 for h, _ in arrivals[:k] if h == "slow.test")
                   for k, (host, _) in enumerate(arrivals) if host == "fast.test"]
    assert len(slow_before) == 10
    assert max(slow_before) < 20, f"slow requests before each fast one: {slow_before}"


def test_interleaved_order_does_not_change_the_output(site, monkeypatch):
    """The same rows give the same table fetched interleaved as fetched in partition order."""
    _, port = site
    urls = [_url(port, path, host) for host, path in [
        ("img.test", "/img/1.jpg"), ("img.test", "/status/404/a.jpg"), ("rules.test", "/private/x.jpg"),
        ("img.test", "/xrt/noai"), ("norobots.test", "/img/2.jpg"), ("rules.test", "/public/y.jpg"),
        ("img.test", "/slow/0/3.jpg"),
    ]] + ["not a url", ""]
    interleaved = _run(urls, threads=4, retries=0)
    monkeypatch.setattr(download, "interleave_by_host", lambda urls: list(range(len(urls))))
    assert _run(urls, threads=4, retries=0) == interleaved
    assert [r["drop_reason"] for r in interleaved] == [
        None, "http_404", "robots_disallowed", "opted_out", None, None, None, "bad_url", "bad_url"]


def test_robots_and_retry_fields_are_in_the_recipe_hash_but_backoff_is_not():
    def recipe(**download):
        return parse_recipe({
            "name": "t",
            "sources": [{"kind": "url_list", "name": "u", "path": "urls.csv"}],
            "stages": [{"kind": "download", **download}],
            "output": {"path": "o"},
        }).hash()

    base = recipe()
    assert recipe(backoff_s=2.0) == base
    for change in ({"retries": 0}, {"respect_robots_txt": False}, {"robots_agent": "other"},
                   {"max_backoff_s": 5}):
        assert recipe(**change) != base, change
