"""face_blur: the astronaut's face (scikit-image) is found by OpenCV's bundled cascade and blurred
beyond recognition, the rest of the picture kept; a face-free picture keeps its exact bytes; docs
count faces over their images; a YuNet detector runs from a local ONNX file (a hand-built one
here: it tests the mechanics, not detection quality) and a missing one fails at recipe load."""

from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from skimage import data

from curate.contract import image_digest, record_schema
from curate.documents import dump_json
from curate.recipe import RecipeError, parse_recipe
from curate.stages import STAGES, build_stage
from curate.stages.base import counting
from curate.stages.face_blur import FaceBlur, FaceBlurConfig

ASTRONAUT_FACE = (177, 66, 95, 95)  # x, y, w, h: where the cascade finds it in the 512 x 512 picture


def encode(pixels: np.ndarray, fmt: str = "JPEG", **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **options)
    return buf.getvalue()


def decode(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob))).astype(np.float64)


def pair(i: int, image: bytes | None, fmt: str = "jpg", size: tuple[int, int] = (512, 512)) -> dict:
    return {"id": f"t:{i}", "source": "t", "caption": "c", "image": image, "image_format": fmt,
            "image_sha256": image_digest(image) if image else None, "image_nbytes": len(image) if image else None,
            "width": size[0], "height": size[1]}


def run(config: FaceBlurConfig, kind: str, rows: list[dict]) -> tuple[list[dict], dict]:
    table = pa.Table.from_pylist(rows, schema=record_schema(kind))
    with counting() as counts:
        out = build_stage(config).process(table)
    assert out.schema.field("faces_blurred").type == pa.int32()
    return out.to_pylist(), dict(counts)


def sharpness(pixels: np.ndarray) -> float:
    """Variance of the Laplacian: high where there are edges (eyes, mouth), ~0 on a smooth blob."""
    gray = pixels.mean(axis=2) if pixels.ndim == 3 else pixels
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def test_registered_per_image_for_pairs_and_docs():
    assert STAGES["face_blur"] is FaceBlur
    assert FaceBlur.per_image and FaceBlur.kinds == ("pair", "doc")
    assert FaceBlur.output_columns == {"faces_blurred": pa.int32()}


def test_face_blurred_beyond_recognition_and_face_free_bytes_kept():
    astronaut = encode(data.astronaut(), quality=95)
    gray = encode(data.astronaut()[:, :, 1], "PNG")
    coffee = encode(data.coffee(), quality=90)
    gif = encode(data.astronaut(), "GIF")  # no image stage ran: a format face_blur does not write
    rows, counts = run(FaceBlurConfig(), "pair", [
        pair(0, astronaut), pair(1, gray, "png"), pair(2, coffee), pair(3, b"\xff\xd8\xff\xe0" + bytes(64)),
        pair(4, None), pair(5, gif, "gif"),
    ])
    face, gray_face, free, broken, missing, unwritable = rows

    assert face["drop_reason"] is None and face["faces_blurred"] == 1
    assert face["image"] != astronaut and face["image_format"] == "jpg"
    assert face["image_sha256"] == image_digest(face["image"]) and face["image_nbytes"] == len(face["image"])
    before, after = decode(astronaut), decode(face["image"])
    assert after.shape == before.shape and (face["width"], face["height"]) == (512, 512)
    x, y, w, h = ASTRONAUT_FACE
    inner = (slice(y, y + h), slice(x, x + w))
    assert sharpness(after[inner]) < 0.02 * sharpness(before[inner])  # eyes, nose, mouth gone
    assert after[inner].var() < 0.5 * before[inner].var()
    # Beyond the box grown by 0.2 x 95 and its soft edge (2 sigma = 2 x 0.15 x 95) only the JPEG
    # re-encoding differs.
    reach = 19 + 29
    outside = np.ones(before.shape[:2], bool)
    outside[y - reach:y + h + reach, x - reach:x + w + reach] = False
    assert np.abs(after - before)[outside].mean() < 1.0

    assert gray_face["faces_blurred"] == 1 and gray_face["image_format"] == "png"
    assert Image.open(io.BytesIO(gray_face["image"])).mode == "L"
    assert sharpness(decode(gray_face["image"])[inner]) < 0.02 * sharpness(decode(gray)[inner])

    assert free["drop_reason"] is None and free["faces_blurred"] == 0
    assert free["image"] == coffee and free["image_sha256"] == image_digest(coffee)

    assert (broken["drop_stage"], broken["drop_reason"]) == ("face_blur", "decode_error")
    assert missing["drop_reason"] == "missing_image"
    assert unwritable["drop_reason"] == "unsupported_format" and unwritable["image"] == gif
    assert counts == {"faces": 2, "images_blurred": 2}


