"""Per-domain DNS and connection statistics of the download stage (issue 24 item 4;
curate/web/netstats.py).

- The tables stay bounded (top N plus "(other)") and merge with exact totals.
- The resolver counts lookups, cached answers, failures and timeouts; the fetcher counts a
  refused connection.
- A real run on the session's cluster, one partition fetched by one thread from a loopback server
  under two names and a name the host map does not know: the manifest's `stages.download.domains`
  holds each domain's exact numbers (every one but the milliseconds is deterministic there), and
  `mm1 stats` prints the Domains table and carries it in --json.
"""

from __future__ import annotations

import csv
import io
import json
import re
import socket
import threading

import pytest
from PIL import Image

from curate.recipe import parse_recipe
from curate.web.addresses import ResolveError
from curate.web.fetcher import Fetcher, FetchPolicy
from curate.web.netstats import FIELDS, MERGE_KEEP, OTHER, DomainStats, Tally, merge
from tools.cli import main as mm1
from tools.demo.server import serve
from tools.report import build_report

from tests.curate.test_fetch import _ScriptedDns  # the system resolver over scripted lookups

pytestmark = pytest.mark.usefixtures("loopback_only")

NAMED = "netstats-img.test"  # the recipe's host map resolves it to 127.0.0.1
GONE = "netstats-gone.test"  # in no map: dns_error


def _values(**named: float) -> list[float]:
    return [named.get(f, 0) for f in FIELDS]


