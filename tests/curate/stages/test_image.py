"""The image stage on real pictures (scikit-image's bundled data) and on hostile bytes."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageFile
from pydantic import ValidationError
from skimage import data as skdata

from curate.contract import image_digest, record_schema
from curate.stages import STAGES, build_stage
from curate.stages.image import ImageConfig, ImageStage, plan_geometry

# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:  # 512 x 512 RGB
    return Image.fromarray(skdata.astronaut())


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:  # 451 x 300 RGB
    return Image.fromarray(skdata.chelsea())


@pytest.fixture(scope="module")
def coffee() -> Image.Image:  # 600 x 400 RGB
    return Image.fromarray(skdata.coffee())


@pytest.fixture(scope="module")
def camera() -> Image.Image:  # 512 x 512 grayscale
    return Image.fromarray(skdata.camera())


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose IHDR claims `width` x `height` RGB pixels, with one tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def run(stage: ImageStage, images: list[bytes | None]) -> list[dict]:
    rows = [
        {"id": f"test:{i}", "source": "test", "caption": "a caption", "image": image, "image_format": "jpg"}
        for i, image in enumerate(images)
    ]
    table = pa.Table.from_pylist(rows, schema=record_schema("pair"))
    out = stage.process(table)
    assert out.schema == record_schema("pair")
    return out.to_pylist()


def stage(**options) -> ImageStage:
    return build_stage(ImageConfig(**options))


def decoded(row: dict) -> Image.Image:
    img = Image.open(io.BytesIO(row["image"]))
    img.load()
    return img


def assert_kept(row: dict, size: tuple[int, int], original: tuple[int, int], fmt: str = "jpg") -> Image.Image:
    """A kept row satisfies the record contract: the digest and sizes describe the bytes now held."""
    assert row["drop_reason"] is None, row["drop_detail"]
    assert row["image_format"] == fmt
    assert row["image_sha256"] == image_digest(row["image"])
    assert row["image_nbytes"] == len(row["image"])
    assert (row["width"], row["height"]) == size
    assert (row["original_width"], row["original_height"]) == original
    img = decoded(row)
    assert img.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    assert img.size == size
    return img


# ---------------------------------------------------------------------------------------------
# Registry and config
# ---------------------------------------------------------------------------------------------


def test_registered_under_its_kind():
    assert STAGES["image"] is ImageStage
    assert isinstance(stage(), ImageStage)


def test_config_defaults():
    c = ImageConfig()
    assert (c.resize_mode, c.image_size, c.resize_only_if_bigger, c.format) == ("keep_ratio", 256, False, "jpg")
    assert c.encode_options == {"quality": 95}
    assert ImageConfig(format="png").encode_options == {"compress_level": 6}
    assert c.max_pixels == 8192 * 8192
    assert c.formats == ("jpeg", "png", "webp", "gif", "bmp", "tiff")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"format": "png", "quality": 95}, "compression level in 0..9"),
        ({"format": "jpg", "quality": 0}, "quality in 1..100"),
        ({"formats": ["eps"]}, "Ghostscript"),
        ({"formats": ["jpeg", "nonsense"]}, "unknown image format 'nonsense'"),
        ({"formats": []}, "at least one"),
        ({"resize_mode": "stretch"}, "resize_mode"),
        ({"image_size": 0}, "image_size"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"min_image_size": 10}, "min_image_size"),  # filters are separate stages
    ],
)
def test_bad_config_fails_at_load(options, message):
    with pytest.raises(ValidationError, match=message):
        ImageConfig(**options)


def test_format_aliases_normalised():
    assert ImageConfig(formats=["JPG", "tif", "jpeg"]).formats == ("jpeg", "tiff")


# ---------------------------------------------------------------------------------------------
# Geometry (img2dataset's semantics)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, size, expected",
    [
        ("keep_ratio", (512, 512), (256, 256)),
        ("keep_ratio", (400, 300), (341, 256)),  # the smaller side becomes image_size
        ("keep_ratio", (300, 400), (256, 341)),
        ("keep_ratio_largest", (400, 300), (256, 192)),  # the larger side becomes image_size
        ("keep_ratio_largest", (300, 400), (192, 256)),
        ("center_crop", (400, 300), (256, 256)),
        ("border", (400, 300), (256, 256)),
        ("no", (400, 300), (400, 300)),
        ("keep_ratio", (100, 50), (512, 256)),  # upscaled unless resize_only_if_bigger
    ],
)
def test_plan_output_sizes(mode, size, expected):
    assert plan_geometry(*size, mode, 256, only_if_bigger=False).output == expected


def test_plan_center_crop_and_border_boxes():
    crop = plan_geometry(400, 300, "center_crop", 256, False)
    assert crop.resize == (341, 256) and crop.crop == (42, 0, 298, 256)
    border = plan_geometry(400, 300, "border", 256, False)
    assert border.resize == (256, 192) and border.pad == 256


@pytest.mark.parametrize("mode", ["keep_ratio", "keep_ratio_largest", "center_crop", "border"])
def test_plan_only_if_bigger_leaves_small_images(mode):
    plan = plan_geometry(200, 100, mode, 256, only_if_bigger=True)
    assert not plan.changes_pixels and plan.output == (200, 100)


def test_plan_only_if_bigger_uses_the_governing_side():
    # keep_ratio looks at the smaller side (100 <= 256: untouched) even though 300 > 256
    assert plan_geometry(300, 100, "keep_ratio", 256, True).output == (300, 100)
    assert plan_geometry(300, 100, "keep_ratio_largest", 256, True).output == (256, 85)


# ---------------------------------------------------------------------------------------------
# Resize modes on real images
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("keep_ratio", (385, 256)),  # 451 x 300: 451 * 256 / 300 = 384.9
        ("keep_ratio_largest", (256, 170)),  # 300 * 256 / 451 = 170.3
        ("center_crop", (256, 256)),
        ("border", (256, 256)),
        ("no", (451, 300)),
    ],
)
def test_resize_modes(chelsea, mode, expected):
    (row,) = run(stage(resize_mode=mode), [encode(chelsea, "PNG")])
    assert_kept(row, expected, (451, 300))


def test_keep_ratio_on_400x300(coffee):
    image = encode(coffee.crop((0, 0, 400, 300)), "JPEG", quality=95)
    (ratio,) = run(stage(resize_mode="keep_ratio"), [image])
    (largest,) = run(stage(resize_mode="keep_ratio_largest"), [image])
    assert_kept(ratio, (341, 256), (400, 300))
    assert_kept(largest, (256, 192), (400, 300))


def test_border_pads_with_white(chelsea):
    (row,) = run(stage(resize_mode="border", format="png"), [encode(chelsea, "PNG")])
    pixels = np.asarray(assert_kept(row, (256, 256), (451, 300), "png"))
    # 170 rows of picture centred in 256: 43 white rows above, 43 below
    assert (pixels[:43] == 255).all() and (pixels[-43:] == 255).all()
    assert not (pixels[43:213] == 255).all()


def test_center_crop_takes_the_middle(coffee):
    (row,) = run(stage(resize_mode="center_crop", format="png"), [encode(coffee, "PNG")])
    out = np.asarray(assert_kept(row, (256, 256), (600, 400), "png"), dtype=np.int16)
    middle = np.asarray(coffee.resize((384, 256), Image.Resampling.BOX).crop((64, 0, 320, 256)), dtype=np.int16)
    assert np.abs(out - middle).mean() < 1


def test_resize_only_if_bigger(chelsea):
    image = encode(chelsea, "PNG")
    (kept,) = run(stage(image_size=512, resize_only_if_bigger=True), [image])
    (upscaled,) = run(stage(image_size=512), [image])
    assert_kept(kept, (451, 300), (451, 300))
    assert_kept(upscaled, (770, 512), (451, 300))


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_output_formats(astronaut, fmt):
    (row,) = run(stage(format=fmt), [encode(astronaut, "JPEG")])
    img = assert_kept(row, (256, 256), (512, 512), fmt)
    assert img.mode == "RGB" and not img.info.get("exif") and not img.info.get("icc_profile")


def test_content_survives(astronaut):
    """The output is the same picture: compare with a plain Pillow resize."""
    (row,) = run(stage(format="png"), [encode(astronaut, "PNG")])
    out = np.asarray(decoded(row), dtype=np.int16)
    reference = np.asarray(astronaut.resize((256, 256), Image.Resampling.BOX), dtype=np.int16)
    assert np.abs(out - reference).mean() < 1


def test_jpeg_draft_keeps_sizes_and_content(astronaut):
    big = encode(astronaut.resize((2048, 2048), Image.Resampling.LANCZOS), "JPEG", quality=95)
    (drafted,) = run(stage(format="png"), [big])
    (full,) = run(stage(format="png", jpeg_draft=False), [big])
    a = np.asarray(assert_kept(drafted, (256, 256), (2048, 2048), "png"), dtype=np.int16)
    b = np.asarray(assert_kept(full, (256, 256), (2048, 2048), "png"), dtype=np.int16)
    assert np.abs(a - b).mean() < 3


# ---------------------------------------------------------------------------------------------
# Modes and containers
# ---------------------------------------------------------------------------------------------


def test_grayscale_becomes_rgb(camera):
    (row,) = run(stage(format="png"), [encode(camera, "PNG")])
    img = assert_kept(row, (256, 256), (512, 512), "png")
    assert img.mode == "RGB"
    r, g, b = (np.asarray(c) for c in img.split())
    assert (r == g).all() and (g == b).all()


def test_cmyk_jpeg(coffee):
    image = encode(coffee.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(image)).mode == "CMYK"
    (row,) = run(stage(format="png", resize_mode="no"), [image])
    out = np.asarray(assert_kept(row, (600, 400), (600, 400), "png"), dtype=np.int16)
    assert np.abs(out - np.asarray(coffee, dtype=np.int16)).mean() < 6


def test_rgba_composited_on_white(astronaut):
    rgba = astronaut.convert("RGBA")
    alpha = np.full((512, 512), 255, dtype=np.uint8)
    alpha[:, :256] = 0  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    (row,) = run(stage(format="png", resize_mode="no"), [encode(rgba, "PNG")])
    out = np.asarray(assert_kept(row, (512, 512), (512, 512), "png"))
    assert (out[:, :256] == 255).all()
    assert (out[:, 256:] == np.asarray(astronaut)[:, 256:]).all()


def test_palette_gif_with_transparency(chelsea):
    palette = chelsea.quantize(colors=64)
    assert palette.mode == "P"
    pixels = np.asarray(palette).copy()
    transparent = int(pixels[0, 0])
    image = encode(palette, "GIF", transparency=transparent)
    (row,) = run(stage(format="png", resize_mode="no"), [image])
    out = np.asarray(assert_kept(row, (451, 300), (451, 300), "png"))
    assert (out[pixels == transparent] == 255).all()
    assert out.shape == (300, 451, 3)


def test_16_bit_png_scaled_not_clipped(camera):
    wide = np.asarray(camera).astype(np.uint16) * 257  # full 16-bit range
    image16 = encode(Image.fromarray(wide), "PNG")
    assert Image.open(io.BytesIO(image16)).mode == "I;16"
    (row,) = run(stage(format="png", resize_mode="no"), [image16])
    out = np.asarray(assert_kept(row, (512, 512), (512, 512), "png"))
    assert (out[..., 0] == np.asarray(camera)).all()  # v * 257 >> 8 == v


def test_1_bit_image(camera):
    bilevel = camera.convert("1")
    (row,) = run(stage(format="png", resize_mode="no"), [encode(bilevel, "PNG")])
    out = np.asarray(assert_kept(row, (512, 512), (512, 512), "png"))
    assert set(np.unique(out)) <= {0, 255}


def test_animated_gif_uses_the_first_frame(astronaut, chelsea):
    first = astronaut.resize((200, 200)).quantize(colors=128)
    second = chelsea.resize((200, 200)).quantize(colors=128)
    image = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(io.BytesIO(image)).n_frames == 2
    (row,) = run(stage(format="png", resize_mode="no"), [image])
    out = np.asarray(assert_kept(row, (200, 200), (200, 200), "png"), dtype=np.int16)
    assert np.abs(out - np.asarray(first.convert("RGB"), dtype=np.int16)).mean() < 1


def test_exif_orientation_applied(chelsea):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    image = encode(chelsea, "JPEG", quality=95, exif=exif.tobytes())
    (row,) = run(stage(), [image])
    assert_kept(row, (256, 385), (300, 451))
    (ignored,) = run(stage(exif_transpose=False), [image])
    assert_kept(ignored, (385, 256), (451, 300))


def exif_with_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("exif", [b"Exif\x00\x00MM\x00*garbage", exif_with_orientation(9)])
def test_broken_exif_is_ignored_not_dropped(chelsea, exif):
    image = encode(chelsea, "JPEG", quality=95, exif=exif)
    (row,) = run(stage(), [image])
    assert_kept(row, (385, 256), (451, 300))


# ---------------------------------------------------------------------------------------------
# Keeping the original bytes
# ---------------------------------------------------------------------------------------------


def test_no_reencode_keeps_the_bytes(astronaut, camera):
    rgb = encode(astronaut, "JPEG", quality=90)
    gray = encode(camera, "JPEG", quality=90)
    rows = run(stage(resize_mode="no", reencode=False), [rgb, gray])
    assert [r["image"] for r in rows] == [rgb, gray]
    assert [r["image_sha256"] for r in rows] == [image_digest(rgb), image_digest(gray)]
    assert_kept(rows[0], (512, 512), (512, 512))


def test_no_reencode_still_converts_what_must_change(astronaut, chelsea):
    png = encode(astronaut, "PNG")  # another format than the output's
    rgba = encode(astronaut.convert("RGBA"), "PNG")  # alpha to composite
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(chelsea, "JPEG", exif=exif.tobytes())  # a rotation to apply
    rows = run(stage(resize_mode="no", reencode=False, format="jpg"), [png, rgba, rotated])
    assert all(row["image"] not in (png, rgba, rotated) for row in rows)
    assert_kept(rows[0], (512, 512), (512, 512))
    assert_kept(rows[2], (300, 451), (300, 451))
    (same,) = run(stage(resize_mode="no", reencode=False, format="png"), [png])
    assert same["image"] == png


def test_no_reencode_still_checks_decoding(astronaut):
    truncated = encode(astronaut, "JPEG")[:5000]
    (row,) = run(stage(resize_mode="no", reencode=False), [truncated])
    assert row["drop_reason"] == "decode_error"


# ---------------------------------------------------------------------------------------------
# Bad input: drops with stable codes, never an exception
# ---------------------------------------------------------------------------------------------


def test_truncated_jpeg(astronaut):
    image = encode(astronaut, "JPEG")
    (row,) = run(stage(), [image[: len(image) // 2]])
    assert row["drop_reason"] == "decode_error"
    assert "truncated" in row["drop_detail"]
    assert row["drop_stage"] == "image"


def test_garbage_and_html():
    garbage = random.Random(0).randbytes(4096)
    html = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body></body></html>"
    rows = run(stage(), [garbage, html])
    assert [r["drop_reason"] for r in rows] == ["decode_error", "decode_error"]
    assert "<!DOCTYPE html>" in rows[1]["drop_detail"]
    assert "0x" not in rows[1]["drop_detail"]  # no memory address: the ledger stays deterministic


def test_missing_image():
    rows = run(stage(), [None, b""])
    assert [r["drop_reason"] for r in rows] == ["missing_image", "missing_image"]


def test_unsupported_format(chelsea):
    rows = run(stage(), [encode(chelsea, "PPM"), encode(chelsea, "ICO")])
    assert [(r["drop_reason"], r["drop_detail"]) for r in rows] == [
        ("unsupported_format", "ppm"),
        ("unsupported_format", "ico"),
    ]
    (gif_refused,) = run(stage(formats=["jpeg"]), [encode(chelsea, "GIF")])
    assert (gif_refused["drop_reason"], gif_refused["drop_detail"]) == ("unsupported_format", "gif")


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Records every pixel decode Pillow starts, whatever the plugin."""
    calls: list[str] = []
    image_load, imagefile_load = Image.Image.load, ImageFile.ImageFile.load

    def spy(original):
        def load(self, *args, **kwargs):
            calls.append(type(self).__name__)
            return original(self, *args, **kwargs)

        return load

    monkeypatch.setattr(Image.Image, "load", spy(image_load))
    monkeypatch.setattr(ImageFile.ImageFile, "load", spy(imagefile_load))
    return calls