def test_exif_orientation_kept_other_metadata_dropped():
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180 to display
    exif[0x010F] = "Camera maker"
    tagged = encode(data.astronaut(), exif=exif.tobytes())
    (row,), _ = run(FaceBlurConfig(quality=80), "pair", [pair(0, tagged)])
    assert row["faces_blurred"] == 1
    assert dict(Image.open(io.BytesIO(row["image"])).getexif()) == {0x0112: 3}


def test_doc_counts_faces_over_its_images():
    astronaut, rocket = encode(data.astronaut()), encode(data.rocket(), "PNG")
    segments = [{"type": "text", "text": "A face, a rocket, a broken file."},
                {"type": "image", "image": 0, "url": "http://x/a.jpg"},
                {"type": "image", "image": 1, "url": "http://x/r.png"},
                {"type": "image", "image": 2, "url": "http://x/b.jpg"}]
    doc = {"id": "d:1", "source": "d", "segments": dump_json(segments),
           "images": [astronaut, rocket, b"not an image"], "image_formats": ["jpg", "png", "jpg"],
           "image_sha256s": [image_digest(b) for b in (astronaut, rocket, b"not an image")],
           "image_nbytes_list": [len(astronaut), len(rocket), 12],
           "image_widths": [512, 640, 1], "image_heights": [512, 427, 1]}
    earlier = {"id": "d:2", "source": "d", "segments": dump_json(segments[:2]), "images": [astronaut],
               "image_formats": ["jpg"], "drop_stage": "x", "drop_reason": "dropped_before"}
    (row, skipped), counts = run(FaceBlurConfig(), "doc", [doc, earlier])

    assert row["drop_reason"] is None and row["faces_blurred"] == 1
    assert len(row["images"]) == 2 and row["images"][0] != astronaut and row["images"][1] == rocket
    assert row["image_sha256s"] == [image_digest(b) for b in row["images"]]
    assert row["image_nbytes_list"] == [len(b) for b in row["images"]]
    assert (row["image_widths"], row["image_heights"]) == ([512, 640], [512, 427])
    assert [s.get("image") for s in json.loads(row["segments"])] == [None, 0, 1]
    (removed,) = json.loads(row["segment_drops"])
    assert (removed["stage"], removed["reason"], removed["url"]) == ("face_blur", "decode_error", "http://x/b.jpg")
    assert skipped["faces_blurred"] is None and skipped["images"] == [astronaut]
    assert counts == {"faces": 1, "images_blurred": 1}


