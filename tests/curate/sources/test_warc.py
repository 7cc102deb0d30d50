"""The warc source on real WARC files written by warcio's WARCWriter (plain and gzip per record),
with hand-made records where the writer refuses to write something broken, and damaged files."""

from __future__ import annotations

import gzip
import io
import json
import os
import tracemalloc
import zlib
from collections import Counter
from pathlib import Path

import brotli
import pytest
from pydantic import ValidationError
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from curate.contract import read_ledger, read_manifest
from curate.recipe import parse_recipe
from curate.sources import build_source
from curate.sources.warc import WarcConfig
from tools.verify import verify

CAP = 2048
SKIP = "not an input"


def page(title: str) -> bytes:
    return f"<!DOCTYPE html><html><head><title>{title}</title></head><body><p>{title}</p></body></html>".encode()


def chunked(data: bytes, size: int = 7) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size]) for i in range(0, len(data), size)]
    return b"".join(parts) + b"0\r\n\r\n"


class Warc:
    """A WARC being written, remembering where each record starts and what should come of it."""

    def __init__(self, gz: bool):
        self.gz = gz
        self.buf = io.BytesIO()
        self.writer = WARCWriter(self.buf, gzip=gz)
        self.expected: list[tuple[int, str, str | None]] = []  # (offset, outcome, url)

    def _note(self, outcome: str, url: str | None) -> int:
        offset = self.buf.tell()
        self.expected.append((offset, outcome, url))
        return offset

    def response(self, url: str, body: bytes, outcome: str, status: str = "200 OK",
                 headers: list[tuple[str, str]] | None = None, warc_headers: dict | None = None) -> None:
        http = StatusAndHeaders(status, headers if headers is not None else [("Content-Type", "text/html")],
                                protocol="HTTP/1.1")
        record = self.writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http,
                                                warc_headers_dict=warc_headers)
        self._note(outcome, url)
        self.writer.write_record(record)

    def record(self, url: str, kind: str, body: bytes, outcome: str, content_type: str = "") -> None:
        record = self.writer.create_warc_record(url, kind, payload=io.BytesIO(body), warc_content_type=content_type)
        self._note(outcome, url)
        self.writer.write_record(record)

    def raw(self, headers: list[tuple[str, str]], block: bytes, outcome: str, url: str | None = None,
            length: bool = True, misstate: int = 0) -> None:
        """A record written by hand (what WARCWriter would refuse to write); `misstate` is added
        to its Content-Length."""
        lines = ["WARC/1.0", *(f"{k}: {v}" for k, v in headers)]
        if length:
            lines.append(f"Content-Length: {len(block) + misstate}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode() + block + b"\r\n\r\n"
        self._note(outcome, url)
        self.buf.write(gzip.compress(data) if self.gz else data)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.buf.getvalue())
        return path

    def inputs(self) -> list[tuple[int, str, str | None]]:
        return [e for e in self.expected if e[1] != SKIP]


