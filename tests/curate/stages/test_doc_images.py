"""The images of documents go through the pairs' machinery: the download stage (real HTTP server
on loopback, all its guards), the image stage and the image filters, each image on its own. A
failed image removes its segment, recorded with its code; the document stays, its image indices
stay dense and aligned with its image lists; a document left with nothing is dropped."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pytest
from PIL import Image
from skimage import data

from curate.contract import encode_sample, record_schema
from curate.documents import dump_json
from curate.stages.download import DownloadStage
from curate.stages.pair_filters import AspectRatioFilter
from curate.stages.image import ImageStage
from tools.demo.server import serve

pytestmark = pytest.mark.usefixtures("loopback_only")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    www = tmp_path_factory.mktemp("www")
    for name, pixels, fmt in (("astronaut.jpg", data.astronaut(), "JPEG"), ("coffee.png", data.coffee(), "PNG"),
                              ("strip.png", data.coffee()[:20], "PNG")):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt)
        (www / name).write_bytes(buf.getvalue())
    (www / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)  # a JPEG header, then nothing
    with serve(www) as base:
        yield base


def _doc(doc_id, segments):
    return {"id": doc_id, "source": "w", "url": "http://127.0.0.1/page.html", "segments": dump_json(segments)}


def _img(url, alt=""):
    return {"type": "image", "url": url, "alt": alt}


def test_failed_images_remove_their_segments_not_the_document(site):
    base = site
    docs = [
        _doc("w:1", [
            {"type": "text", "text": "An astronaut, then a dead link, a broken file, coffee and a strip."},
            _img(f"{base}/img/astronaut.jpg", "astronaut"),
            _img(f"{base}/img/gone.jpg"),
            _img(f"{base}/img/broken.jpg"),
            {"type": "text", "text": "Coffee follows."},
            _img(f"{base}/img/coffee.png", "coffee"),
            _img(f"{base}/img/strip.png"),
            _img("file:///etc/passwd"),
        ]),
        _doc("w:2", [_img(f"{base}/img/gone.jpg")]),  # its only segment fails
        _doc("w:3", [{"type": "text", "text": "Only text."}]),
    ]
    table = pa.Table.from_pylist(docs, schema=record_schema("doc"))
    table = DownloadStage(DownloadStage.Config(allow_networks=["127.0.0.0/8"], respect_robots_txt=False,
                                               retries=0)).process(table)
    table = ImageStage(ImageStage.Config(image_size=64, format="jpg")).process(table)
    table = AspectRatioFilter(AspectRatioFilter.Config(max_aspect_ratio=3.0)).process(table)
    rows = {r["id"]: r for r in table.to_pylist()}

    doc = rows["w:1"]
    assert doc["drop_reason"] is None
    segments = json.loads(doc["segments"])
    assert [s["type"] for s in segments] == ["text", "image", "text", "image"]
    assert [(s["image"], s["alt"]) for s in segments if s["type"] == "image"] == [(0, "astronaut"), (1, "coffee")]
    assert doc["image_formats"] == ["jpg", "jpg"] and len(doc["images"]) == 2
    assert doc["image_original_widths"] == [512, 600] and min(doc["image_widths"][0], doc["image_heights"][0]) == 64
    for image, width in zip(doc["images"], doc["image_widths"]):
        assert Image.open(io.BytesIO(image)).size[0] == width
    drops = {d["url"].rsplit("/", 1)[-1]: (d["stage"], d["reason"]) for d in json.loads(doc["segment_drops"])}
    assert drops == {
        "gone.jpg": ("download", "http_404"),
        "passwd": ("download", "bad_url"),
        "broken.jpg": ("image", "decode_error"),
        "strip.png": ("aspect_ratio_filter", "aspect_ratio"),
    }
    assert doc["attempts"] >= 4
    # the tar members follow the renumbered indices
    names = [name for name, _ in encode_sample("doc", doc, "0000000000")]
    assert names == ["0000000000.json", "0000000000.0.jpg", "0000000000.1.jpg"]

    assert rows["w:2"]["drop_reason"] == "empty_document" and rows["w:2"]["drop_stage"] == "download"
    assert rows["w:3"]["drop_reason"] is None and rows["w:3"]["images"] == []