# ---------------------------------------------------------------------------------------------
# YuNet: a hand-built ONNX with YuNet's inputs and outputs (OpenCV's FaceDetectorYN contract)
# ---------------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: int | str | bytes) -> bytes:
    """One protobuf field: an int as a varint, text or bytes length-delimited."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    raw = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(raw)) + raw


def _tensor(name: str, array: np.ndarray) -> bytes:  # onnx.TensorProto: dims, data_type, name, raw_data
    elem = {np.dtype(np.float32): 1, np.dtype(np.int64): 7}[array.dtype]
    return b"".join(_field(1, d) for d in array.shape) + _field(2, elem) + _field(8, name) + _field(9, array.tobytes())


def _ints(name: str, values: list[int]) -> bytes:  # onnx.AttributeProto of type INTS (7)
    return _field(1, name) + b"".join(_field(8, v) for v in values) + _field(20, 7)


def _node(op: str, inputs: list[str], output: str, *attributes: bytes) -> bytes:
    return (b"".join(_field(1, i) for i in inputs) + _field(2, output) + _field(4, op)
            + b"".join(_field(5, a) for a in attributes))


def _value_info(name: str, dims: list[int | str]) -> bytes:  # a float tensor, dims fixed or named
    shape = b"".join(_field(1, _field(1, d) if isinstance(d, int) else _field(2, d)) for d in dims)
    return _field(1, name) + _field(2, _field(1, _field(1, 1) + _field(2, shape)))


def tiny_yunet(path) -> None:
    """A YuNet-shaped ONNX (input `input` [1, 3, H, W] BGR 0..255; for strides 8, 16, 32 outputs
    cls_*, obj_* [1, N, 1], bbox_* [1, N, 4], kps_* [1, N, 10]) with hand-set weights: a stride-32
    cell whose mean brightness is near white scores ~1 (cls = 2 x mean / 255 - 1), every other
    cell and stride 0, and each box is exactly its cell. Tests the mechanics, not quality."""
    nodes, weights, outputs = [], [], []
    for head, channels in (("cls", 1), ("obj", 1), ("bbox", 4), ("kps", 10)):
        for stride in (8, 16, 32):
            name = f"{head}_{stride}"
            kernel = np.zeros((channels, 3, stride, stride), np.float32)
            bias = {"cls": [-1.0], "obj": [1.0], "bbox": [0.5, 0.5, 0.0, 0.0], "kps": [0.5] * 10}[head]
            if name == "cls_32":
                kernel[:] = 2.0 / (255 * 3 * stride * stride)
            weights += [_tensor(f"w_{name}", kernel), _tensor(f"b_{name}", np.array(bias, np.float32)),
                        _tensor(f"shape_{name}", np.array([1, -1, channels], np.int64))]
            nodes += [_node("Conv", ["input", f"w_{name}", f"b_{name}"], f"conv_{name}",
                            _ints("kernel_shape", [stride, stride]), _ints("strides", [stride, stride])),
                      _node("Transpose", [f"conv_{name}"], f"nhwc_{name}", _ints("perm", [0, 2, 3, 1])),
                      _node("Reshape", [f"nhwc_{name}", f"shape_{name}"], name)]
            outputs.append(_value_info(name, [1, "n", channels]))
    graph = (b"".join(_field(1, n) for n in nodes) + _field(2, "tiny_yunet") + b"".join(_field(5, w) for w in weights)
             + _field(11, _value_info("input", [1, 3, "h", "w"])) + b"".join(_field(12, o) for o in outputs))
    path.write_bytes(_field(1, 8) + _field(8, _field(2, 13)) + _field(7, graph))  # IR 8, opset 13


def test_yunet_box_found_on_the_small_copy_is_blurred_in_the_stored_image(tmp_path):
    """The detector sees a copy at half size (detect_max_side 256 of 512): its 32 px box must land
    on the 64 px bright square of the stored image, and only around it do pixels change."""
    model = tmp_path / "tiny_yunet.onnx"
    tiny_yunet(model)
    pixels = np.zeros((384, 512, 3), np.uint8)
    pixels[64:128, 128:192] = np.random.default_rng(0).integers(200, 256, (64, 64, 3))
    image = encode(pixels, "PNG")
    blank = encode(np.zeros((100, 130, 3), np.uint8), "PNG")  # not a multiple of 32: padded by OpenCV
    config = FaceBlurConfig(detector="yunet", model=str(model), detect_max_side=256, margin=0.2, blur=0.15)
    (row, none), counts = run(config, "pair", [pair(0, image, "png"), pair(1, blank, "png")])

    assert row["faces_blurred"] == 1 and counts == {"faces": 1, "images_blurred": 1}
    after = decode(row["image"])
    changed = np.argwhere(np.any(after != pixels, axis=2))
    (top, left), (bottom, right) = changed.min(axis=0), changed.max(axis=0)
    # Centred on the square (a box left in the copy's pixels would sit at 64..96 x 32..64), and
    # spanning at least the box grown by 0.2 x 64 a side, at most that plus the soft edge (2 sigma).
    assert abs((left + right) / 2 - 160) <= 2 and abs((top + bottom) / 2 - 96) <= 2
    assert 64 + 2 * 12 <= right - left + 1 <= 64 + 2 * (13 + 20)
    assert 64 + 2 * 12 <= bottom - top + 1 <= 64 + 2 * (13 + 20)
    assert sharpness(after[64:128, 128:192]) < 0.02 * sharpness(pixels[64:128, 128:192].astype(np.float64))
    assert none["faces_blurred"] == 0 and none["image"] == blank


def test_yunet_config_errors_name_the_key(tmp_path):
    recipe = {"name": "t", "sources": [{"kind": "image_folder", "name": "a", "path": "x", "captions": "sidecar"}],
              "output": {"path": "out"}}
    missing = tmp_path / "yunet.onnx"
    with pytest.raises(RecipeError) as err:
        parse_recipe({**recipe, "stages": [{"kind": "face_blur", "detector": "yunet", "model": str(missing)}]}, "r.yaml")
    assert "stages.0.face_blur.model" in str(err.value) and str(missing) in str(err.value)
    with pytest.raises(RecipeError, match="detector yunet needs `model`"):
        parse_recipe({**recipe, "stages": [{"kind": "face_blur", "detector": "yunet"}]}, "r.yaml")
    with pytest.raises(RecipeError, match=r"\['min_neighbors'\] apply to detector opencv_cascade, not yunet"):
        tiny_yunet(missing)
        parse_recipe({**recipe, "stages": [{"kind": "face_blur", "detector": "yunet", "model": str(missing),
                                            "min_neighbors": 3}]}, "r.yaml")