def crawl(gz: bool) -> Warc:
    """Every kind of record and outcome the source knows."""
    w = Warc(gz)
    w.writer.write_record(w.writer.create_warcinfo_record("crawl.warc", {"software": "a test"}))
    w.expected.append((0, SKIP, None))
    req = StatusAndHeaders("GET / HTTP/1.1", [("Host", "site.example")], is_http_request=True)
    w._note(SKIP, None)
    w.writer.write_record(w.writer.create_warc_record("http://site.example/", "request", payload=io.BytesIO(b""),
                                                      http_headers=req))
    w.response("http://site.example/", page("home"), "kept", headers=[("Content-Type", "text/html; charset=UTF-8")])
    w.response("http://site.example/logo.jpg", b"\xff\xd8\xff\xe0fakejpeg", "not_html",
               headers=[("Content-Type", "image/jpeg")])
    w.response("http://site.example/gone", b"<html>gone</html>", "http_404", status="404 Not Found")
    w.response("http://site.example/old", b"", "http_301", status="301 Moved Permanently",
               headers=[("Location", "http://site.example/new")])
    w.record("http://site.example/", "metadata", b"fetchTimeMs: 12\r\n", SKIP, "application/warc-fields")
    w._note(SKIP, None)
    w.writer.write_record(w.writer.create_revisit_record("http://site.example/again", "sha1:AAAA",
                                                         "http://site.example/", "2024-01-01T00:00:00Z"))
    w.record("http://site.example/saved", "resource", page("saved"), "kept", "text/html; charset=iso-8859-1")
    w.response("http://site.example/gz", gzip.compress(page("gzip")), "kept",
               headers=[("Content-Type", "text/html"), ("Content-Encoding", "gzip")])
    w.response("http://site.example/zlib", zlib.compress(page("zlib")), "kept",
               headers=[("Content-Type", "text/html"), ("Content-Encoding", "deflate")])
    raw_deflate = zlib.compressobj(wbits=-15)
    w.response("http://site.example/raw-deflate", raw_deflate.compress(page("raw")) + raw_deflate.flush(), "kept",
               headers=[("Content-Type", "text/html"), ("Content-Encoding", "deflate")])
    w.response("http://site.example/br", brotli.compress(page("brotli")), "kept",
               headers=[("Content-Type", "text/html"), ("Content-Encoding", "br")])
    w.response("http://site.example/chunked", chunked(gzip.compress(page("chunked"))), "kept",
               headers=[("Content-Type", "text/html"), ("Transfer-Encoding", "chunked"), ("Content-Encoding", "gzip")])
    w.response("http://site.example/huge", b"<html>" + b"x" * (CAP + 10) + b"</html>", "too_large")
    w.response("http://site.example/bomb", gzip.compress(b"<html>" + b" " * (50 * CAP)), "too_large",
               headers=[("Content-Type", "text/html"), ("Content-Encoding", "gzip")])
    w.response("http://site.example/corrupt", b"\x1f\x8b\x08\x00garbage that is not deflate", "bad_content",
               headers=[("Content-Type", "text/html"), ("Content-Encoding", "gzip")])
    w.response("http://site.example/compress", b"whatever", "bad_content",
               headers=[("Content-Type", "text/html"), ("Content-Encoding", "compress")])
    w.response("http://site.example/cut", gzip.compress(page("cut short by the crawler"))[:40], "kept",
               headers=[("Content-Type", "text/html"), ("Content-Encoding", "gzip")],
               warc_headers={"WARC-Truncated": "length"})
    w.response("http://site.example/cut-unmarked", gzip.compress(page("cut"))[:30], "bad_content",
               headers=[("Content-Type", "text/html"), ("Content-Encoding", "gzip")])
    w.response("http://site.example/x", page("xhtml"), "kept", headers=[("Content-Type", "application/xhtml+xml")])
    w.response("http://site.example/untyped", b"\n  " + page("untyped"), "kept", headers=[])
    w.response("http://site.example/doc.pdf", b"%PDF-1.4 not a page", "not_html", headers=[])
    w.response("http://site.example/api", b'{"a": 1}', "not_html", headers=[("Content-Type", "application/json")])
    w.raw([("WARC-Type", "response"), ("WARC-Record-ID", "<urn:uuid:1>"), ("WARC-Date", "2024-01-01T00:00:00Z"),
           ("Content-Type", "application/http; msgtype=response")],
          b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + page("no uri"), "malformed_record")
    w.raw([("WARC-Type", "response"), ("WARC-Target-URI", "http://site.example/weird"),
           ("Content-Type", "application/http; msgtype=response")],
          b"SOMETHING ELSE\r\n\r\n" + page("weird"), "malformed_record", "http://site.example/weird")
    w.raw([("WARC-Type", "response"), ("WARC-Target-URI", "dns:site.example"), ("Content-Type", "text/dns")],
          b"20240101000000\nsite.example. 300 IN A 10.0.0.1\n", "not_html", "dns:site.example")
    w.response("http://site.example/last", page("last"), "kept")
    return w


