"""The html_extract stage on a hostile corpus, through its real child processes: every page ends
as exactly one row (segments, or a drop with its code), the batch finishes, and the pool
recovers from a child that hangs, runs out of memory or dies.

"Must finish" bounds are generous (several times what the work takes on a loaded 2-core machine):
they catch a hang, never a slow run."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pyarrow as pa
import pytest
from pydantic import ValidationError

from curate.contract import record_schema
from curate.stages import STAGES, build_stage
from curate.stages.html_extract import HtmlExtract, HtmlExtractConfig

MB = 1024 * 1024
GOOD = b"<html lang='fr'><head><title>Bonjour</title></head><body><p>Un chat noir.</p><img src='/chat.jpg' alt='chat'></body></html>"
GOOD_SEGMENTS = [{"type": "text", "text": "Un chat noir."},
                 {"type": "image", "url": "https://e.org/chat.jpg", "alt": "chat"}]
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"


def one_line_page(size: int) -> bytes:
    """~`size` bytes of HTML on one line: realistic paragraphs with inline links."""
    para = (b"<p>The quick brown fox jumps over the lazy dog near the <a href='/x'>river bank</a> "
            + b"and keeps running " * 20 + b"</p>")
    return b"<html><body>" + para * (size // len(para)) + b"</body></html>"


def slow_page() -> bytes:
    """~50 MB of two million tiny paragraphs: seconds of work for any child, little memory per byte."""
    return b"<html><body>" + b"<p>hello world lorem</p>" * 2_200_000 + b"</body></html>"


def table(pages: list[bytes | None], **extra_columns) -> pa.Table:
    rows = [{"id": f"t:{i}", "source": "t", "url": "https://e.org/a/page.html", "html": page}
            for i, page in enumerate(pages)]
    for name, values in extra_columns.items():
        for row, value in zip(rows, values):
            row[name] = value
    return pa.Table.from_pylist(rows, schema=record_schema("doc"))


def run(stage: HtmlExtract, pages: list[bytes | None], **extra_columns) -> list[dict]:
    out = stage.process(table(pages, **extra_columns))
    assert out.num_rows == len(pages) and out.column("id").to_pylist() == [f"t:{i}" for i in range(len(pages))]
    assert out.column("html").null_count == len(pages)  # the raw page never goes further
    return out.to_pylist()


def outcome(row: dict) -> str | None:
    """The drop code, or None for a kept row (which must then hold segments)."""
    if row["drop_reason"] is None:
        assert json.loads(row["segments"]), row
    else:
        assert row["drop_stage"] == "html_extract"
    return row["drop_reason"]


@pytest.fixture(scope="module")
def stage():
    s = HtmlExtract(HtmlExtractConfig(max_html_bytes=64 * MB))
    yield s
    s.close()


def test_registered_for_docs_with_its_output_columns():
    assert STAGES["html_extract"] is HtmlExtract and HtmlExtract.kinds == ("doc",)
    out = build_stage(HtmlExtractConfig()).process(table([]))
    assert out.schema.field("title").type == pa.string() and out.schema.field("html_lang").type == pa.string()


def test_hostile_corpus_every_page_one_outcome(stage, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-b81d2e55-local-file")
    lol = "".join(['<!ENTITY a0 "lol">'] + [f'<!ENTITY a{i} "{("&a" + str(i - 1) + ";") * 10}">' for i in range(1, 10)])
    corpus: dict[str, tuple[bytes, set]] = {
        "good": (GOOD, {None}),
        "invalid utf-8": (b"<p>ok \xff\xfe\xc3\x28 \xed\xa0\x80 text</p>", {None}),
        "meta shift_jis, utf-8 bytes": ('<meta charset="shift_jis"><p>日本語 text</p>'.encode(), {None}),
        "latin-1 declared utf-8": (b"<meta charset='utf-8'><p>caf\xe9 au lait</p>", {None}),
        "50 MB one line": (one_line_page(50 * MB), {None, "parse_timeout"}),
        "nesting 100k deep": (b"<p>top</p>" + b"<div>" * 100_000 + b"x" + b"</div>" * 100_000, {None}),
        "huge colspan": (b"<table><tr><td colspan=100000000>wide</td></tr></table>", {None}),
        "xxe": (f'<!DOCTYPE html [<!ENTITY xxe SYSTEM "file://{secret}">]><p>before &xxe; after</p>'.encode(), {None}),
        "billion laughs": (f'<?xml version="1.0"?><!DOCTYPE lolz [{lol}]><p>&a9;</p>'.encode(), {None}),
        "empty": (b"", {"empty_document"}),
        "only scripts": (b"<html><head><script>x()</script></head><body><nav>menu</nav></body></html>", {"empty_document"}),
        "png payload": (PNG, {"not_html"}),
        "good again": (GOOD, {None}),
    }
    names = list(corpus)
    start = time.monotonic()
    rows = run(stage, [corpus[n][0] for n in names])
    assert time.monotonic() - start < 180
    for name, row in zip(names, rows):
        assert outcome(row) in corpus[name][1], (name, row["drop_reason"], row["drop_detail"])
    by = dict(zip(names, rows))
    assert json.loads(by["good"]["segments"]) == GOOD_SEGMENTS
    assert (by["good"]["title"], by["good"]["html_lang"]) == ("Bonjour", "fr")
    assert json.loads(by["good again"]["segments"]) == GOOD_SEGMENTS
    assert "SECRET-b81d2e55" not in repr(rows)
    assert json.loads(by["xxe"]["segments"]) == [{"type": "text", "text": "before &xxe; after"}]
    assert len(by["billion laughs"]["segments"]) < 200
    assert json.loads(by["meta shift_jis, utf-8 bytes"]["segments"]) == [{"type": "text", "text": "日本語 text"}]
    assert json.loads(by["latin-1 declared utf-8"]["segments"]) == [{"type": "text", "text": "caf\ufffd au lait"}]
    assert "\ufffd" in by["invalid utf-8"]["segments"]
    assert by["png payload"]["drop_detail"] == "PNG signature"


def test_50mb_page_under_a_smaller_cap_is_too_large_without_parsing():
    capped = HtmlExtract(HtmlExtractConfig(max_html_bytes=8 * MB))
    try:
        start = time.monotonic()
        rows = run(capped, [one_line_page(50 * MB), GOOD])
        assert time.monotonic() - start < 120
        assert [outcome(r) for r in rows] == ["too_large", None]
        assert rows[0]["drop_detail"] == f"{len(one_line_page(50 * MB))} bytes > max_html_bytes {8 * MB}"
    finally:
        capped.close()


def test_a_hanging_page_times_out_and_the_pages_after_it_still_extract():
    # one child: the pages after the slow one must go to its replacement
    hasty = HtmlExtract(HtmlExtractConfig(timeout_s=1.0, max_html_bytes=64 * MB, max_memory_mb=4096, processes=1))
    try:
        hasty.ensure_setup()
        first_pid = hasty.pool.pids()
        start = time.monotonic()
        rows = run(hasty, [GOOD, slow_page(), GOOD, GOOD])
        assert time.monotonic() - start < 120
        assert [outcome(r) for r in rows] == [None, "parse_timeout", None, None]
        assert rows[1]["drop_detail"] == "no result within timeout_s 1; child killed"
        assert all(json.loads(r["segments"]) == GOOD_SEGMENTS for r in (rows[0], rows[2], rows[3]))
        assert hasty.pool.pids() != first_pid and len(hasty.pool.pids()) == 1
    finally:
        hasty.close()


def test_a_page_over_the_memory_limit_is_a_parse_error_and_the_pool_recovers():
    tight = HtmlExtract(HtmlExtractConfig(max_html_bytes=64 * MB, max_memory_mb=200, processes=1))
    try:
        start = time.monotonic()
        rows = run(tight, [GOOD, one_line_page(50 * MB), GOOD, GOOD])
        assert time.monotonic() - start < 120
        assert [outcome(r) for r in rows] == [None, "parse_error", None, None]
        assert rows[1]["drop_detail"].endswith(", max_memory_mb 200)")
        assert all(json.loads(r["segments"]) == GOOD_SEGMENTS for r in (rows[0], rows[2], rows[3]))
    finally:
        tight.close()


def test_a_child_killed_mid_page_is_a_parse_error_with_its_exit_and_is_replaced():
    stage = HtmlExtract(HtmlExtractConfig(timeout_s=300, max_html_bytes=64 * MB, max_memory_mb=4096, processes=1))
    try:
        stage.ensure_setup()
        [pid] = stage.pool.pids()

        def kill_when_busy() -> None:
            """Kill the child once it holds the page (its memory grew past the page's size): it
            is then busy for seconds parsing it."""
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and _rss_mb(pid) < 120:
                time.sleep(0.01)
            os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        rows = run(stage, [slow_page(), GOOD])
        killer.join()
        assert [outcome(r) for r in rows] == ["parse_error", None]
        assert rows[0]["drop_detail"] == "extraction child died (killed by SIGKILL); replaced"
        # a child that dies while idle is replaced before the next page, which then extracts
        [pid] = stage.pool.pids()
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert [outcome(r) for r in run(stage, [GOOD])] == [None]
    finally:
        stage.close()


def test_rows_already_segmented_or_dropped_pass_through(stage):
    segs = json.dumps([{"type": "text", "text": "from parquet"}])
    t = table([None, None, GOOD], segments=[segs, None, None], drop_reason=[None, None, "http_404"],
              drop_stage=[None, None, "download"])
    rows = stage.process(t).to_pylist()
    assert rows[0]["segments"] == segs and rows[0]["drop_reason"] is None and rows[0]["title"] is None
    assert (rows[1]["drop_reason"], rows[1]["drop_detail"]) == ("empty_document", "no html and no segments")
    assert rows[2]["drop_reason"] == "http_404" and rows[2]["segments"] is None and rows[2]["html"] is None


def test_charset_column_is_a_hint_and_url_resolves_images(stage):
    page = "<p>\u00e9t\u00e9</p><img src='../img/x.png'>".encode("cp1252")
    [row] = run(stage, [page], charset=["ISO-8859-1"])
    assert json.loads(row["segments"]) == [{"type": "text", "text": "\u00e9t\u00e9"},
                                           {"type": "image", "url": "https://e.org/img/x.png", "alt": ""}]


def test_threads_share_the_pool(stage):
    pages = [f"<p>page {i}</p>".encode() for i in range(40)]
    results: dict[int, list[dict]] = {}

    def work(k: int) -> None:
        results[k] = run(stage, pages)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for k in range(3):
        assert [json.loads(r["segments"])[0]["text"] for r in results[k]] == [f"page {i}" for i in range(40)]
    assert 1 <= len(stage.pool.pids()) <= stage.config.processes


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_dead(pids: list[int], bound_s: float = 60) -> bool:
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def test_children_stop_with_close_and_with_garbage_collection():
    s = HtmlExtract(HtmlExtractConfig())
    run(s, [GOOD])
    pids = s.pool.pids()
    s.close()
    assert pids and _wait_dead(pids)
    s = HtmlExtract(HtmlExtractConfig())
    run(s, [GOOD])
    pids = s.pool.pids()
    del s
    gc.collect()
    assert pids and _wait_dead(pids)


def test_children_exit_when_their_parent_dies_abruptly():
    code = textwrap.dedent("""
        import os, sys
        from curate.stages.html_extract import HtmlExtract, HtmlExtractConfig
        s = HtmlExtract(HtmlExtractConfig())
        s.ensure_setup()
        print(s.pool.pids()[0], flush=True)
        os._exit(0)  # no finalizers, no atexit: only the closed pipe tells the child
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert _wait_dead([int(out.stdout.split()[0])])


def test_processes_is_execution_only_but_limits_are_in_the_recipe_hash():
    from curate.recipe import parse_recipe

    def recipe_hash(**stage) -> str:
        return parse_recipe({
            "name": "h", "sources": [{"kind": "html_files", "name": "web", "path": "pages"}],
            "stages": [{"kind": "html_extract", **stage}], "output": {"path": "out"},
        }).hash()

    assert recipe_hash(processes=1) == recipe_hash(processes=8) == recipe_hash()
    assert recipe_hash(timeout_s=5) != recipe_hash() != recipe_hash(max_html_bytes=1000)
    assert recipe_hash(merge_paragraphs=True) != recipe_hash()


@pytest.mark.parametrize("bad", [{"timeout_s": 0}, {"max_html_bytes": 0}, {"max_memory_mb": 8},
                                 {"processes": 0}, {"timeout": 5}])
def test_config_is_validated(bad):
    with pytest.raises(ValidationError):
        HtmlExtractConfig(**bad)


def test_curation_run_extracts_inside_dask_worker_processes(tmp_path, output_checks, shared_cluster):
    """Through the runner on a real LocalCluster (the session's): Dask's worker processes are
    daemonic, where multiprocessing refuses to start children; the stage's exec'd children work
    there."""
    from curate.contract import read_ledger
    from curate.recipe import parse_recipe

    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "a.html").write_bytes(GOOD)
    (pages / "b.html").write_bytes(PNG)
    (pages / "c.html").write_bytes(b"")
    (pages / "d.html").write_bytes(b"<p>caf\xe9</p>")
    out = tmp_path / "out"
    recipe = parse_recipe({
        "name": "html-extract",
        "sources": [{"kind": "html_files", "name": "web", "path": str(pages), "base_url": "https://e.org/"}],
        "stages": [{"kind": "html_extract", "processes": 1}],
        "output": {"path": str(out)},
        "cluster": {"n_workers": 1, "threads_per_worker": 2, "dashboard": False},
    })
    manifest = shared_cluster.run(recipe)
    output_checks.check_ledger_invariant(out)
    assert manifest["counts"]["inputs"] == 4 and manifest["counts"]["kept"] == 2
    outcomes = {r["id"]: (r["outcome"], r["stage"], r["drop_reason"]) for r in read_ledger(out).to_pylist()}
    assert outcomes == {"web:a.html": ("kept", None, None), "web:d.html": ("kept", None, None),
                        "web:b.html": ("dropped", "html_extract", "not_html"),
                        "web:c.html": ("dropped", "html_extract", "empty_document")}
    import tarfile

    with tarfile.open(out / "docs" / "00000.tar") as tar:
        docs = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    by_id = {d["id"]: d for d in docs}
    # (without an image-fetching stage, what pack does with image segments is not this test's business)
    assert by_id["web:a.html"]["segments"][0] == GOOD_SEGMENTS[0]
    assert (by_id["web:a.html"]["title"], by_id["web:a.html"]["html_lang"]) == ("Bonjour", "fr")
    assert "html" not in by_id["web:a.html"]