def test_tables_keep_the_top_domains_and_sum_the_rest_exactly():
    part = DomainStats()
    for i, host in enumerate(["a.test", "B.test.", "c.test", "d.test"]):
        part.add({host: _values(requests=10 - i, bytes=100 * i, dns_lookups=1)})
    part.add({"b.test": _values(requests=1, reused=1)})  # the same domain as "B.test."
    table = part.table(top=2)
    assert table["columns"] == list(FIELDS)
    assert list(table["rows"]) == ["a.test", "b.test", OTHER]
    assert table["rows"]["b.test"] == _values(requests=10, bytes=100, dns_lookups=1, reused=1)
    assert table["rows"][OTHER] == _values(requests=8 + 7, bytes=200 + 300, dns_lookups=2)
    other = DomainStats()
    other.add({"c.test": _values(requests=20), "e.test": _values(requests=1, dns_errors=3)})
    merged = merge([table, other.table(top=2)], top=2)
    assert list(merged["rows"]) == ["c.test", "a.test", OTHER]
    assert merged["rows"]["c.test"] == _values(requests=20)  # its first partition's share is in OTHER
    totals = [sum(r[i] for r in merged["rows"].values()) for i in range(len(FIELDS))]
    assert totals == _values(requests=10 + 10 + 15 + 20 + 1, bytes=600, dns_lookups=4, dns_errors=3, reused=1)
    assert merge([]) == {"columns": list(FIELDS), "rows": {}}
    # a run naming more domains than the merge keeps apart: it folds, the totals stay exact
    many = [{"columns": list(FIELDS), "rows": {f"d{p}-{i}.test": _values(requests=1 + i % 3, opened=1)
                                               for i in range(100)}} for p in range(11 * MERGE_KEEP // 100)]
    folded = merge(many)
    assert len(folded["rows"]) == 101 and OTHER in folded["rows"]
    assert [sum(r[i] for r in folded["rows"].values()) for i in range(len(FIELDS))] == \
        _values(requests=len(many) * (34 * 1 + 33 * 2 + 33 * 3), opened=len(many) * 100)


def test_the_resolver_counts_lookups_cached_answers_failures_and_timeouts():
    dns = _ScriptedDns({"a.test": ["127.0.0.1"], "gone.test": ResolveError("gone.test: no such name"), "silent.test": None})
    try:
        with Tally() as hosts:
            for _ in range(3):
                assert dns.resolve("a.test", 80, 10) == ["127.0.0.1"]
            for _ in range(2):
                with pytest.raises(ResolveError):
                    dns.resolve("gone.test", 80, 10)
            with pytest.raises(ResolveError, match="did not answer"):
                dns.resolve("silent.test", 80, 0.05)
            assert dns.resolve("127.0.0.1", 80) == ["127.0.0.1"]  # a literal asks no one: not noted
        outside = dns.resolve("a.test", 80, 10)  # no tally open: nothing noted, nothing fails
    finally:
        dns.release.set()
    assert outside == ["127.0.0.1"]
    assert sorted(hosts) == ["a.test", "gone.test", "silent.test"]
    got = {h: dict(zip(FIELDS, v)) for h, v in hosts.items()}
    for host, counts in got.items():
        assert counts.pop("dns_ms") >= 0, host
    zero = dict.fromkeys(FIELDS, 0)
    del zero["dns_ms"]
    assert got["a.test"] == {**zero, "dns_lookups": 1, "dns_cached": 2}
    assert got["gone.test"] == {**zero, "dns_lookups": 1, "dns_cached": 1, "dns_errors": 2}
    assert got["silent.test"] == {**zero, "dns_lookups": 1, "dns_timeouts": 1}


def test_a_refused_connection_is_a_connection_failure_of_its_domain():
    with socket.socket() as bound:  # bound, never listening: a connection to it is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        with Fetcher(FetchPolicy(allow_networks=("127.0.0.0/8",), deadline_s=10)) as fetcher, Tally() as hosts:
            result = fetcher.fetch(f"http://127.0.0.1:{port}/x.jpg")
    assert result.reason == "connection_error"
    assert hosts == {"127.0.0.1": _values(conn_failures=1)}


# ---------------------------------------------------------------------------------------------
# A run on the session's cluster, and `mm1 stats`
# ---------------------------------------------------------------------------------------------


def _jpeg(shade: int, size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (shade, 40, 200 - shade)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.timeout(300)
def test_a_run_records_each_domains_dns_and_connections_and_mm1_stats_prints_them(
        shared_cluster, tmp_path, capsys):
    www = tmp_path / "www"
    www.mkdir()
    images = {f"p{i}.jpg": _jpeg(30 * i, 40 + 8 * i) for i in range(3)}
    for name, data in images.items():
        (www / name).write_bytes(data)
    with socket.socket() as refusing, serve(www) as base:
        refusing.bind(("127.0.0.1", 0))  # never listening
        port = base.rsplit(":", 1)[1]
        named = f"http://{NAMED}:{port}"
        urls = [f"{named}/img/p0.jpg", f"{named}/img/p1.jpg", f"{named}/img/missing.jpg",  # 404: drained, reused
                f"{base}/img/p0.jpg", f"{base}/img/p2.jpg",
                f"http://127.0.0.1:{refusing.getsockname()[1]}/img/p0.jpg",  # refused: the domain is 127.0.0.1
                f"http://{GONE}:{port}/img/p0.jpg", f"http://{GONE}:{port}/img/p1.jpg"]
        listing = tmp_path / "urls.csv"
        with listing.open("w", newline="") as f:
            csv.writer(f).writerows([["url", "caption"], *[[u, f"image number {i}"] for i, u in enumerate(urls)]])
        out = tmp_path / "curated"
        recipe = parse_recipe({
            "name": "domain-stats-test",
            "sources": [{"kind": "url_list", "name": "web", "path": str(listing)}],  # one partition
            # one thread: connections opened and reused are exact (requests one after another)
            "stages": [{"kind": "download", "threads": 1, "retries": 0, "respect_robots_txt": False,
                        "deadline_s": 20, "allow_networks": ["127.0.0.0/8"], "hosts": {NAMED: "127.0.0.1"}}],
            "output": {"path": str(out)},
            "cluster": {"n_workers": 2, "threads_per_worker": 1, "memory_limit": "2GiB", "dashboard": False},
        }, "<test recipe>")
        manifest = shared_cluster.run(recipe)
    assert manifest["drops"] == {"download/connection_error": 1, "download/dns_error": 2, "download/http_404": 1}
    table = manifest["stages"]["download"]["domains"]
    assert table["columns"] == list(FIELDS)
    rows = {d: dict(zip(FIELDS, v)) for d, v in table["rows"].items()}
    assert list(rows) == [NAMED, "127.0.0.1", GONE]  # by requests; a name that never resolved last
    assert rows[NAMED].pop("dns_ms") >= 0 and rows[GONE].pop("dns_ms") >= 0
    assert rows[NAMED] == dict(requests=3, bytes=len(images["p0.jpg"]) + len(images["p1.jpg"]), dns_lookups=1,
                               dns_cached=2, dns_errors=0, dns_timeouts=0, opened=1, reused=2, conn_failures=0)
    assert rows["127.0.0.1"] == dict(requests=2, bytes=len(images["p0.jpg"]) + len(images["p2.jpg"]), dns_lookups=0,
                                     dns_cached=0, dns_errors=0, dns_timeouts=0, dns_ms=0, opened=1, reused=1,
                                     conn_failures=1)
    assert rows[GONE] == dict(requests=0, bytes=0, dns_lookups=1, dns_cached=1, dns_errors=2, dns_timeouts=0,
                              opened=0, reused=0, conn_failures=0)

    assert mm1(["stats", str(out)]) == 0
    text = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(text) if line.startswith("Domains (download"))
    assert "3 of the 3" in text[head] and text[head + 1].split()[:4] == ["domain", "requests", "bytes", "lookups"]
    assert text[head + 2].split()[:6] == [NAMED, "3", f"{rows[NAMED]['bytes']:,}", "1", "2", "66.7%"]
    assert text[head + 3].split()[:6] == ["127.0.0.1", "2", f"{rows['127.0.0.1']['bytes']:,}", "0", "0", "-"]
    assert text[head + 4].split()[:7] == [GONE, "0", "0", "1", "1", "50.0%", "2"]
    assert text[head + 5].split()[:6] == ["(total)", "5", f"{rows[NAMED]['bytes'] + rows['127.0.0.1']['bytes']:,}",
                                          "2", "3", "60.0%"]
    assert mm1(["stats", str(out), "--top-domains", "1"]) == 0
    text = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(text) if line.startswith("Domains (download"))
    assert "1 of the 3" in text[head] and text[head + 2].split()[0] == NAMED
    assert text[head + 3].split()[0] == "(total)" and "2 more domains not shown" in text[head + 4]
    assert mm1(["stats", str(out), "--json"]) == 0
    fetched = json.loads(capsys.readouterr().out)["fetch_domains"]["download"]
    assert [r["domain"] for r in fetched["rows"]] == [NAMED, "127.0.0.1", GONE]
    assert fetched["rows"][2]["dns_hit_rate"] == 0.5 and fetched["rows"][1]["dns_mean_ms"] is None
    assert fetched["total"]["requests"] == 5 and fetched["total"]["conn_failures"] == 1

    page = build_report([out], tmp_path / "report.html").read_text()  # the report's Domains section
    marked = dict(re.findall(r'data-stat="(fetch_domains\.[^"]+)" data-value="([^"]*)"', page))
    assert len(marked) == 4 * 9  # three domains and the total, nine columns each
    assert marked["fetch_domains.download.rows.0.reused"] == "2"
    assert marked["fetch_domains.download.total.conn_failures"] == "1"