def source(path, **kw):
    kw.setdefault("max_record_bytes", CAP)
    return build_source(WarcConfig(name="w", path=path if isinstance(path, list) else str(path), **kw))


def rows(src, batch_size: int = 5) -> list[dict]:
    return [r for p in src.partitions() for t in src.read(p, batch_size) for r in t.to_pylist()]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_every_response_and_resource_once(tmp_path, gz):
    w = crawl(gz)
    name = "crawl.warc.gz" if gz else "crawl.warc"
    got = rows(source(w.save(tmp_path / name)))
    assert [r["id"] for r in got] == [f"w:{name}#{offset}" for offset, _, _ in w.inputs()]
    outcomes = [r["drop_reason"] or "kept" for r in got]
    assert outcomes == [outcome for _, outcome, _ in w.inputs()]
    assert [r["url"] for r in got] == [url for _, _, url in w.inputs()]
    assert all(r["drop_stage"] == "source" for r in got if r["drop_reason"])
    by_url = {r["url"]: r for r in got}
    home = by_url["http://site.example/"]
    assert home["html"] == page("home") and home["charset"] == "UTF-8" and home["segments"] is None
    extra = json.loads(home["extra"])
    assert extra["warc_record_id"].startswith("<urn:uuid:") and extra["warc_date"].startswith("20")
    for name_ in ("gzip", "zlib", "raw", "brotli", "chunked", "xhtml"):
        url = {"gzip": "gz", "raw": "raw-deflate", "brotli": "br", "xhtml": "x"}.get(name_, name_)
        assert by_url[f"http://site.example/{url}"]["html"] == page(name_), name_
    assert by_url["http://site.example/saved"]["charset"] == "iso-8859-1"
    assert by_url["http://site.example/saved"]["html"] == page("saved")
    assert by_url["http://site.example/untyped"]["html"].endswith(page("untyped"))
    cut = by_url["http://site.example/cut"]
    assert page("cut short by the crawler").startswith(cut["html"]) and cut["html"]
    assert json.loads(cut["extra"])["warc_truncated"] == "length"
    assert "image/jpeg" in by_url["http://site.example/logo.jpg"]["drop_detail"]
    assert "http://site.example/new" in by_url["http://site.example/old"]["drop_detail"]
    assert "max_record_bytes 2048" in by_url["http://site.example/bomb"]["drop_detail"]
    assert "'compress'" in by_url["http://site.example/compress"]["drop_detail"]
    assert all(r["html"] is None for r in got if r["drop_reason"])


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_a_file_cut_mid_record_keeps_what_came_before(tmp_path, gz):
    w = crawl(gz)
    data = w.buf.getvalue()
    inputs = w.inputs()
    victim = inputs[5][0]  # cut inside the sixth input record
    for cut in (victim + 1, victim + 10, victim + 20, victim + 300):  # in its header or its payload
        name = f"cut{cut}.warc" + (".gz" if gz else "")
        (tmp_path / name).write_bytes(data[:cut])
        got = rows(source(tmp_path / name))
        assert [r["id"] for r in got[:-1]] == [f"w:{name}#{o}" for o, _, _ in inputs[:5]]
        error = got[-1]
        assert (error["id"], error["drop_stage"], error["drop_reason"]) == (f"w:{name}#error", "source", "read_error")
        ended = int(error["drop_detail"].rsplit("ended at byte ", 1)[1])
        assert victim - 4 <= ended <= victim  # a plain WARC's record ends before its blank lines


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_cut_anywhere(tmp_path, gz):
    """Wherever a file is cut, reading ends in order: the rows are those of the records wholly
    before the cut (each once), then a read_error unless the cut falls between records or in a
    record's last few bytes (its closing blank lines, its gzip trailer)."""
    w = crawl(gz)
    data = w.buf.getvalue()
    starts = sorted({o for o, _, _ in w.expected} | {len(data)})
    name = "cut.warc" + (".gz" if gz else "")
    for cut in range(1, len(data), 37):
        (tmp_path / name).write_bytes(data[:cut])
        got = rows(source(tmp_path / name))
        ids = [r["id"] for r in got]
        assert len(ids) == len(set(ids))
        next_start = min(s for s in starts if s >= cut)
        whole = [f"w:{name}#{o}" for o, _, _ in w.inputs() if starts[starts.index(o) + 1] <= cut]
        if got and got[-1]["drop_reason"] == "read_error":
            assert ids[:-1] == whole, cut
        else:
            assert next_start - cut <= 12, f"a cut at {cut}, {next_start - cut} bytes before a record, went unnoticed"
            assert ids in (whole, [f"w:{name}#{o}" for o, _, _ in w.inputs() if o < cut]), cut


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_garbage_after_the_last_record(tmp_path, gz):
    w = crawl(gz)
    name = "junk.warc" + (".gz" if gz else "")
    (tmp_path / name).write_bytes(w.buf.getvalue() + b"this is not a WARC record\r\n" * 3)
    got = rows(source(tmp_path / name))
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids))
    assert ids == [f"w:{name}#{o}" for o, _, _ in w.inputs()] + [f"w:{name}#error"]
    assert got[-1]["drop_reason"] == "read_error" and "not a WARC record" in got[-1]["drop_detail"]


