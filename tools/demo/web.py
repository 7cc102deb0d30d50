"""The demo's URL-list source: images served from loopback, and a URL list with the failures web
data is full of (a dead link, a server error, HTML served as an image, a repeated URL, a
non-English caption, a malformed row, a file:// URL, a host no resolver knows), plus an image
byte-identical to one in the demo folder, which the exact-dedup pass drops across sources.

`build_www(root)` writes the files the server serves (deterministic bytes); the URL list depends
on the server's port, so `write_url_list(root, base)` writes it once the server is up.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path
from typing import Any

from tools.demo.data import JPEG_QUALITY, DemoImages, chain, crop, encode, fit

DEMO_HOST = "images.demo.test"  # mapped to 127.0.0.1 by the demo recipe's static resolver

# (file, original, transform, format)
WWW_IMAGES = [
    ("astronaut_crop.jpg", "astronaut", chain(crop((100, 0, 412, 312)), fit()), "jpg"),
    ("rocket_web.jpg", "rocket", fit(480), "jpg"),
    ("chelsea_web.png", "chelsea", fit(360), "png"),
    ("coins_web.jpg", "coins", chain(crop((0, 0, 300, 250)), fit()), "jpg"),  # not the wds one
    ("colorwheel_web.jpg", "colorwheel", fit(), "jpg"),
    ("horse_web.jpg", "horse", fit(), "jpg"),
]
NOT_AN_IMAGE = ("not_an_image.jpg", b"<!DOCTYPE html><html><body>Sorry, this page moved.</body></html>\n")
# A served image whose SHA-256 the demo's hash blocklist names (a takedown request), and a host
# its domain blocklist names (with every subdomain): both dropped as `blocklisted`.
TAKEDOWN = ("takedown.jpg", "camera", chain(crop((0, 0, 400, 400)), fit(320)), "jpg")
BLOCKED_DOMAIN = "tracker.demo.test"


def _served_bytes(src: str, transform: Any, fmt: str) -> bytes | None:
    original = DemoImages().get(src)
    return None if original is None else encode(transform(original), fmt, JPEG_QUALITY if fmt == "jpg" else None)


def write_blocklists(root: Path) -> dict[str, str]:
    """Write the demo's blocklists under `root/blocklists` (no server needed: the recipe names
    them when it loads): a domain list and a SHA-256 list of the takedown image's served bytes."""
    folder = Path(root) / "blocklists"
    folder.mkdir(parents=True, exist_ok=True)
    domains = folder / "domains.txt"
    domains.write_text(f"# hosts no image is fetched from (and their subdomains)\n{BLOCKED_DOMAIN}\n")
    hashes = folder / "takedowns.sha256"
    body = _served_bytes(*TAKEDOWN[1:])
    digest = hashlib.sha256(body).hexdigest() if body is not None else "0" * 64
    hashes.write_text(f"# sha256 of images taken down on request (as fetched)\n{digest}  {TAKEDOWN[0]}\n")
    return {"domains": str(domains), "sha256": str(hashes)}


def build_www(root: Path, folder: Path) -> Path:
    """Write the served files under `root/www`; `folder` is the demo image folder (one of its
    images is served byte for byte)."""
    www = Path(root) / "www"
    if www.exists():
        shutil.rmtree(www)
    www.mkdir(parents=True)
    images = DemoImages()
    for name, src, transform, fmt in WWW_IMAGES:
        original = images.get(src)
        if original is not None:
            (www / name).write_bytes(encode(transform(original), fmt, JPEG_QUALITY if fmt == "jpg" else None))
    if (body := _served_bytes(*TAKEDOWN[1:])) is not None:
        (www / TAKEDOWN[0]).write_bytes(body)
    (www / NOT_AN_IMAGE[0]).write_bytes(NOT_AN_IMAGE[1])
    shutil.copyfile(Path(folder) / "coffee.jpg", www / "coffee_copy.jpg")
    return www


def write_url_list(root: Path, base: str) -> dict[str, Any]:
    """Write `root/urls/urls.csv` (url, caption, license) against the server at `base`; return
    the expected outcome: inputs, kept, and the drop reasons."""
    port = base.rsplit(":", 1)[1]
    named = f"http://{DEMO_HOST}:{port}"
    good = {
        "astronaut_crop.jpg": "An astronaut in an orange suit smiling in front of a flag",
        "rocket_web.jpg": "A rocket standing on its launch pad before lift-off under a clear sky",
        "chelsea_web.png": "A tabby cat looking into the camera with green eyes",
        "coins_web.jpg": "Old coins of different sizes laid out in rows on a dark background",
    }
    rows: list[list[str]] = [[f"{base}/img/{name}", caption, "cc0"] for name, caption in good.items()]
    rows += [
        [f"{named}/redirect/colorwheel_web.jpg", "A colour wheel with every hue around a white centre", "cc0"],
        [f"{base}/img/coffee_copy.jpg", "Espresso served in a red cup, the same photo as in the folder", "cc0"],
        [f"{base}/img/missing.jpg", "A photo that was taken down from the web long ago", "cc0"],
        [f"{base}/status/500/server_error.jpg", "An image behind a server that fails every time", "cc0"],
        [f"{base}/img/{NOT_AN_IMAGE[0]}", "A page that moved, served where an image should be", "cc0"],
        [f"{base}/img/astronaut_crop.jpg", "The same astronaut photo listed again under another caption", "cc0"],
        [f"{base}/img/horse_web.jpg", "Un cheval noir dessiné sur un fond blanc, vu de profil", "cc0"],
        ["file:///etc/passwd", "A local file that must never be read by a downloader", "cc0"],
        [f"http://unknown.demo.test:{port}/img/rocket_web.jpg", "A host name that no resolver knows", "cc0"],
        [f"http://ads.{BLOCKED_DOMAIN}:{port}/img/rocket_web.jpg", "A banner from a host on the domain blocklist", "cc0"],
        [f"{base}/img/{TAKEDOWN[0]}", "A photographer with a camera, taken down at the owner's request", "cc0"],
    ]
    path = Path(root) / "urls" / "urls.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption", "license"])
        writer.writerows(rows)
        f.write('"unterminated,row with a broken quote\n')  # malformed: the csv reader rejects it
    drops = {
        "duplicate": 2,  # coffee_copy.jpg (same bytes as folder:coffee.jpg) + the repeated URL
        "http_404": 1,
        "http_500": 1,
        "decode_error": 1,
        "lang_mismatch": 1,
        "bad_url": 1,
        "dns_error": 1,
        "malformed_row": 1,
        "blocklisted": 2,  # a subdomain of BLOCKED_DOMAIN (before download), TAKEDOWN's bytes (after)
    }
    return {"path": str(path), "expected_inputs": len(rows) + 1, "expected_kept": 5, "expected_drops": drops}