def test_the_load_spy_sees_decodes(chelsea, loads):
    run(stage(), [encode(chelsea, "PNG")])
    assert loads


def test_decompression_bomb_rejected_from_the_header(loads):
    """100000 x 100000 RGB would be 30 GB decoded: refused before a single pixel is decoded."""
    rows = run(stage(), [png_claiming(100_000, 100_000)])
    assert rows[0]["drop_reason"] == "too_many_pixels"
    assert loads == []


def test_pixel_cap_is_ours_not_only_pillows(loads):
    # 81 Mpx: under Pillow's own threshold (89.5 Mpx), over the stage's default cap (64 Mpx)
    (row,) = run(stage(), [png_claiming(9000, 9000)])
    assert (row["drop_reason"], row["drop_detail"]) == ("too_many_pixels", "9000x9000 > max_pixels 67108864")
    assert loads == []


def test_pixel_cap_configurable(astronaut):
    (row,) = run(stage(max_pixels=100_000), [encode(astronaut, "JPEG")])
    assert (row["drop_reason"], row["drop_detail"]) == ("too_many_pixels", "512x512 > max_pixels 100000")


def test_upscaling_cannot_make_a_bomb(loads):
    """keep_ratio on a 1-pixel strip would upscale it to 256 x 1_024_000: refused before decoding."""
    strip = encode(Image.new("RGB", (4000, 1), (10, 20, 30)), "PNG")
    loads.clear()
    (row,) = run(stage(), [strip])
    assert row["drop_reason"] == "too_many_pixels"
    assert row["drop_detail"] == "resized 1024000x256 > max_pixels 67108864"
    assert loads == []