def test_a_record_without_content_length_is_damage(tmp_path):
    w = Warc(gz=False)
    w.response("http://a.example/", page("a"), "kept")
    w.raw([("WARC-Type", "response"), ("WARC-Target-URI", "http://a.example/b")],
          b"HTTP/1.1 200 OK\r\n\r\n" + page("b"), "damage", length=False)
    got = rows(source(w.save(tmp_path / "nolen.warc")))
    assert [r["drop_reason"] for r in got] == [None, "read_error"]
    assert "Content-Length None" in got[1]["drop_detail"]


@pytest.mark.parametrize("misstate", [-5, 5], ids=["short", "long"])
def test_a_wrong_content_length_is_damage(tmp_path, misstate):
    w = Warc(gz=False)
    w.response("http://a.example/", page("a"), "kept")
    w.raw([("WARC-Type", "response"), ("WARC-Target-URI", "http://a.example/b")],
          b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + page("b"), "damage", misstate=misstate)
    w.response("http://a.example/c", page("c"), "kept")
    got = rows(source(w.save(tmp_path / "lies.warc")))
    assert [(r["id"], r["drop_reason"]) for r in got] == [(f"w:lies.warc#{w.expected[0][0]}", None),
                                                          ("w:lies.warc#error", "read_error")]


def test_a_warc_gzipped_whole_is_damage(tmp_path):
    """One gzip stream around the whole file (not one member a record): warcio reads the first
    record, then refuses; the read_error says so."""
    w = Warc(gz=False)
    for i in range(3):
        w.response(f"http://a.example/{i}", page(str(i)), "kept")
    (tmp_path / "whole.warc.gz").write_bytes(gzip.compress(w.buf.getvalue()))
    got = rows(source(tmp_path / "whole.warc.gz"))
    assert [r["drop_reason"] for r in got] == [None, "read_error"]
    assert "non-chunked gzip" in got[-1]["drop_detail"]


def test_not_a_warc_at_all(tmp_path):
    (tmp_path / "fake.warc").write_bytes(b"<html>I am not a WARC</html>\n")
    (tmp_path / "empty.warc").write_bytes(b"")
    got = rows(source(tmp_path))
    assert [(r["id"], r["drop_reason"]) for r in got] == [("w:fake.warc#error", "read_error")]


def test_a_decompression_bomb_stays_small(tmp_path):
    """64 MiB of payload behind 64 KiB of gzip, with a 1 MiB cap: never held whole."""
    w = Warc(gz=True)
    w.response("http://bomb.example/", gzip.compress(b"<html>" + b"\0" * (64 << 20), 1), "too_large",
               headers=[("Content-Type", "text/html"), ("Content-Encoding", "gzip")])
    path = w.save(tmp_path / "bomb.warc.gz")
    src = source(path, max_record_bytes=1 << 20)
    tracemalloc.start()
    try:
        got = rows(src)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["drop_reason"] for r in got] == ["too_large"]
    assert peak < 16 << 20


