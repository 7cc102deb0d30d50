"""The html_files source on a real folder of pages, links and oddities included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from curate.sources import build_source
from curate.sources.html_files import HtmlFilesConfig

PAGE = b"<!doctype html><html><head><title>%s</title></head><body><p>%s</p></body></html>"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    (root / "blog" / "2024").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "index.html").write_bytes(PAGE % (b"home", b"Welcome"))
    (root / "about.HTM").write_bytes(PAGE % (b"about", b"About us"))
    (root / "blog" / "2024" / "first post.html").write_bytes(PAGE % (b"post", "Caf\u00e9".encode("latin-1")))
    (root / "big.html").write_bytes(b"<html>" + b"x" * 5000 + b"</html>")
    (root / "style.css").write_text("body {}")
    (root / ".hidden.html").write_bytes(PAGE % (b"hidden", b"no"))
    (root / ".git" / "page.html").write_bytes(PAGE % (b"git", b"no"))
    outside = tmp_path / "secret.html"
    outside.write_bytes(PAGE % (b"secret", b"must never be read"))
    os.symlink(outside, root / "leak.html")
    os.symlink(root / "index.html", root / "alias.html")  # a link inside the folder is fine
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "far.html").write_bytes(PAGE % (b"far", b"not descended"))
    os.symlink(elsewhere, root / "linked")
    return root


def source(path, **kw):
    return build_source(HtmlFilesConfig(name="pages", path=str(path), **kw))


def rows(src, batch_size: int = 2) -> list[dict]:
    return [r for p in src.partitions() for t in src.read(p, batch_size) for r in t.to_pylist()]


def test_every_page_once(site):
    got = {r["id"]: r for r in rows(source(site, max_file_bytes=1000, files_per_partition=2))}
    assert sorted(got) == ["pages:about.HTM", "pages:alias.html", "pages:big.html",
                           "pages:blog/2024/first post.html", "pages:index.html", "pages:leak.html"]
    assert got["pages:index.html"]["html"] == PAGE % (b"home", b"Welcome")
    assert got["pages:alias.html"]["html"] == got["pages:index.html"]["html"]
    assert got["pages:blog/2024/first post.html"]["html"].endswith(b"Caf\xe9</p></body></html>")  # bytes untouched
    assert all(r["url"] is None and r["charset"] is None and r["segments"] is None for r in got.values())
    leak = got["pages:leak.html"]
    assert (leak["drop_stage"], leak["drop_reason"], leak["html"]) == ("source", "unsafe_path", None)
    big = got["pages:big.html"]
    assert big["drop_reason"] == "too_large" and "max_file_bytes 1000" in big["drop_detail"]


def test_base_url_gives_page_urls(site):
    got = {r["id"]: r["url"] for r in rows(source(site, base_url="https://mirror.example/root"))}
    assert got["pages:index.html"] == "https://mirror.example/root/index.html"
    assert got["pages:blog/2024/first post.html"] == "https://mirror.example/root/blog/2024/first%20post.html"
    with pytest.raises(ValidationError, match="base_url"):
        HtmlFilesConfig(name="p", path=str(site), base_url="file:///etc/")


def test_top_level_only(site):
    got = [r["id"] for r in rows(source(site, recursive=False))]
    assert "pages:blog/2024/first post.html" not in got and "pages:index.html" in got


def test_a_file_that_vanishes_is_still_an_input(site):
    src = source(site)
    parts = src.partitions()
    (site / "about.HTM").unlink()
    got = {r["id"]: r for p in parts for t in src.read(p, 10) for r in t.to_pylist()}
    assert got["pages:about.HTM"]["drop_reason"] == "read_error"
    assert "FileNotFoundError" in got["pages:about.HTM"]["drop_detail"]


def test_a_name_that_is_not_utf8(tmp_path):
    root = tmp_path / "odd"
    root.mkdir()
    name = os.fsencode(root) + b"/caf\xe9.html"
    with open(name, "wb") as fh:
        fh.write(b"<html>x</html>")
    got = rows(source(root))
    assert [(r["id"], r["drop_reason"]) for r in got] == [("pages:caf\\xe9.html", "unsafe_path")]


def test_deterministic_and_fingerprinted(site):
    src = source(site, files_per_partition=3)
    parts = src.partitions()
    assert parts == source(site, files_per_partition=3).partitions()
    once = [t for p in parts for t in src.read(p, 2)]
    assert all(a.equals(b) for a, b in zip(once, [t for p in parts for t in src.read(p, 2)]))
    (site / "about.HTM").write_bytes(PAGE % (b"about", b"About us, changed"))
    changed = source(site, files_per_partition=3).partitions()
    assert parts[0].fingerprint != changed[0].fingerprint  # about.HTM sorts first
    assert parts[1].fingerprint == changed[1].fingerprint


def test_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        source(tmp_path / "missing").partitions()
