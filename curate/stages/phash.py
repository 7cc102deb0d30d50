"""`phash`: perceptual hashes of images.

`phash` (a RowStage) adds `image_phash` (int64): a 64-bit DCT perceptual hash of the row's image,
stored as a signed integer (the same 64 bits; Arrow and pandas have no unsigned hash type that
survives every join). Two images that look alike have hashes a few bits apart, whatever their
encoding or size; unrelated images differ in about 32 of the 64 bits.

The hash, computed here with Pillow and numpy only:
1. decode (a JPEG at a reduced DCT scale, at least 64 px a side: the result is 32 px anyway),
   convert as the image stage does (8-bit RGB, alpha composited on white, EXIF orientation
   applied), then to luma (`L`);
2. resize to 32 x 32 with Lanczos (fixed: the filter is part of the hash's definition);
3. 2-D DCT-II of the 32 x 32 block with an orthonormal DCT matrix (D @ X @ D.T);
4. take the 64 lowest-frequency AC coefficients in JPEG's zig-zag order (the DC term, the mean
   brightness, is left out: it carries no structure and would be a constant bit), rounded to
   1e-4 so that rounding noise of the matrix product cannot flip a bit on a flat image;
5. bit i (most significant first) = coefficient i > the median of the 64. A flat image hashes
   to 0.

With `flip_invariant`, the hash is the smaller (as unsigned 64-bit) of the image's and its
horizontal mirror's. The mirror's coefficients are the image's with odd horizontal frequencies
negated, so no second resize is needed.

Why these choices: low frequencies survive re-encoding and rescaling; the median makes the bits
balanced (half ones) and independent of brightness and contrast; dropping DC keeps 64 useful bits.
The ground truth in tests/curate/stages/test_phash.py measures what this buys.

A doc's images are hashed one by one, each hash into its image's segment (`"image_phash": ...`,
in KEY.json too), an image that fails removing its segment (curate/stages/doc_images.py); the
doc's own `image_phash` is 0. Contract of `phash`, for each live pair:
- reads `image` (any format Pillow decodes; grayscale, CMYK, palette, alpha and tiny images all
  hash), sets `image_phash`;
- or drops the row: `missing_image` (no bytes), `decode_error` (bytes that do not decode,
  never an exception), `too_many_pixels` (over `max_pixels` by the header, or a Pillow
  decompression bomb), `unsupported_format` (a pixel mode with no RGB conversion, such as LAB).
  Those codes and their meaning are the image stage's.
Dropped rows (here or earlier) get `image_phash` 0, never null: see `PhashStage.process` for why.

The `near_dedup` stage that dedupes on these hashes is in curate/stages/near_dedup.py.
"""

from __future__ import annotations

import io
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from pydantic import Field

from curate.documents import table_kind
from curate.stages.doc_images import score_doc_images
from curate.stages.base import Drop, RowStage, StageConfig, register
from curate.stages.image import (
    DECODE_ERROR,
    MISSING_IMAGE,
    TOO_MANY_PIXELS,
    UNSUPPORTED_FORMAT,
    describe_decode_error,
    oriented_rgb,
)

HASH_SIZE = 32  # pixels a side before the DCT
BITS = 64
DEFAULT_MAX_DISTANCE = 4  # of 64 bits: re-encodes and resizes land within it, unrelated images ~32 apart
DEFAULT_MAX_PIXELS = 8192 * 8192  # as the image stage's default
_DRAFT_SIDE = 2 * HASH_SIZE


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix D (n x n): D @ x is the DCT of a column vector x, and
    D @ X @ D.T the 2-D DCT of a block X. Row k is frequency k."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def zigzag(n: int) -> list[tuple[int, int]]:
    """JPEG's zig-zag scan of an n x n block as (vertical, horizontal) frequency pairs: by
    diagonal, alternating direction, starting (0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2)..."""
    order = []
    for s in range(2 * n - 1):
        diagonal = [(i, s - i) for i in range(n) if 0 <= s - i < n]
        order += diagonal if s % 2 else diagonal[::-1]
    return order


_DCT = dct_matrix(HASH_SIZE)
_LOW = zigzag(HASH_SIZE)[1 : BITS + 1]  # the 64 lowest AC frequencies
_ROWS = np.array([u for u, _ in _LOW])
_COLS = np.array([v for _, v in _LOW])
_MIRROR = np.where(_COLS % 2 == 1, -1.0, 1.0)  # a horizontal mirror negates odd horizontal frequencies
_WEIGHTS = (np.uint64(1) << np.arange(BITS - 1, -1, -1, dtype=np.uint64))


def _bits_to_int(bits: np.ndarray) -> int:
    """64 booleans (most significant first) -> the signed int64 holding those bits."""
    value = int(np.sum(_WEIGHTS[bits], dtype=np.uint64))
    return value - (1 << BITS) if value >= 1 << (BITS - 1) else value


