"""The image stage: check that a pair's image decodes, then resize and re-encode it.

Besides the downloader that fetches them and face_blur (which blurs faces in place), this is the
only stage that rewrites image bytes. It runs first among the per-sample stages, so every later
stage sees small, uniform RGB images and their true original size.

Contract, for each live row:
- reads `image` (untrusted bytes) and ignores the incoming `image_format`: the format is what
  Pillow identifies from the bytes, never what a URL or a header claimed;
- sets `image`, `image_format` (jpg | png | webp), `image_sha256` (the digest of the new `image`),
  `image_nbytes`, `width` and `height` (of the output), `original_width` and `original_height`
  (of the input, after EXIF orientation);
- or drops the row with one of the codes below.

Safety: the pixel cap is checked on the header's dimensions before any pixel is decoded, and again
on the size the resize would produce (keep_ratio on a 1 x 10000 image would otherwise upscale it
into a bomb). Pillow's own DecompressionBombError, raised at open for images over twice
`PIL.Image.MAX_IMAGE_PIXELS`, is the same drop. Formats outside the allow-list are refused on the
header too, before their decoder runs.

Resize modes follow img2dataset (`img2dataset/resizer.py`):
- `no`: keep the size;
- `keep_ratio`: the smaller side becomes `image_size`;
- `keep_ratio_largest`: the larger side becomes `image_size`;
- `center_crop`: `keep_ratio`, then the central `image_size` square;
- `border`: `keep_ratio_largest`, then padded with white to an `image_size` square (centred).
With `resize_only_if_bigger`, an image whose governing side (the smaller one for keep_ratio and
center_crop, the larger one for the others) is not bigger than `image_size` is left as it is,
without crop or padding, as img2dataset does. Downscaling averages areas (img2dataset's "area"),
upscaling uses Lanczos (its default). The side that is not set to `image_size` is rounded to
nearest (img2dataset truncates, so it may differ by one pixel).

Decoding is Pillow's, except PNGs that libspng (pyspng) decodes to the same pixels twice as fast
(`_decode_png` says which). Output is deterministic for the same input bytes and the same Pillow
build: fixed filters and encoder settings, and no metadata carried (no EXIF, so no GPS position,
no ICC profile, no text chunks). Pixels are not colour-managed: an image tagged with a wide-gamut
ICC profile keeps its raw values, which is what a training loader decoding with Pillow sees anyway.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyspng
from PIL import Image, UnidentifiedImageError
from pydantic import Field, field_validator, model_validator

from curate.contract import image_digest
from curate.stages.base import Drop, RowStage, StageConfig, register

MISSING_IMAGE = "missing_image"
DECODE_ERROR = "decode_error"
TOO_MANY_PIXELS = "too_many_pixels"
UNSUPPORTED_FORMAT = "unsupported_format"

ResizeMode = Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
OutputFormat = Literal["jpg", "png", "webp"]

# Output extension -> (Pillow encoder, Pillow's name of the input format it matches, max side).
_ENCODERS: dict[str, tuple[str, str, int]] = {
    "jpg": ("JPEG", "jpeg", 65_535),
    "png": ("PNG", "png", 2**31 - 1),
    "webp": ("WEBP", "webp", 16_383),
}
# Pillow names camera JPEGs that carry extra pictures "MPO"; their first picture is a plain JPEG.
_FORMAT_ALIASES = {"mpo": "jpeg", "jpg": "jpeg", "tif": "tiff"}
# Pillow decodes EPS by running Ghostscript on the file: never on untrusted bytes.
_REFUSED_FORMATS = {"eps": "Pillow runs Ghostscript to decode EPS"}
_MODES_KEPT_AS_IS = ("RGB", "L")  # what may pass through unchanged when re-encoding is off
_WHITE = (255, 255, 255)
_MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class ImageConfig(StageConfig):
    """How images are checked, resized and encoded. Defaults suit CLIP/MM1-style pretraining data:
    the smaller side at 256 keeps the whole picture for the trainer's own crop."""

    kind: Literal["image"] = "image"
    resize_mode: ResizeMode = "keep_ratio"
    image_size: int = Field(256, ge=1)
    resize_only_if_bigger: bool = False
    format: OutputFormat = "jpg"
    # jpg and webp: quality 1..100 (default 95); png: zlib compression level 0..9 (default 6),
    # as in img2dataset where the same option means compression for png.
    quality: int | None = None
    # The cap on width x height, checked on the header before decoding. 8192 x 8192 (64 MiPx)
    # admits 48-50 MPx phone photos; decoding one costs pixels x bands bytes (192 MiB for RGB at the
    # cap) per image in flight, and stays under Pillow's own warning threshold (89.5 MPx). Pillow
    # refuses images over twice that (179 MPx) at open whatever this says; both are this drop.
    max_pixels: int = Field(8192 * 8192, ge=1)
    # Pillow format names (lowercase) accepted as input; anything else is `unsupported_format`.
    formats: tuple[str, ...] = ("jpeg", "png", "webp", "gif", "bmp", "tiff")
    # False keeps the input bytes when nothing would change: no resize, the input already in the
    # output format, RGB or grayscale, and no EXIF rotation to apply.
    reencode: bool = True
    exif_transpose: bool = True
    # Decode JPEGs at a reduced DCT scale (1/2, 1/4, 1/8) when downscaling: several times faster and
    # smaller in memory. Still deterministic; pixels differ slightly from a full decode.
    jpeg_draft: bool = True

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        Image.init()
        known = {name.lower() for name in Image.OPEN}
        names = []
        for name in formats:
            name = _FORMAT_ALIASES.get(name.lower(), name.lower())
            if name in _REFUSED_FORMATS:
                raise ValueError(f"format {name!r} is refused: {_REFUSED_FORMATS[name]}")
            if name not in known:
                raise ValueError(f"unknown image format {name!r}; Pillow reads {sorted(known)}")
            names.append(name)
        if not names:
            raise ValueError("formats must name at least one image format")
        return tuple(dict.fromkeys(names))

    @model_validator(mode="after")
    def _quality_in_range(self) -> ImageConfig:
        if self.quality is not None:
            low, high = (0, 9) if self.format == "png" else (1, 100)
            if not low <= self.quality <= high:
                what = "compression level" if self.format == "png" else "quality"
                raise ValueError(f"quality for {self.format} is a {what} in {low}..{high}, got {self.quality}")
        return self

    @property
    def encode_options(self) -> dict[str, Any]:
        """Pillow `save` options: fixed, so the same pixels always give the same bytes."""
        if self.format == "png":
            return {"compress_level": 6 if self.quality is None else self.quality}
        return {"quality": 95 if self.quality is None else self.quality}


