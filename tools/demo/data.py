"""The demo's input corpus: real images bundled in scikit-image and scikit-learn, captioned by hand.

`build_demo_inputs(root)` (re)creates, byte for byte the same on every run with the same package
versions, three small sources under `root`:

    root/folder/   an image folder with sidecar captions (NAME.jpg + NAME.txt)
    root/mapped/   images whose captions come from one mapping file, captions.jsonl
    root/wds/      WebDataset tars laid out the way img2dataset writes them

Each source holds good samples plus a few deliberately bad inputs, one defect each, so that every
drop reason the demo's stages emit shows up in the ledger. The returned summary says how many input
samples each source holds and which reason each bad input is expected to get.

Images come only from files shipped inside the installed packages (nothing is downloaded): a
scikit-image image whose file is not in the local bundle is skipped, never fetched.

    python -m tools.demo.data ROOT     # builds under ROOT and prints the summary as JSON
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from curate.engine.pack import add_member

JPEG_QUALITY = 90
WEBP_QUALITY = 85
MAX_SIDE = 640  # large originals are resized so their long side is at most this
TAR_MTIME = 1_700_000_000  # fixed, so tars are byte-identical across runs
URL_BASE = "https://demo.example.com"  # example.com is reserved (RFC 2606); never fetched

# Drop reasons the stages use for the bad inputs below (see DESIGN.md, "Nothing is lost silently").
DECODE_ERROR = "decode_error"
IMAGE_TOO_SMALL = "image_too_small"
ASPECT_RATIO = "aspect_ratio"
CAPTION_TOO_SHORT = "caption_too_short"
NO_CAPTION = "no_caption"
DUPLICATE = "duplicate"
MALFORMED_ROW = "malformed_row"
MISSING_IMAGE = "missing_image"


# ---------------------------------------------------------------------------------------------
# Loading the bundled images
# ---------------------------------------------------------------------------------------------

# skimage.data function -> the file it reads from the package's own data folder. Only functions
# whose file is present are called: the others would try to download through pooch.
SKIMAGE_BUNDLED: dict[str, str] = {
    "astronaut": "astronaut.png",
    "brick": "brick.png",
    "camera": "camera.png",
    "cell": "cell.png",
    "checkerboard": "chessboard_GRAY.png",
    "chelsea": "chelsea.png",
    "clock": "clock_motion.png",
    "coffee": "coffee.png",
    "coins": "coins.png",
    "colorwheel": "color.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "horse": "horse.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "logo": "logo.png",
    "moon": "moon.png",
    "page": "page.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
    "shepp_logan_phantom": "phantom.png",
    "stereo_motorcycle": "motorcycle_left.png",
    "text": "text.png",
}
SKLEARN_BUNDLED = ("china.jpg", "flower.jpg")


def _to_pil(array: np.ndarray) -> Image.Image:
    """A skimage array as a Pillow image: bool and float images become 8-bit grey."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype.kind == "f":
        array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def _skimage_image(name: str) -> Image.Image | None:
    import skimage.data  # the demo extra (scikit-image), optional: only drawing an image needs it

    filename = SKIMAGE_BUNDLED.get(name)
    if filename is None or name not in skimage.data.__all__:
        return None
    if not (Path(skimage.data.__file__).parent / filename).is_file():
        return None  # not in the local bundle: calling it would go to the network
    try:
        array = getattr(skimage.data, name)()
    except Exception:  # a fetcher that still wants the network, a missing optional reader...
        return None
    if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
        array = array[0]
    return _to_pil(array)


def _sklearn_image(filename: str) -> Image.Image | None:
    try:
        ref = resources.files("sklearn.datasets.images") / filename
        data = ref.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        return None
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class DemoImages:
    """Loads each original once; `get` returns None for one that is not bundled locally."""

    def __init__(self) -> None:
        self._cache: dict[str, Image.Image | None] = {}

    def get(self, name: str) -> Image.Image | None:
        if name not in self._cache:
            if name.startswith("sklearn:"):
                self._cache[name] = _sklearn_image(name.split(":", 1)[1])
            else:
                self._cache[name] = _skimage_image(name)
        image = self._cache[name]
        return None if image is None else image.copy()


# ---------------------------------------------------------------------------------------------
# Transforms and encoders (all deterministic: Pillow's own resampling, fixed encoder settings)
# ---------------------------------------------------------------------------------------------