def _median_bits(values: np.ndarray) -> np.ndarray:
    return values > np.median(values)


def phash_luma(luma: np.ndarray, flip_invariant: bool = False) -> int:
    """The hash (signed int64) of a 32 x 32 luma block (steps 3-5 of the module docstring)."""
    block = np.asarray(luma, dtype=np.float64)
    if block.shape != (HASH_SIZE, HASH_SIZE):
        raise ValueError(f"expected a {HASH_SIZE}x{HASH_SIZE} block, got {block.shape}")
    coeffs = np.round(_DCT @ block @ _DCT.T, 4)[_ROWS, _COLS]
    h = _bits_to_int(_median_bits(coeffs))
    if flip_invariant:
        mirrored = _bits_to_int(_median_bits(coeffs * _MIRROR))
        h = min(h, mirrored, key=lambda v: v & ((1 << BITS) - 1))  # the smaller as unsigned
    return h


def phash_image(img: Image.Image, flip_invariant: bool = False) -> int:
    """The hash of decoded pixels (steps 2-5 of the module docstring): any mode Pillow converts
    to `L`; `phash_bytes` first normalises as the image stage does."""
    luma = img.convert("L").resize((HASH_SIZE, HASH_SIZE), Image.Resampling.LANCZOS)
    return phash_luma(np.asarray(luma), flip_invariant)


def phash_bytes(data: bytes, flip_invariant: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> int | Drop:
    """The hash of encoded image bytes, or a `Drop` when the bytes are not a usable image
    (`decode_error`, `too_many_pixels`). Untrusted bytes: the size is checked on the header
    before any pixel is decoded; only a bug of ours raises."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        return Drop(TOO_MANY_PIXELS, str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure to parse untrusted bytes is a decode error
        return Drop(DECODE_ERROR, describe_decode_error(exc, data))
    with img:
        width, height = img.size
        if width < 1 or height < 1:
            return Drop(DECODE_ERROR, f"empty image {width}x{height}")
        if width * height > max_pixels:
            return Drop(TOO_MANY_PIXELS, f"{width}x{height} > max_pixels {max_pixels}")
        try:
            if img.format == "JPEG":
                img.draft(None, (_DRAFT_SIDE, _DRAFT_SIDE))
            img.load()  # the first frame of an animation
        except Image.DecompressionBombError as exc:  # a frame or tile bigger than the header said
            return Drop(TOO_MANY_PIXELS, str(exc))
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data, whatever Pillow raises
            return Drop(DECODE_ERROR, describe_decode_error(exc, data))
        try:
            pixels = oriented_rgb(img)
        except ValueError as exc:  # a mode Pillow cannot convert to RGB (LAB, HSV, multiband TIFF)
            return Drop(UNSUPPORTED_FORMAT, f"{(img.format or 'unknown').lower()} in mode {img.mode}: {exc}")
        return phash_image(pixels, flip_invariant)


class PhashConfig(StageConfig):
    kind: Literal["phash"] = "phash"
    # Hash an image and its mirror alike (min of the two), so a flipped copy is a duplicate too.
    flip_invariant: bool = False
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)


@register
class PhashStage(RowStage):
    """Adds `image_phash` (see the module docstring for the hash and the drops)."""

    name = "phash"
    Config = PhashConfig
    config: PhashConfig
    kinds = ("pair", "doc")
    output_columns: ClassVar[dict[str, pa.DataType]] = {"image_phash": pa.int64()}

    def process_row(self, row: dict[str, Any]) -> Drop | None:
        data = row.get("image")
        if not data:
            return Drop(MISSING_IMAGE, "no image bytes")
        result = phash_bytes(bytes(data), self.config.flip_invariant, self.config.max_pixels)
        if isinstance(result, Drop):
            return result
        row["image_phash"] = result
        return None

    def process(self, table: pa.Table) -> pa.Table:
        """As RowStage's, then 0 in `image_phash` for the rows that carry no hash (dropped here or
        before). Why: pandas reads an int64 column holding nulls as float64, which keeps 53 bits,
        and the runner reads a global stage's input with pandas (`curate.engine.driver.read_live`), so one
        null in a partition file would round every hash in it and near_dedup would compare
        garbage. Dropped rows never reach a global stage, a sidecar or the ledger's columns: the 0
        is never read."""
        if table_kind(table.schema) == "doc":  # each image's hash into its segment (near_dedup's docs)
            out = score_doc_images(table, self, super().process, {"image_phash": "none"})
        else:
            out = super().process(table)
        i = out.schema.get_field_index("image_phash")
        return out.set_column(i, out.schema.field(i), pc.fill_null(out.column(i), 0))