# ---------------------------------------------------------------------------------------------
# Geometry: a pure plan from the input size, so sizes are checked before any pixel is decoded
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """What to do to a `width` x `height` image: resize to `resize`, then crop to `crop`
    (left, top, right, bottom) or paste centred on a white `pad` x `pad` canvas."""

    width: int
    height: int
    resize: tuple[int, int] | None = None
    crop: tuple[int, int, int, int] | None = None
    pad: int | None = None

    @property
    def resized(self) -> tuple[int, int]:
        return self.resize or (self.width, self.height)

    @property
    def output(self) -> tuple[int, int]:
        if self.crop:
            left, top, right, bottom = self.crop
            return right - left, bottom - top
        if self.pad:
            return self.pad, self.pad
        return self.resized

    @property
    def changes_pixels(self) -> bool:
        return self.resize is not None or self.crop is not None or self.pad is not None


def _fit(width: int, height: int, side: int, target: int) -> tuple[int, int]:
    """Scale so that the side of length `side` becomes `target`, the other rounded to nearest."""
    if width == side:
        return target, max(1, (2 * height * target + side) // (2 * side))
    return max(1, (2 * width * target + side) // (2 * side)), target


def plan_geometry(width: int, height: int, mode: str, size: int, only_if_bigger: bool) -> Geometry:
    """The resize/crop/pad plan for an image of `width` x `height` (img2dataset's semantics)."""
    if mode == "no":
        return Geometry(width, height)
    governing = min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height)
    if only_if_bigger and governing <= size:
        return Geometry(width, height)
    resized = _fit(width, height, governing, size)
    resize = resized if resized != (width, height) else None
    if mode == "center_crop":
        w, h = resized
        left, top = (w - size) // 2, (h - size) // 2
        crop = (left, top, left + size, top + size) if (w, h) != (size, size) else None
        return Geometry(width, height, resize, crop=crop)
    if mode == "border":
        return Geometry(width, height, resize, pad=size if resized != (size, size) else None)
    return Geometry(width, height, resize)


# ---------------------------------------------------------------------------------------------
# Decoding and pixel conversion
# ---------------------------------------------------------------------------------------------


def describe_decode_error(exc: BaseException, data: bytes) -> str:
    """An exception as a deterministic drop detail (no memory addresses; what the bytes look like
    when Pillow cannot tell, since an HTML error page served as an image is the common case)."""
    if isinstance(exc, UnidentifiedImageError):
        return f"cannot identify image; starts with {data[:24]!r}"
    return f"{type(exc).__name__}: {_MEMORY_ADDRESS.sub('', str(exc))}"


_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8); 1 when absent or unreadable, since a broken EXIF block is no
    reason to lose an image whose pixels decode."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - EXIF is untrusted; Pillow has raised on malformed blocks before
        return 1
    return value if value in _TRANSPOSE_FOR_ORIENTATION else 1


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any decoded mode: alpha composited on white (as img2dataset does), 16-bit
    scaled down (Pillow's own conversion would clip everything above 255 to white; 32-bit integer
    images are read as 16-bit, which is what PNG and TIFF hold in practice)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.clip(np.asarray(img), 0, 65_535).astype(np.uint16)
        img = Image.fromarray((values >> 8).astype(np.uint8))
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE + (255,)), rgba).convert("RGB")
    return img.convert("RGB")