def test_output_over_the_encoders_side_limit():
    strip = encode(Image.new("RGB", (20_000, 10), (10, 20, 30)), "PNG")
    (row,) = run(stage(resize_mode="no", format="webp"), [strip])
    assert row["drop_reason"] == "too_many_pixels"
    assert "webp's limit of 16383" in row["drop_detail"]


def test_mixed_batch_never_raises(astronaut, chelsea, coffee):
    good = [encode(astronaut, "JPEG"), encode(chelsea, "PNG"), encode(coffee, "WEBP")]
    truncated = good[0][:3000]
    images = [good[0], truncated, None, good[1], b"<html>", png_claiming(100_000, 100_000), good[2]]
    rows = run(stage(), images)
    assert len(rows) == len(images)
    assert [r["id"] for r in rows] == [f"test:{i}" for i in range(len(images))]
    assert [r["drop_reason"] for r in rows] == [
        None, "decode_error", "missing_image", None, "decode_error", "too_many_pixels", None,
    ]
    for row in rows:
        if row["drop_reason"]:
            assert row["drop_stage"] == "image" and row["drop_detail"]


def test_rows_dropped_earlier_pass_through_untouched(astronaut):
    rows = [
        {"id": "test:0", "source": "test", "image": encode(astronaut, "JPEG"),
         "drop_stage": "download", "drop_reason": "http_404", "drop_detail": "404"},
    ]
    table = pa.Table.from_pylist(rows, schema=record_schema("pair"))
    (out,) = stage().process(table).to_pylist()
    assert (out["drop_reason"], out["image"], out["width"]) == ("http_404", rows[0]["image"], None)


def test_deterministic(astronaut, chelsea, coffee, camera):
    images = [
        encode(astronaut.resize((1024, 1024)), "JPEG"),  # takes the draft path
        encode(chelsea, "PNG"),
        encode(coffee.convert("CMYK"), "JPEG"),
        encode(camera, "PNG"),
        encode(astronaut.convert("RGBA"), "PNG"),
    ]
    for options in ({}, {"format": "webp"}, {"format": "png", "resize_mode": "border"}):
        first = run(stage(**options), images)
        second = run(stage(**options), images)
        assert [r["image"] for r in first] == [r["image"] for r in second]
        assert all(r["drop_reason"] is None for r in first)
