"""PNGs decoded by libspng (pyspng) in the image stage: the same pixels as Pillow's decode after
the stage's mode conversion, for every bit depth and colour type, and Pillow wherever libspng's
answer could differ (transparency keys, APNG, EXIF/XMP orientation, corrupt bodies)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

import curate.stages.image as image_module
from curate.stages.image import ImageConfig, _decode_png, to_rgb, transform_image

# Adam7: (x0, y0, dx, dy) of each pass
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def scanlines(samples: np.ndarray, bit_depth: int) -> bytes:
    """Rows of `samples` (height x width x channels) packed at `bit_depth`, each behind filter 0."""
    height, width = samples.shape[:2]
    if bit_depth < 8:  # one channel, several samples a byte, most significant first
        per_byte = 8 // bit_depth
        padded = np.zeros((height, -(-width // per_byte) * per_byte), np.uint8)
        padded[:, :width] = samples.reshape(height, width)
        groups = padded.reshape(height, -1, per_byte)
        packed = sum(groups[:, :, k] << (8 - bit_depth * (k + 1)) for k in range(per_byte)).astype(np.uint8)
        rows = [row.tobytes() for row in packed]
    else:
        dtype = ">u2" if bit_depth == 16 else np.uint8
        rows = [row.astype(dtype).tobytes() for row in samples.reshape(height, -1)]
    return b"".join(b"\0" + row for row in rows)


def write_png(samples: np.ndarray, bit_depth: int, color_type: int, *, palette: bytes | None = None,
              extra: tuple[tuple[bytes, bytes], ...] = (), interlace: bool = False) -> bytes:
    """A PNG of any bit depth and colour type (Pillow writes neither 16-bit colour nor Adam7)."""
    height, width = samples.shape[:2]
    if interlace:
        passes = [samples[y0::dy, x0::dx] for x0, y0, dx, dy in _ADAM7]
        raw = b"".join(scanlines(p, bit_depth) for p in passes if p.size)
    else:
        raw = scanlines(samples, bit_depth)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, int(interlace))
    body = chunk(b"IHDR", ihdr) + (chunk(b"PLTE", palette) if palette is not None else b"")
    body += b"".join(chunk(kind, data) for kind, data in extra)
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def pillow_save(img: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pictures() -> dict[str, np.ndarray]:
    rgb = skdata.astronaut()[::4, ::4]  # 128 x 128
    grey = skdata.camera()[::4, ::4]
    ramp = np.tile((np.arange(128) * 2).astype(np.uint8), (128, 1))  # every alpha from 0 to 254
    noise = np.random.default_rng(0).integers(0, 257, rgb.shape).astype(np.uint16)
    return {"rgb": rgb, "rgb16": rgb.astype(np.uint16) * 257 + noise, "grey": grey, "alpha": ramp}


def png_cases(p: dict[str, np.ndarray]) -> dict[str, bytes]:
    rgb, rgb16, grey, alpha = p["rgb"], p["rgb16"], p["grey"], p["alpha"].astype(np.uint16)
    cases = {
        "rgb8": write_png(rgb, 8, 2),
        "rgb16": write_png(rgb16, 16, 2),
        "rgb8_adam7": write_png(rgb, 8, 2, interlace=True),
        "rgba8": write_png(np.dstack([rgb, alpha]), 8, 6),
        "rgba16": write_png(np.dstack([rgb16, alpha * 257 + 3]), 16, 6),
        "grey8": write_png(grey, 8, 0),
        "grey16": write_png(grey.astype(np.uint16) * 257 + 99, 16, 0),
        "grey4": write_png(grey >> 4, 4, 0),
        "grey2_adam7": write_png(grey >> 6, 2, 0, interlace=True),
        "grey1": write_png(grey >> 7, 1, 0),
        "grey_alpha8": write_png(np.dstack([grey, alpha]), 8, 4),
        "grey_alpha16": write_png(np.dstack([grey.astype(np.uint16) * 257 + 7, alpha * 257]), 16, 4),
        "pillow_rgb": pillow_save(Image.fromarray(rgb)),
        "pillow_palette": pillow_save(Image.fromarray(rgb).quantize(256)),
        "pillow_1bit": pillow_save(Image.fromarray(grey).convert("1")),
    }
    for bits in (1, 2, 4, 8):
        quantized = Image.fromarray(rgb).quantize(2**bits)
        palette = bytes(quantized.getpalette()[: 3 * 2**bits])
        cases[f"palette{bits}"] = write_png(np.asarray(quantized), bits, 3, palette=palette)
    return cases


def pillow_pixels(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.load()
    return np.asarray(to_rgb(img))


def test_every_bit_depth_and_colour_type_decodes_as_pillow_does(pictures):
    for name, data in png_cases(pictures).items():
        decoded = _decode_png(Image.open(io.BytesIO(data)), data)
        assert decoded is not None, f"{name}: libspng was not used"
        assert np.array_equal(np.asarray(to_rgb(decoded)), pillow_pixels(data)), name


def pillow_only(monkeypatch, data: bytes, config: ImageConfig):
    with monkeypatch.context() as m:
        m.setattr(image_module, "_decode_png", lambda img, data: None)
        return transform_image(data, config)


@pytest.mark.parametrize("output", ["jpg", "png"])
def test_stage_output_is_the_same_bytes(pictures, monkeypatch, output):
    config = ImageConfig(format=output, image_size=64)
    cases = png_cases(pictures)
    for name in ("rgb8", "rgba16", "grey16", "palette4", "grey_alpha8"):
        ours = transform_image(cases[name], config)
        assert ours == pillow_only(monkeypatch, cases[name], config), name


def exif(orientation: int) -> bytes:
    """A big-endian TIFF header with one IFD entry: Orientation."""
    return b"MM\x00*" + struct.pack(">IHHHIHHI", 8, 1, 0x0112, 3, 1, orientation, 0, 0)


def xmp(orientation: int) -> bytes:
    packet = f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="{orientation}"/></x:xmpmeta>'
    return b"XML:com.adobe.xmp\0\0\0\0\0" + packet.encode()


def test_pillow_decodes_what_libspng_could_get_wrong(pictures, monkeypatch):
    rgb = pictures["rgb"]
    palette_img = Image.fromarray(rgb).quantize(16)
    palette = bytes(palette_img.getpalette()[:48])
    text_exif = b"Raw profile type exif\0\nexif\n" + b"%8d\n" % len(exif(6)) + exif(6).hex().encode() + b"\n"
    cases = {
        "palette alpha (tRNS)": write_png(np.asarray(palette_img), 8, 3, palette=palette,
                                          extra=((b"tRNS", bytes(range(0, 256, 16))),)),
        "colour key (tRNS)": write_png(rgb, 8, 2, extra=((b"tRNS", struct.pack(">HHH", *rgb[0, 0])),)),
        "eXIf orientation": write_png(rgb, 8, 2, extra=((b"eXIf", exif(6)),)),
        "XMP orientation": write_png(rgb, 8, 2, extra=((b"iTXt", xmp(8)),)),
        "EXIF in a text chunk": write_png(rgb, 8, 2, extra=((b"tEXt", text_exif),)),
        "APNG": pillow_save(Image.fromarray(rgb), save_all=True,
                            append_images=[Image.fromarray(rgb[::-1])], default_image=False),
    }
    config = ImageConfig(image_size=64)
    for name, data in cases.items():
        assert _decode_png(Image.open(io.BytesIO(data)), data) is None, name
        assert transform_image(data, config) == pillow_only(monkeypatch, data, config), name
    rotated = transform_image(cases["eXIf orientation"], config)
    assert (rotated.size, rotated.original_size) == ((64, 64), (128, 128))  # square: compare pixels
    upright = transform_image(write_png(rgb, 8, 2), config)
    assert rotated.data != upright.data


def test_corrupt_bodies_end_as_pillow_says(pictures, monkeypatch):
    """libspng, as pyspng runs it, checks neither chunk CRCs nor the zlib checksum: a body with a
    flipped bit in its compressed pixels would decode to garbage. The CRC catches it and Pillow
    decides: the same drop with the same detail."""
    data = write_png(pictures["rgb"], 8, 2)
    idat = data.index(b"IDAT") + 4
    config = ImageConfig(image_size=64)
    outcomes = set()
    for offset in range(40, 400, 9):
        flipped = bytearray(data)
        flipped[idat + offset] ^= 0x10
        result = transform_image(bytes(flipped), config)
        assert result == pillow_only(monkeypatch, bytes(flipped), config), offset
        outcomes.add(type(result).__name__)
        truncated = data[: idat + offset]
        assert transform_image(truncated, config) == pillow_only(monkeypatch, truncated, config), offset
    assert "Drop" in outcomes  # the flips were seen as corrupt, not decoded into garbage