def oriented_rgb(img: Image.Image, exif_transpose: bool = True) -> Image.Image:
    """The pixels of a loaded image as this stage sees them before resizing: 8-bit RGB (alpha on
    white, 16-bit scaled down), EXIF orientation applied. For stages that look at pixels of
    images the image stage may not have normalised (perceptual hashes of eval sets). Raises
    ValueError for a mode Pillow cannot convert to RGB."""
    pixels = to_rgb(img)
    orientation = _orientation(img) if exif_transpose else 1
    if orientation != 1:
        pixels = pixels.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
    return pixels


# PNGs decode through libspng (pyspng), about twice as fast as Pillow's decoder on photographs,
# wherever its pixels are the ones Pillow's decode gives after `to_rgb` (tests/curate/stages/
# test_image_png.py checks every bit depth and colour type): Pillow's rawmode -> libspng's output
# format. libspng expands palettes to RGB (what to_rgb does with a palette image), scales 1-, 2-
# and 4-bit grey to 0..255 as Pillow's unpackers do, and keeps the high byte of 16-bit samples;
# grey + alpha comes out as RGBA (libspng has no 8-bit grey + alpha output for it), composited on
# white as Pillow's LA is; 16-bit grey comes out as grey + alpha (None: libspng's own choice), of
# which the grey is kept at 16 bits for to_rgb to scale as it scales Pillow's.
_SPNG_FORMATS: dict[str, str | None] = {
    "1": "L", "L;2": "L", "L;4": "L", "L": "L", "I;16B": None,
    "RGB": "RGB", "RGB;16B": "RGB",
    "P;1": "RGB", "P;2": "RGB", "P;4": "RGB", "P": "RGB",
    "LA": "RGBA", "LA;16B": "RGBA",
    "RGBA": "RGBA", "RGBA;16B": "RGBA",
}
# Chunks after which Pillow must decode: APNG frames (Pillow picks the frame) and EXIF, and text
# chunks by the keywords Pillow reads an orientation from (getexif would decode the whole file).
_PILLOW_CHUNKS = frozenset({b"acTL", b"eXIf"})
_TEXT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt"})
_ORIENTATION_KEYWORDS = (b"Raw profile type exif\0", b"XML:com.adobe.xmp\0")


