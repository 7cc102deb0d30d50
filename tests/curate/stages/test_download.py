"""The download stage against a real HTTP server on loopback: fetched bytes land in the image
columns, failures become drops with the fetcher's codes, rows that already have an image are
left alone, and the thread count is execution-only (not in the recipe hash)."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image
from skimage import data

from curate.contract import image_digest, record_schema
from curate.recipe import parse_recipe
from curate.stages.download import DownloadStage, sniff_image_format
from tools.demo.server import serve


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    www = tmp_path_factory.mktemp("www")
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="JPEG", quality=85)
    (www / "astronaut.jpg").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(data.coffee()).save(buf, format="PNG")
    (www / "coffee.png").write_bytes(buf.getvalue())
    (www / "page.jpg").write_bytes(b"<html>not an image</html>")
    with serve(www) as base:
        yield base, www


def _table(rows):
    return pa.Table.from_pylist(
        [{"id": f"t:{i}", "source": "t", **r} for i, r in enumerate(rows)], schema=record_schema("pair")
    )


def _stage(**cfg):
    cfg.setdefault("allow_networks", ["127.0.0.0/8"])
    return DownloadStage(DownloadStage.Config(**cfg))


def test_fetches_and_fills_image_columns(site):
    base, www = site
    port = base.rsplit(":", 1)[1]
    stage = _stage(threads=4, hosts={"images.test": "127.0.0.1"})
    local = b"\xff\xd8\xff already here"
    out = stage.process(_table([
        {"url": f"{base}/img/astronaut.jpg", "caption": "a"},
        {"url": f"http://images.test:{port}/redirect/coffee.png", "caption": "b"},
        {"url": f"{base}/img/missing.jpg", "caption": "c"},
        {"url": f"{base}/status/503/x.jpg", "caption": "d"},
        {"url": f"http://nowhere.test:{port}/img/astronaut.jpg", "caption": "e"},
        {"url": "ftp://127.0.0.1/x.jpg", "caption": "f"},
        {"url": None, "caption": "g"},
        {"url": None, "caption": "h", "image": local, "image_format": "jpg"},
        {"url": f"{base}/img/page.jpg", "caption": "i", "drop_reason": "caption_too_short",
         "drop_stage": "caption_length_filter"},
    ])).to_pylist()
    assert out[0]["image"] == (www / "astronaut.jpg").read_bytes()
    assert (out[0]["image_format"], out[0]["image_sha256"]) == ("jpg", image_digest(out[0]["image"]))
    assert out[0]["image_nbytes"] == len(out[0]["image"]) and out[0]["attempts"] == 1
    assert out[1]["image_format"] == "png" and out[1]["drop_reason"] is None
    assert [(r["drop_stage"], r["drop_reason"]) for r in out[2:7]] == [
        ("download", "http_404"), ("download", "http_503"), ("download", "dns_error"),
        ("download", "bad_url"), ("download", "bad_url"),
    ]
    assert out[7]["image"] == local and out[7]["attempts"] is None  # a local row: not fetched
    assert out[8]["drop_reason"] == "caption_too_short" and out[8]["image"] is None  # never fetched


def test_the_digest_is_left_to_an_image_stage_that_runs_next(site):
    """Followed by the image stage (which digests the bytes it keeps), a pair's as-fetched digest
    is not computed; the image stage's is that of its output. Followed by anything else, or by
    the segment's end, the download stage digests the body."""
    from curate.stages.image import ImageStage

    base, _ = site
    stage, image = _stage(threads=2), ImageStage(ImageStage.Config(image_size=64))
    rows = [{"url": f"{base}/img/astronaut.jpg", "caption": "a"}, {"url": f"{base}/img/page.jpg", "caption": "b"}]
    stage.followed_by(image)
    fetched = stage.process(_table(rows))
    assert fetched.column("image_sha256").to_pylist() == [None, None]
    out = image.process(fetched).to_pylist()
    assert out[0]["drop_reason"] is None and out[0]["image_sha256"] == image_digest(out[0]["image"])
    assert out[1]["drop_reason"] == "decode_error"
    for after in (None, _stage()):
        stage.followed_by(after)
        out = stage.process(_table(rows)).to_pylist()
        assert [r["image_sha256"] for r in out] == [image_digest(r["image"]) for r in out]


def test_loopback_is_blocked_unless_allowed(site):
    base, _ = site
    out = _stage(allow_networks=[]).process(_table([{"url": f"{base}/img/astronaut.jpg"}])).to_pylist()
    assert out[0]["drop_reason"] == "blocked" and out[0]["image"] is None


def test_byte_cap_and_non_image_bytes(site):
    base, _ = site
    out = _stage(max_bytes="2KiB").process(_table([{"url": f"{base}/img/astronaut.jpg"}])).to_pylist()
    assert out[0]["drop_reason"] == "too_large"
    out = _stage().process(_table([{"url": f"{base}/img/page.jpg"}])).to_pylist()
    assert out[0]["drop_reason"] is None and out[0]["image_format"] == "unknown"  # the image stage decides


def test_sniffing():
    assert sniff_image_format(b"\x89PNG\r\n\x1a\n....") == "png"
    assert sniff_image_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_image_format(b"GIF89a") == "gif"
    assert sniff_image_format(b"<html>") == "unknown"


def test_threads_are_execution_only():
    def recipe(threads):
        return parse_recipe({
            "name": "t",
            "sources": [{"kind": "url_list", "name": "u", "path": "urls.csv"}],
            "stages": [{"kind": "download", "threads": threads}],
            "output": {"path": "o"},
        })

    assert recipe(4).hash() == recipe(64).hash()


def test_bad_network_in_recipe_fails_at_load():
    from curate.recipe import RecipeError

    with pytest.raises(RecipeError, match="stages.0.download.allow_networks"):
        parse_recipe({
            "name": "t",
            "sources": [{"kind": "url_list", "name": "u", "path": "urls.csv"}],
            "stages": [{"kind": "download", "allow_networks": ["not-a-cidr"]}],
            "output": {"path": "o"},
        })