Transform = Callable[[Image.Image], Image.Image]


def fit(max_side: int = MAX_SIDE) -> Transform:
    def apply(im: Image.Image) -> Image.Image:
        w, h = im.size
        scale = max_side / max(w, h)
        if scale >= 1:
            return im
        return im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)

    return apply


def scale(factor: float) -> Transform:
    def apply(im: Image.Image) -> Image.Image:
        w, h = im.size
        return im.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.LANCZOS)

    return apply


def resize_to(width: int, height: int) -> Transform:
    return lambda im: im.resize((width, height), Image.Resampling.LANCZOS)


def crop(box: tuple[int, int, int, int]) -> Transform:
    return lambda im: im.crop(box)


def gray(im: Image.Image) -> Image.Image:
    return im.convert("L")


def chain(*steps: Transform) -> Transform:
    def apply(im: Image.Image) -> Image.Image:
        for step in steps:
            im = step(im)
        return im

    return apply


def encode(im: Image.Image, fmt: str, quality: int | None = None) -> bytes:
    """Encoded bytes with fixed settings and no metadata (no EXIF, no timestamps)."""
    buf = io.BytesIO()
    if fmt == "jpg":
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        im.save(buf, format="JPEG", quality=quality or JPEG_QUALITY, optimize=False, progressive=False)
    elif fmt == "png":
        im.save(buf, format="PNG", optimize=False, compress_level=6)
    elif fmt == "webp":
        if im.mode not in ("RGB", "RGBA"):
            im = im.convert("RGB")
        im.save(buf, format="WEBP", quality=quality or WEBP_QUALITY, method=4, lossless=False, exact=False)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# What goes where
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One image file to write: `name` (with extension) made from original `src` by `transform`."""

    name: str
    src: str
    caption: str | None  # None: no caption at all (no sidecar file / no mapping row)
    transform: Transform = fit()
    quality: int | None = None
    derived: str | None = None  # how this differs from another item it was made from
    derived_from: str | None = None  # that item's name

    @property
    def fmt(self) -> str:
        return self.name.rsplit(".", 1)[1]


# root/folder: NAME.ext + NAME.txt. Base images first, then variants of a few, then the bad ones.
FOLDER_BASE: list[Item] = [
    Item("astronaut.jpg", "astronaut",
         "Portrait of astronaut Eileen Collins smiling in an orange launch and entry suit, holding "
         "her helmet, with the American flag and a space shuttle model behind her"),
    Item("camera.jpg", "camera",
         "Black and white photo of a man in a dark coat looking through a camera on a tripod on a "
         "grassy field, with buildings on the skyline behind him"),
    Item("chelsea.jpg", "chelsea",
         "Close-up of the face of a tabby cat with green eyes, a pink nose and long white whiskers"),
    Item("coffee.jpg", "coffee",
         "A cup of espresso with a spoon on a red saucer, seen from above on a worn wooden table"),
    Item("colorwheel.png", "colorwheel",
         "A color wheel: a disc of hues blending from red through yellow, green, cyan, blue and "
         "magenta around a white centre, on a black background"),
    Item("horse.png", "horse",
         "Black silhouette of a standing horse in profile on a white background"),
    Item("hubble_deep_field.jpg", "hubble_deep_field",
         "The Hubble eXtreme Deep Field: thousands of distant galaxies in many colours scattered "
         "across black space"),
    Item("logo.png", "logo",
         "The scikit-image logo: a circle split into green and orange halves by a white S-shaped "
         "curve, with a drawing of a snake's head"),
    Item("moon.jpg", "moon",
         "Grayscale close-up of the surface of the moon with small craters and dark patches, in "
         "low contrast"),
    Item("page.png", "page",
         "Scanned page of printed text headed 'Region-based segmentation', with a line of Python "
         "code at the bottom and uneven lighting"),
    Item("retina.jpg", "retina",
         "Fundus photograph of a healthy human retina: an orange-red disc with branching blood "
         "vessels spreading from the bright optic disc"),
    Item("rocket.webp", "rocket",
         "A SpaceX Falcon 9 rocket on the launch pad at dusk between lightning towers, lit by "
         "floodlights under a deep blue sky"),
    Item("china.jpg", "sklearn:china.jpg",
         "A tiered Chinese pagoda with red, green and gold painted eaves rising above trees, "
         "overlooking a wide lake on a hazy day"),
    Item("flower.webp", "sklearn:flower.jpg",
         "An orange dahlia in full bloom with tightly layered petals, against a blurred dark "
         "green background"),
    # one defect each:
    Item("brick.jpg", "brick", "ok"),  # caption too short
    Item("gravel.jpg", "gravel", None),  # no caption file
]

FOLDER_VARIANTS: list[Item] = [
    Item("astronaut_half.jpg", "astronaut",
         "Half-size copy of the portrait of astronaut Eileen Collins in an orange launch suit, "
         "with the American flag behind her",
         transform=scale(0.5), derived="resized to half size", derived_from="astronaut.jpg"),
    Item("chelsea_q40.jpg", "chelsea",
         "Heavily compressed JPEG of a tabby cat's face with green eyes and long whiskers",
         quality=40, derived="re-encoded as JPEG quality 40", derived_from="chelsea.jpg"),
    Item("coffee_gray.jpg", "coffee",
         "Black and white photo of an espresso cup and spoon on a saucer on a wooden table",
         transform=chain(fit(), gray), derived="converted to grayscale", derived_from="coffee.jpg"),
    Item("china_pagoda.jpg", "sklearn:china.jpg",
         "Cropped view of a red and green Chinese pagoda with several tiers of upturned eaves "
         "against a pale sky",
         transform=crop((180, 0, 460, 427)), derived="cropped to the pagoda", derived_from="china.jpg"),
]

FOLDER_TINY = Item("flower_tiny.jpg", "sklearn:flower.jpg",
                   "An orange dahlia bloom against dark green leaves, as a tiny thumbnail",
                   transform=resize_to(12, 9), derived="downscaled to 12x9", derived_from="flower.webp")
FOLDER_ELONGATED = Item("retina_band.jpg", "retina",
                        "A thin horizontal strip cut across a photograph of a human retina, orange "
                        "with red blood vessels",
                        transform=crop((105, 680, 1305, 740)), derived="a 1200x60 strip of the original",
                        derived_from="retina.jpg")
# Byte-identical copy of DUP_OF under another name, with its own caption. Its name sorts after the
# original's, so a dedup pass that keeps the first id keeps the original.
FOLDER_DUPLICATE = ("espresso_cup.jpg", "coffee.jpg",
                    "Espresso with crema in a white-rimmed red cup next to a silver spoon, on a "
                    "wooden cafe table")
# The first 300 bytes of CORRUPT_OF saved under another name: not a decodable image.
FOLDER_CORRUPT = ("broken.jpg", "camera.jpg", 300,
                  "A photographer filming with a camera on a tripod in an open park")

# root/mapped: images + captions.jsonl (file, caption, license).
MAPPED: list[tuple[Item, str]] = [
    (Item("cell.png", "cell",
          "Quantitative phase image of a single round cell floating in saline, bright against a "
          "grey banded background"), "CC0-1.0"),
    (Item("clock.jpg", "clock",
          "Motion-blurred photo of a round wall clock against a plain light grey wall"),
     "public-domain"),
    (Item("phantom.png", "shepp_logan_phantom",
          "The Shepp-Logan phantom: grey ellipses inside a white oval outline on a black "
          "background, a standard test image for CT reconstruction"), "public-domain"),
    (Item("handwriting.webp", "text",
          "Grayscale photo, taken at a slant, of handwritten mathematical notes on a sheet of paper"),
     "public-domain"),
    (Item("motorcycle.jpg", "stereo_motorcycle",
          "A red motorcycle with a black seat parked on a concrete floor in a garage, with shelves "
          "of cardboard boxes behind it"), "unknown"),
    (Item("grass.jpg", "grass",
          "Grayscale close-up texture of dense, dry grass blades and small leaves"), "CC0-1.0"),
]
MAPPING_FILE = "captions.jsonl"
MAPPED_MALFORMED_AT = 3  # 0-based line index where the invalid JSON line goes
MAPPED_MALFORMED_LINE = '{"file": "moon_crop.jpg", "caption": "Craters on the moon", "license": CC0-1.0'
MAPPED_MISSING = {"file": "lighthouse.jpg",
                  "caption": "A white lighthouse on a rocky coast under a cloudy evening sky",
                  "license": "CC0-1.0"}

# root/wds: img2dataset layout; 10,000 samples per shard -> keys are shard (5) + index (4 digits).
WDS_SHARDS: list[list[Item | tuple[str, str]]] = [
    [
        Item("coins.jpg", "coins",
             "Grayscale photo of rows of ancient Greek coins from Pompeii laid out on a dark background"),
        Item("immunohistochemistry.jpg", "immunohistochemistry",
             "Micrograph of colon tissue with immunohistochemical staining: brown-stained glands "
             "surrounded by blue hematoxylin-stained cells"),
        Item("checkerboard.jpg", "checkerboard",
             "A black and white checkerboard pattern of square tiles"),
        Item("hubble_detail.jpg", "hubble_deep_field",
             "Detail of a deep field image from the Hubble telescope: scattered galaxies and a few "
             "bright stars with diffraction spikes on black sky",
             transform=crop((560, 440, 1000, 872)), derived="a full-resolution crop of the original",
             derived_from="hubble_deep_field.jpg"),
    ],
    [
        Item("optic_disc.jpg", "retina",
             "Close-up of the optic disc of a human retina, a pale yellow spot where red blood "
             "vessels converge",
             transform=crop((60, 480, 460, 880)), derived="a full-resolution crop of the original",
             derived_from="retina.jpg"),
        Item("campus_skyline.jpg", "camera",
             "Black and white view across an open lawn to a tall narrow tower topped by a radar dome, "
             "a domed auditorium and low buildings",
             transform=crop((340, 40, 512, 250)), derived="a crop of the original's background",
             derived_from="camera.jpg"),
        # a sample whose image member is missing
        ("harbour", "Sailboats moored in a small harbour at sunrise"),
    ],
]
WDS_SAMPLES_PER_SHARD = 10_000


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def _render(images: DemoImages, item: Item) -> tuple[bytes, Image.Image, tuple[int, int]] | None:
    original = images.get(item.src)
    if original is None:
        return None
    im = item.transform(original)
    return encode(im, item.fmt, item.quality), im, original.size


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    add_member(tar, name, data, mtime=TAR_MTIME)


def _json_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _build_folder(root: Path, images: DemoImages) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    folder = root / "folder"
    folder.mkdir(parents=True)
    written: dict[str, bytes] = {}
    bad: list[dict[str, Any]] = []
    related: list[dict[str, Any]] = []

    def write(name: str, data: bytes, caption: str | None) -> None:
        (folder / name).write_bytes(data)
        if caption is not None:
            (folder / f"{Path(name).stem}.txt").write_text(caption, encoding="utf-8")
        written[name] = data

    def relate(item: Item) -> None:
        if item.derived_from:
            related.append({"path": f"folder/{item.name}", "derived_from": f"folder/{item.derived_from}",
                            "how": item.derived})

    for item in FOLDER_BASE + FOLDER_VARIANTS:
        out = _render(images, item)
        if out is None:
            continue
        write(item.name, out[0], item.caption)
        relate(item)
        if item.caption is None:
            bad.append({"source": "folder", "path": f"folder/{item.name}", "reason": NO_CAPTION,
                        "detail": "no sidecar caption file"})
        elif item.caption.strip() == "ok":
            bad.append({"source": "folder", "path": f"folder/{item.name}", "reason": CAPTION_TOO_SHORT,
                        "detail": f"caption {item.caption!r} ({len(item.caption)} chars)"})

    tiny = _render(images, FOLDER_TINY)
    if tiny is not None:
        write(FOLDER_TINY.name, tiny[0], FOLDER_TINY.caption)
        relate(FOLDER_TINY)
        bad.append({"source": "folder", "path": f"folder/{FOLDER_TINY.name}", "reason": IMAGE_TOO_SMALL,
                    "detail": "%dx%d pixels" % tiny[1].size})
    band = _render(images, FOLDER_ELONGATED)
    if band is not None:
        write(FOLDER_ELONGATED.name, band[0], FOLDER_ELONGATED.caption)
        relate(FOLDER_ELONGATED)
        w, h = band[1].size
        bad.append({"source": "folder", "path": f"folder/{FOLDER_ELONGATED.name}", "reason": ASPECT_RATIO,
                    "detail": f"{w}x{h} pixels, aspect {w / h:g}"})

    dup_name, dup_of, dup_caption = FOLDER_DUPLICATE
    if dup_of in written:
        write(dup_name, written[dup_of], dup_caption)
        bad.append({"source": "folder", "path": f"folder/{dup_name}", "reason": DUPLICATE,
                    "detail": "byte-identical copy", "duplicate_of": f"folder/{dup_of}"})

    bad_name, bad_of, nbytes, bad_caption = FOLDER_CORRUPT
    if bad_of in written:
        write(bad_name, written[bad_of][:nbytes], bad_caption)
        bad.append({"source": "folder", "path": f"folder/{bad_name}", "reason": DECODE_ERROR,
                    "detail": f"the first {nbytes} bytes of folder/{bad_of}"})

    names = sorted(written)
    return {
        "path": str(folder),
        "layout": "image folder, NAME.ext with caption NAME.txt (UTF-8, no trailing newline)",
        "images": len(names),
        "captions": sum(1 for p in folder.glob("*.txt")),
        "files": [f"folder/{n}" for n in names],
        "expected_inputs": len(names),
        "expected_kept": len(names) - len(bad),
    }, bad, related


def _build_mapped(root: Path, images: DemoImages) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    mapped = root / "mapped"
    mapped.mkdir(parents=True)
    rows: list[str] = []
    files: list[str] = []
    for item, license_ in MAPPED:
        out = _render(images, item)
        if out is None:
            continue
        (mapped / item.name).write_bytes(out[0])
        files.append(f"mapped/{item.name}")
        rows.append(_json_line({"file": item.name, "caption": item.caption, "license": license_}))
    bad: list[dict[str, Any]] = []
    at = min(MAPPED_MALFORMED_AT, len(rows))
    rows.insert(at, MAPPED_MALFORMED_LINE)
    rows.append(_json_line(MAPPED_MISSING))
    bad.append({"source": "mapped", "path": f"mapped/{MAPPING_FILE}", "line": at + 1,
                "reason": MALFORMED_ROW, "detail": "invalid JSON"})
    bad.append({"source": "mapped", "path": f"mapped/{MAPPING_FILE}", "line": len(rows),
                "reason": MISSING_IMAGE, "detail": f"names {MAPPED_MISSING['file']}, which does not exist"})
    (mapped / MAPPING_FILE).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return {
        "path": str(mapped),
        "mapping": str(mapped / MAPPING_FILE),
        "layout": "images + captions.jsonl, one JSON object per line: file, caption, license",
        "images": len(files),
        "rows": len(rows),
        "files": sorted(files),
        "expected_inputs": len(rows),
        "expected_kept": len(rows) - len(bad),
    }, bad


def _build_wds(root: Path, images: DemoImages) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    wds = root / "wds"
    wds.mkdir(parents=True)
    shards: list[str] = []
    samples = 0
    bad: list[dict[str, Any]] = []
    related: list[dict[str, Any]] = []
    for shard_id, entries in enumerate(WDS_SHARDS):
        tar_name = f"{shard_id:05d}.tar"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            index = 0
            for entry in entries:
                key = f"{shard_id:05d}{index:04d}"
                if isinstance(entry, Item):
                    out = _render(images, entry)
                    if out is None:
                        continue
                    data, im, (ow, oh) = out
                    url = f"{URL_BASE}/images/{entry.name}"
                    meta = {"url": url, "caption": entry.caption, "key": key, "status": "success",
                            "error_message": None, "width": im.size[0], "height": im.size[1],
                            "original_width": ow, "original_height": oh, "exif": "{}",
                            "sha256": hashlib.sha256(data).hexdigest()}
                    _tar_add(tar, f"{key}.jpg", data)
                    if entry.derived_from:
                        related.append({"path": f"wds/{tar_name}#{key}",
                                        "derived_from": f"folder/{entry.derived_from}", "how": entry.derived})
                    caption = entry.caption or ""
                else:  # an image-less sample: only .txt and .json reach the tar
                    name, caption = entry
                    url = f"{URL_BASE}/images/{name}.jpg"
                    meta = {"url": url, "caption": caption, "key": key, "status": "success",
                            "error_message": None, "width": None, "height": None,
                            "original_width": None, "original_height": None, "exif": "{}", "sha256": None}
                    bad.append({"source": "wds", "path": f"wds/{tar_name}", "key": key,
                                "reason": MISSING_IMAGE, "detail": "sample has .txt and .json but no image member"})
                _tar_add(tar, f"{key}.txt", caption.encode("utf-8"))
                _tar_add(tar, f"{key}.json", json.dumps(meta, indent=4).encode("utf-8"))
                index += 1
                samples += 1
        (wds / tar_name).write_bytes(buf.getvalue())
        shards.append(str(wds / tar_name))
    return {
        "path": str(wds),
        "layout": "img2dataset WebDataset tars: KEY.jpg KEY.txt KEY.json, keys shard(5)+index(4)",
        "shards": shards,
        "samples": samples,
        "expected_inputs": samples,
        "expected_kept": samples - len(bad),
    }, bad, related


def build_demo_inputs(root: Path) -> dict[str, Any]:
    """(Re)create the demo corpus under `root`; return what was built and what should be dropped.

    Only `root/folder`, `root/mapped` and `root/wds` are replaced; anything else under `root` is
    left alone. Returns::

        {"root": str,
         "sources": {"folder": {..., "expected_inputs", "expected_kept"},
                     "mapped": {...}, "wds": {...}},
         "expected_inputs": int, "expected_kept": int,
         "expected_drops": {reason: count},
         "bad": [{"source", "path", "reason", "detail", ...}],   # one entry per bad input
         "related": [{"path", "derived_from", "how"}],            # variants and crops (near-duplicates)
         "good_images": {"min_side": int, "max_aspect": float, "min_caption_chars": int}}

    `expected_kept` assumes the stages drop only the bad inputs: a recipe whose thresholds are
    inside `good_images` bounds and no near-duplicate pass (the `related` items are resized,
    re-encoded, grayscale or cropped versions of other images).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("folder", "mapped", "wds"):
        if (root / sub).exists():
            shutil.rmtree(root / sub)
    images = DemoImages()
    folder, folder_bad, folder_related = _build_folder(root, images)
    mapped, mapped_bad = _build_mapped(root, images)
    wds, wds_bad, wds_related = _build_wds(root, images)
    bad = folder_bad + mapped_bad + wds_bad
    sources = {"folder": folder, "mapped": mapped, "wds": wds}
    drops: dict[str, int] = {}
    for b in bad:
        drops[b["reason"]] = drops.get(b["reason"], 0) + 1
    return {
        "root": str(root),
        "sources": sources,
        "expected_inputs": sum(s["expected_inputs"] for s in sources.values()),
        "expected_kept": sum(s["expected_kept"] for s in sources.values()),
        "expected_drops": dict(sorted(drops.items())),
        "bad": bad,
        "related": folder_related + wds_related,
        "good_images": _good_bounds(root, bad),
    }