def test_partitions_files_and_fingerprints(tmp_path):
    folder = tmp_path / "crawl"
    for i, gz in enumerate([False, True, False]):
        w = Warc(gz)
        w.response(f"http://p{i}.example/", page(str(i)), "kept")
        w.save(folder / (f"part-{i}.warc" + (".gz" if gz else "")))
    (folder / "notes.txt").write_text("not a WARC")
    (folder / "part-9.warc.cdx").write_text("not a WARC either")
    src = source(folder, files_per_partition=2)
    parts = src.partitions()
    assert [[label for _, label in p.payload["files"]] for p in parts] == [["part-0.warc", "part-1.warc.gz"],
                                                                           ["part-2.warc"]]
    assert parts == source(folder, files_per_partition=2).partitions()
    once = [t for p in parts for t in src.read(p, 1)]
    twice = [t for p in parts for t in src.read(p, 1)]
    assert len(once) == 3 and all(a.equals(b) for a, b in zip(once, twice))
    w = Warc(False)
    w.response("http://p2.example/", page("changed"), "kept")
    w.save(folder / "part-2.warc")
    os.utime(folder / "part-2.warc", ns=(1, 1))
    changed = source(folder, files_per_partition=2).partitions()
    assert parts[0].fingerprint == changed[0].fingerprint and parts[1].fingerprint != changed[1].fingerprint
    listed = source([str(folder / "part-2.warc"), str(folder / "*.gz")]).partitions()
    assert [p.payload["files"][0][1] for p in listed] == ["part-1.warc.gz", "part-2.warc"]
    with pytest.raises(FileNotFoundError):
        source(tmp_path / "nothing-here").partitions()


def test_content_types_are_media_types():
    with pytest.raises(ValidationError):
        WarcConfig(name="w", path="x.warc", html_content_types=("html",))
    assert WarcConfig(name="w", path="x.warc", html_content_types=(" Text/HTML",)).html_content_types == ("text/html",)


def test_curation_run_keeps_the_ledger_whole(tmp_path, output_checks, shared_cluster):
    """Pages reach the docs shards through the extraction stage (a recipe must name it: a WARC's
    records are raw pages), every source drop and a damaged file's error row reach the ledger once."""
    w = crawl(True)
    w.save(tmp_path / "in" / "a.warc.gz")
    (tmp_path / "in" / "b.warc.gz").write_bytes(w.buf.getvalue()[: w.inputs()[3][0] + 10])
    out = tmp_path / "out"
    recipe = parse_recipe({
        "name": "warc-only",
        "sources": [{"kind": "warc", "name": "w", "path": str(tmp_path / "in"), "max_record_bytes": CAP}],
        "stages": [{"kind": "html_extract", "processes": 1}],
        "output": {"path": str(out)},
        "cluster": {"n_workers": 1, "dashboard": False},
        "execution": {"batch_size": 4},
    })
    manifest = shared_cluster.run(recipe)
    output_checks.check_ledger_invariant(out)
    report = verify(out)
    assert report.ok, report
    expected = Counter(o for _, o, _ in w.inputs()) + Counter(o for _, o, _ in w.inputs()[:3]) + Counter(["read_error"])
    # the page the crawler cut short is kept by the source, and holds no text the extraction finds
    expected.subtract({"kept": 1})
    expected.update({"empty_document": 1})
    ledger = read_ledger(out).to_pylist()
    got = Counter("kept" if r["outcome"] == "kept" else r["drop_reason"] for r in ledger)
    assert got == expected
    assert manifest["counts"]["inputs"] == len(w.inputs()) + 3 + 1
    assert read_manifest(out)["kinds"]["doc"]["count"] == expected["kept"]
    error = {r["id"]: r for r in ledger}["w:b.warc.gz#error"]
    assert (error["stage"], error["drop_reason"]) == ("source", "read_error")