def _libspng_may_decode(data: bytes) -> bool:
    """Whether a PNG's chunks let libspng decode it: no animation, nothing Pillow reads an
    orientation from, and every whole chunk's CRC right. pyspng has libspng check neither the
    CRCs nor the zlib stream's checksum, so a body corrupted in transit, which Pillow refuses
    (the stream's checksum fails), would otherwise decode to garbage pixels; the CRCs catch it
    (0.3 ms per MiB). A truncated chunk list just ends the walk: libspng refuses a short image."""
    view, pos, end = memoryview(data), 8, len(data)
    while pos + 12 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind in _PILLOW_CHUNKS:
            return False
        if kind in _TEXT_CHUNKS and any(data.startswith(key, pos + 8) for key in _ORIENTATION_KEYWORDS):
            return False
        if pos + 12 + length > end:
            break
        if zlib.crc32(view[pos + 4 : pos + 8 + length]) != struct.unpack_from(">I", data, pos + 8 + length)[0]:
            return False
        if kind == b"IEND":
            break
        pos += 12 + length
    return True


def _decode_png(img: Image.Image, data: bytes) -> Image.Image | None:
    """A PNG's pixels from libspng, in a mode `to_rgb` turns into exactly the pixels it makes of
    Pillow's decode, orientation 1 (the file has none); None where Pillow must decode instead: a
    colour key or palette alpha (tRNS), APNG, EXIF or XMP, a bad CRC, or any libspng error (Pillow
    then says whether the file is broken, so drops and their details stay Pillow's)."""
    if len(img.tile) != 1 or "transparency" in img.info:
        return None
    rawmode = img.tile[0][3]  # (decoder, extents, offset, rawmode)
    if rawmode not in _SPNG_FORMATS or not _libspng_may_decode(data):
        return None
    try:
        pixels = pyspng.load(data, _SPNG_FORMATS[rawmode])
    except RuntimeError:  # libspng refuses it: Pillow decides
        return None
    if pixels.dtype == np.uint16:  # 16-bit grey, as grey + alpha
        pixels = pixels[:, :, 0]
    if pixels.shape[:2] != (img.height, img.width):
        return None
    return Image.fromarray(pixels)


