"""Blocklists (issue 23): a listed domain (and its subdomains, not a look-alike), a listed URL
(after normalisation), a listed image digest (sha256 or md5 of the bytes where the stage sits)
drop the record with `blocklisted`, or remove a doc's image segment; counts per list file; a
missing, empty or malformed list fails at recipe load naming the key, the file and the line."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pytest
from PIL import Image
from skimage import data

from curate.contract import record_schema
from curate.documents import dump_json
from curate.recipe import RecipeError, parse_recipe
from curate.stages import STAGES
from curate.stages.base import counting
from curate.stages.blocklist import HashBlocklist, KeySet, UrlBlocklist
from curate.stages.image import ImageStage


def _run(stage, kind, rows):
    """The rows after `stage.process`, and the counts it made."""
    with counting() as counter:
        out = stage.process(pa.Table.from_pylist(rows, schema=record_schema(kind)))
    return out.to_pylist(), dict(counter)


def _jpeg(pixels, quality=90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture
def lists(tmp_path):
    domains = tmp_path / "bad_domains.txt"
    domains.write_text("# spam hosts\n\nexample.com\n*.Tracker.NET.  # wildcard notation, any case\nbücher.de\n")
    urls = tmp_path / "takedowns.txt"
    urls.write_text("# takedown requests\nHTTPS://Images.Host.org:443/Photos/A.jpg#x\nhttp://host.org/b.jpg\n")
    return str(domains), str(urls)


def test_registered_under_their_kinds():
    assert STAGES["url_blocklist"] is UrlBlocklist and STAGES["hash_blocklist"] is HashBlocklist


def test_listed_domains_and_urls_drop_pairs_and_are_counted_per_list(lists):
    domains, urls = lists
    stage = UrlBlocklist(UrlBlocklist.Config(domains=[domains], urls=[urls]))
    cases = {
        "https://example.com/a.jpg": "bad_domains.txt: example.com",
        "http://CDN.img.Example.COM.:8080/b.jpg": "bad_domains.txt: example.com",  # subdomain, case, dot
        "https://notexample.com/a.jpg": None,  # a look-alike is another domain
        "https://example.com.evil.org/a.jpg": None,
        "https://pixel.tracker.net/p.gif": "bad_domains.txt: tracker.net",
        "https://xn--bcher-kva.de/cover.jpg": "bad_domains.txt: xn--bcher-kva.de",  # IDNA both sides
        "https://shop.BÜCHER.de/cover.jpg": "bad_domains.txt: xn--bcher-kva.de",
        "https://images.host.org/Photos/A.jpg": "takedowns.txt: https://images.host.org/Photos/A.jpg",
        "HTTP://HOST.ORG:80/b.jpg#zoom": "takedowns.txt: http://host.org/b.jpg",
        "https://images.host.org/photos/a.jpg": None,  # a path's case matters
        "https://host.org/b.jpg": None,  # another scheme is another URL
        "file:///etc/passwd": None,
        "http://[::1": None,  # unparseable: the download stage says bad_url
    }
    rows = [{"id": f"p:{i}", "source": "p", "url": url, "caption": "c"} for i, url in enumerate(cases)]
    rows.append({"id": "p:gone", "source": "p", "url": "https://example.com/x.jpg", "drop_stage": "earlier",
                 "drop_reason": "too_short"})
    out, counts = _run(stage, "pair", rows)
    got = {r["url"]: r["drop_detail"] if r["drop_reason"] == "blocklisted" else None for r in out[:-1]}
    assert got == cases
    assert {r["drop_stage"] for r in out[:-1] if r["drop_reason"]} == {"url_blocklist"}
    assert out[-1]["drop_reason"] == "too_short"  # already dropped: untouched, not counted
    assert counts == {"bad_domains.txt": 5, "takedowns.txt": 2}


def test_docs_lose_a_blocked_page_or_a_blocked_image_segment(lists):
    domains, urls = lists
    stage = UrlBlocklist(UrlBlocklist.Config(domains=[domains]))
    text = {"type": "text", "text": "A page about photographs."}
    docs = [
        {"id": "d:page", "source": "d", "url": "https://www.example.com/page.html",
         "segments": dump_json([text, {"type": "image", "url": "https://ok.org/1.jpg"}])},
        {"id": "d:image", "source": "d", "url": "https://ok.org/page.html",
         "segments": dump_json([text, {"type": "image", "url": "https://static.example.com/ad.jpg", "alt": "ad"},
                                {"type": "image", "url": "https://ok.org/2.jpg"}])},
        {"id": "d:only", "source": "d", "url": "https://ok.org/gallery.html",
         "segments": dump_json([{"type": "image", "url": "https://example.com/only.jpg"}])},
    ]
    out, counts = _run(stage, "doc", docs)
    page, image, only = out
    assert (page["drop_reason"], page["drop_detail"]) == ("blocklisted", "bad_domains.txt: example.com")
    assert image["drop_reason"] is None
    assert json.loads(image["segments"]) == [text, {"type": "image", "url": "https://ok.org/2.jpg"}]
    assert json.loads(image["segment_drops"]) == [{
        "segment": 1, "type": "image", "url": "https://static.example.com/ad.jpg", "stage": "url_blocklist",
        "reason": "blocklisted", "detail": "bad_domains.txt: example.com"}]
    assert only["drop_reason"] == "empty_document"
    assert counts == {"bad_domains.txt": 3}
    texts, _ = _run(stage, "text", [{"id": "t:1", "source": "t", "url": "http://example.com/", "text": "x"},
                                    {"id": "t:2", "source": "t", "url": None, "text": "y"}])
    assert [t["drop_reason"] for t in texts] == ["blocklisted", None]


def test_hash_lists_match_the_bytes_where_the_stage_sits(tmp_path):
    """sha256 of the fetched bytes before the image stage, md5 of the stored bytes after it: the
    kind used twice under two names; a list of fetched bytes does not match re-encoded ones."""
    fetched = [_jpeg(data.astronaut()[::4, ::4]), _jpeg(data.coffee()[::4, ::4]), _jpeg(data.chelsea()[::4, ::4])]
    pairs = [{"id": f"p:{i}", "source": "p", "caption": "c", "image": b, "image_format": "jpg"}
             for i, b in enumerate(fetched)]
    table = pa.Table.from_pylist(pairs, schema=record_schema("pair"))
    stored = ImageStage(ImageStage.Config(image_size=48, format="jpg")).process(table).column("image").to_pylist()

    originals = tmp_path / "originals.sha256"  # `sha256sum` output, upper case: both accepted
    originals.write_text(f"# fetched\n{hashlib.sha256(fetched[0]).hexdigest().upper()}  astronaut.jpg\n")
    reencoded = tmp_path / "stored.md5"
    reencoded.write_text(hashlib.md5(stored[1]).hexdigest() + "\n")
    before = HashBlocklist(HashBlocklist.Config(name="hashes_fetched", sha256=[str(originals)]))
    after = HashBlocklist(HashBlocklist.Config(name="hashes_stored", sha256=[str(originals)], md5=[str(reencoded)]))

    with counting() as counter:
        table = before.process(table)
        counts_before = dict(counter)
    table = ImageStage(ImageStage.Config(image_size=48, format="jpg")).process(table)
    out, counts_after = _run(after, "pair", table.to_pylist())
    assert [(r["drop_stage"], r["drop_reason"], r["drop_detail"]) for r in out] == [
        ("hashes_fetched", "blocklisted", f"originals.sha256 (sha256): {hashlib.sha256(fetched[0]).hexdigest()}"),
        ("hashes_stored", "blocklisted", f"stored.md5 (md5): {hashlib.md5(stored[1]).hexdigest()}"),
        (None, None, None),
    ]
    assert counts_before == {"originals.sha256": 1} and counts_after == {"stored.md5": 1}
    # after the image stage, the list of fetched bytes misses the astronaut it names
    assert _run(after, "pair", [{**pairs[0], "image": stored[0]}])[0][0]["drop_reason"] is None


def test_hash_lists_remove_a_docs_listed_image(tmp_path):
    images = [_jpeg(data.astronaut()[::8, ::8]), _jpeg(data.coffee()[::8, ::8])]
    md5s = tmp_path / "known.md5"
    md5s.write_text(hashlib.md5(images[0]).hexdigest() + "\n")
    doc = {"id": "d:1", "source": "d", "url": "https://ok.org/p.html", "images": images,
           "image_formats": ["jpg", "jpg"], "segments": dump_json([
               {"type": "image", "image": 0, "url": "https://ok.org/a.jpg"}, {"type": "text", "text": "Words."},
               {"type": "image", "image": 1, "url": "https://ok.org/c.jpg"}])}
    (out,), counts = _run(HashBlocklist(HashBlocklist.Config(md5=[str(md5s)])), "doc", [doc])
    assert out["drop_reason"] is None and out["images"] == images[1:]
    assert [s.get("image") for s in json.loads(out["segments"])] == [None, 0]
    (drop,) = json.loads(out["segment_drops"])
    assert (drop["segment"], drop["reason"], drop["url"]) == (0, "blocklisted", "https://ok.org/a.jpg")
    assert counts == {"known.md5": 1}


def test_key_set_finds_exactly_its_keys():
    keys = [hashlib.sha256(str(i).encode()).digest() for i in range(1000)]
    keys += [b"\x00" * 8 + b"\x01" * 24, b"\x00" * 8 + b"\x02" * 24]  # a shared 8-byte prefix
    found = KeySet(b"".join(keys), 32)
    assert len(found) == 1002 and all(k in found for k in keys)
    assert b"\x00" * 8 + b"\x03" * 24 not in found
    assert hashlib.sha256(b"other").digest() not in found and b"\xff" * 32 not in found


def _recipe(stage):
    return {"name": "t", "sources": [{"kind": "image_folder", "name": "a", "path": "x", "captions": "sidecar"}],
            "stages": [{"kind": "image"}, stage], "output": {"path": "out"}}


def test_bad_lists_fail_at_recipe_load_naming_the_key(tmp_path, lists):
    domains, _ = lists
    missing = str(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    (tmp_path / "bad.sha256").write_text("# digests\n" + "a" * 64 + "\n\n" + "b" * 63 + "\n")
    (tmp_path / "urls_as_domains.txt").write_text("example.org\nhttps://example.com/a.jpg\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "bad_domains.txt").write_text("example.org\n")
    cases = [
        ({"kind": "url_blocklist", "domains": [domains, missing]},
         rf"stages\.1\.url_blocklist\.domains\.1: .*blocklist {missing}: no such file"),
        ({"kind": "url_blocklist", "urls": [str(tmp_path / "empty.txt")]},
         r"stages\.1\.url_blocklist\.urls\.0: .*empty\.txt: no entries"),
        ({"kind": "url_blocklist", "urls": [domains]},
         r"urls\.0: .*bad_domains\.txt: line 3: not a URL .*'example\.com'"),
        ({"kind": "url_blocklist", "domains": [str(tmp_path / "urls_as_domains.txt")]},
         r"domains\.0: .*line 2: not a domain name"),
        ({"kind": "hash_blocklist", "sha256": [str(tmp_path / "bad.sha256")]},
         r"stages\.1\.hash_blocklist\.sha256\.0: .*bad\.sha256: line 4: not a sha256 hex digest"),
        ({"kind": "hash_blocklist", "md5": [str(tmp_path / "bad.sha256")]},
         r"md5\.0: .*line 2: not a md5 hex digest"),
        ({"kind": "url_blocklist"}, r"stages\.1\.url_blocklist: .*at least one list file: `domains` or `urls`"),
        ({"kind": "hash_blocklist", "sha256": []}, r"stages\.1\.hash_blocklist: .*`sha256` or `md5`"),
        ({"kind": "url_blocklist", "domains": [domains, str(tmp_path / "other" / "bad_domains.txt")]},
         r"stages\.1\.url_blocklist: .*share the file name 'bad_domains\.txt'"),
    ]
    for stage, message in cases:
        with pytest.raises(RecipeError, match=message):
            parse_recipe(_recipe(stage), "r.yaml")
    recipe = parse_recipe(_recipe({"kind": "url_blocklist", "domains": [domains]}), "r.yaml")
    assert recipe.stages[1].domains == [domains]  # the config holds the path, never the entries