def _good_bounds(root: Path, bad: list[dict[str, Any]]) -> dict[str, Any]:
    """Size, aspect and caption-length bounds of the good samples: thresholds inside them keep all."""
    bad_paths = {b["path"] for b in bad if "line" not in b and "key" not in b}
    sizes: list[tuple[int, int]] = []
    captions: list[str] = []
    for path in sorted((root / "folder").iterdir()):
        rel = f"folder/{path.name}"
        if path.suffix == ".txt" or rel in bad_paths:
            continue
        with Image.open(path) as im:
            sizes.append(im.size)
        captions.append((path.with_suffix(".txt")).read_text(encoding="utf-8").strip())
    for line in (root / "mapped" / MAPPING_FILE).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (root / "mapped" / row["file"]).is_file():
            with Image.open(root / "mapped" / row["file"]) as im:
                sizes.append(im.size)
            captions.append(row["caption"])
    for tar_path in sorted((root / "wds").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    if meta["width"] is not None:
                        sizes.append((meta["width"], meta["height"]))
                        captions.append(meta["caption"])
    return {
        "min_side": min(min(s) for s in sizes),
        "max_side": max(max(s) for s in sizes),
        "max_aspect": round(max(max(w, h) / min(w, h) for w, h in sizes), 3),
        "min_caption_chars": min(len(c) for c in captions),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tools.demo.data ROOT", file=sys.stderr)
        return 2
    print(json.dumps(build_demo_inputs(Path(argv[0])), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