def _apply(img: Image.Image, geometry: Geometry) -> Image.Image:
    if geometry.resize is not None:
        upscale = geometry.resize[0] > img.width
        resample = Image.Resampling.LANCZOS if upscale else Image.Resampling.BOX
        img = img.resize(geometry.resize, resample)
    if geometry.crop is not None:
        img = img.crop(geometry.crop)
    if geometry.pad is not None:
        canvas = Image.new("RGB", (geometry.pad, geometry.pad), _WHITE)
        canvas.paste(img, ((geometry.pad - img.width) // 2, (geometry.pad - img.height) // 2))
        img = canvas
    return img


@dataclass(frozen=True)
class Encoded:
    data: bytes
    format: str  # output extension: jpg, png, webp
    size: tuple[int, int]
    original_size: tuple[int, int]


def transform_image(data: bytes, config: ImageConfig) -> Encoded | Drop:
    """Check, decode, orient, convert, resize and encode one image; a `Drop` for bad input.

    Only failures caused by the input become drops; an error in our own code propagates, so the
    stage's error policy reports it as a `stage_error`.
    """
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        return Drop(TOO_MANY_PIXELS, str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure to parse untrusted bytes is a decode error
        return Drop(DECODE_ERROR, describe_decode_error(exc, data))
    with img:
        fmt = (img.format or "").lower()
        fmt = _FORMAT_ALIASES.get(fmt, fmt)
        if fmt not in config.formats:
            return Drop(UNSUPPORTED_FORMAT, fmt or "unknown")
        width, height = img.size
        if width < 1 or height < 1:
            return Drop(DECODE_ERROR, f"empty image {width}x{height}")
        if width * height > config.max_pixels:
            return Drop(TOO_MANY_PIXELS, f"{width}x{height} > max_pixels {config.max_pixels}")
        # Resize modes are symmetric in width and height, so planning on the stored (not yet
        # oriented) size checks the same pixel counts and gives the draft a safe lower bound.
        stored = plan_geometry(width, height, config.resize_mode, config.image_size, config.resize_only_if_bigger)
        if drop := _check_output(stored, config):
            return drop
        try:
            if config.jpeg_draft and fmt == "jpeg" and stored.resize and stored.resize[0] < width:
                img.draft(None, stored.resize)
            decoded = _decode_png(img, data) if fmt == "png" else None
            if decoded is None:
                img.load()  # the first frame of an animation
        except Image.DecompressionBombError as exc:  # a frame or tile bigger than the header said
            return Drop(TOO_MANY_PIXELS, str(exc))
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data, whatever Pillow raises
            return Drop(DECODE_ERROR, describe_decode_error(exc, data))
        # a PNG libspng decoded has no orientation (and Pillow's getexif would decode it again)
        orientation = _orientation(img) if config.exif_transpose and decoded is None else 1
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        geometry = plan_geometry(width, height, config.resize_mode, config.image_size, config.resize_only_if_bigger)
        ext = config.format
        encoder, same_input, _ = _ENCODERS[ext]
        if (
            not config.reencode
            and fmt == same_input
            and not geometry.changes_pixels
            and orientation == 1
            and img.mode in _MODES_KEPT_AS_IS
            and "transparency" not in img.info
        ):
            return Encoded(data, ext, (width, height), (width, height))
        try:
            pixels = to_rgb(img if decoded is None else decoded)
        except ValueError as exc:  # a mode Pillow cannot convert to RGB (LAB, HSV, multiband TIFF)
            return Drop(UNSUPPORTED_FORMAT, f"{fmt} in mode {img.mode}: {exc}")
        if orientation != 1:
            pixels = pixels.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
        out = _apply(pixels, geometry)
        out.info = {}  # carry no metadata: PNG would copy ICC, transparency and text from `info`
        buffer = io.BytesIO()
        out.save(buffer, format=encoder, **config.encode_options)
        return Encoded(buffer.getvalue(), ext, out.size, (width, height))


def _check_output(geometry: Geometry, config: ImageConfig) -> Drop | None:
    """The cap applies to what we would allocate, and the encoder must accept the output size."""
    for what, (w, h) in (("resized", geometry.resized), ("output", geometry.output)):
        if w * h > config.max_pixels:
            return Drop(TOO_MANY_PIXELS, f"{what} {w}x{h} > max_pixels {config.max_pixels}")
    limit = _ENCODERS[config.format][2]
    w, h = geometry.output
    if max(w, h) > limit:
        return Drop(TOO_MANY_PIXELS, f"output {w}x{h} over {config.format}'s limit of {limit} a side")
    return None


@register
class ImageStage(RowStage):
    """Decode check, resize and re-encode (see the module docstring for the contract)."""

    name = "image"
    kinds = ("pair", "doc")
    per_image = True  # on docs: each image, a failure removes its segment
    rewrites_image_digest = True  # process_row: of the bytes it keeps; drops the rest
    Config = ImageConfig

    def process_row(self, row: dict[str, Any]) -> Drop | None:
        data = row.get("image")
        if not data:
            return Drop(MISSING_IMAGE, "no image bytes")
        result = transform_image(bytes(data), self.config)
        if isinstance(result, Drop):
            return result
        row["image"] = result.data
        row["image_format"] = result.format
        row["image_sha256"] = image_digest(result.data)
        row["image_nbytes"] = len(result.data)
        row["width"], row["height"] = result.size
        row["original_width"], row["original_height"] = result.original_size
        return None
