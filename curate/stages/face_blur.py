"""Face blurring (`face_blur`, per image, pairs and docs): find faces and blur them in the stored
image. Besides download and the image stage, this is the one stage that rewrites image bytes.

Contract, for each live image:
- faces found: each box, grown by `margin` of its width (height) on the left and right (top and
  bottom) sides and clipped to the image, is blurred; the image is re-encoded in its own format
  (`image_format`: jpg and webp at `quality`, png at zlib level 6, as the image stage does) and
  `image`, `image_sha256` (always the digest of `image` as it is now) and `image_nbytes` are
  updated. Width, height and format stay; no metadata is carried but the EXIF orientation.
- no face: the bytes stay exactly as they were (decoded to search, never re-encoded).
- `faces_blurred` (int32) is the number of boxes blurred: per pair; for a doc, the total over
  its images (a doc's per-image columns are the image lists of curate/documents.py, which hold
  no per-image counts). The manifest's `stages.face_blur.counts` sums `faces` and
  `images_blurred`.
- bytes that do not decode drop the image (a doc: its segment) with the image stage's codes
  (`missing_image`, `decode_error`, `too_many_pixels`); an image with a face in a format this
  stage cannot write (a GIF when no image stage ran) is `unsupported_format`.

Detectors (`detector`):
- `opencv_cascade` (default): OpenCV's bundled frontal-face Haar cascade. Ships inside
  opencv-python, so tests need no download; weak on profiles, small and occluded faces.
- `yunet`: OpenCV's `FaceDetectorYN` running a local YuNet ONNX file (`model`; opencv_zoo's
  face_detection_yunet_2023mar.onnx), much better recall. A missing file fails at recipe load;
  the recipe hash covers the path, not the file: give a changed model a new path.
Both search a copy whose larger side is at most `detect_max_side` (boxes scaled back), so
detection costs the same on big photos; a face must be some 10-24 px across in that copy.

Blur: each grown box is blended with its Gaussian blur through a mask blurred the same way, so
the patch fades in with no hard rectangle (img2dataset's blurrer, which DataComp uses on its face
boxes, after Yang et al.'s ImageNet face obfuscation). Sigma is `blur` x the face box's larger
side (0.15: no eye, nose or mouth is left, only a smooth blob of the face's colours); the blur
runs on the region shrunk so the box is 32 px a side and is scaled back, the same low-pass at a
constant cost for a 30 px or a 3000 px face. Gaussian rather than pixelation: a mosaic keeps a
coarse block grid, easier to invert and a sharp artificial pattern that a model trained on the
data can learn; a strong Gaussian leaves a smooth region, close to natural defocus.

Requires the `safety` extra (opencv-python-headless); cv2 is imported in `setup()`.
"""

from __future__ import annotations

import io
import math
import threading
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field, field_validator, model_validator

from curate.contract import image_digest
from curate.documents import table_kind
from curate.stages.base import Drop, RowStage, StageConfig, register
from curate.stages.image import (
    DECODE_ERROR,
    MISSING_IMAGE,
    TOO_MANY_PIXELS,
    UNSUPPORTED_FORMAT,
    describe_decode_error,
    to_rgb,
)

FACES_COLUMN = "faces_blurred"
CASCADE_FILE = "haarcascade_frontalface_default.xml"
BLUR_WORK_SIDE = 32  # the grown box is blurred at this size (its larger side), then scaled back
_ENCODERS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}  # image_format -> Pillow encoder
_ORIENTATION_TAG = 0x0112
# Options that belong to one detector: setting them for the other is a recipe error, not a no-op.
_DETECTOR_OPTIONS = {
    "opencv_cascade": ("scale_factor", "min_neighbors", "min_size"),
    "yunet": ("model", "score_threshold", "nms_threshold"),
}
_DOC_FACES = threading.local()  # doc batches: doc id -> faces blurred over its images


class FaceBlurConfig(StageConfig):
    kind: Literal["face_blur"] = "face_blur"
    detector: Literal["opencv_cascade", "yunet"] = "opencv_cascade"
    # opencv_cascade: CascadeClassifier.detectMultiScale's options; min_size is the smallest face
    # side searched, in pixels of the detection copy (24 is the cascade's own window).
    scale_factor: float = Field(1.1, gt=1.0, le=2.0)
    min_neighbors: int = Field(5, ge=0)
    min_size: int = Field(24, ge=1)
    # yunet: the ONNX file, and FaceDetectorYN's thresholds. 0.6 rather than opencv_zoo's demo
    # 0.9: a missed face is a privacy leak, a false one only a blurred patch.
    model: str | None = None
    score_threshold: float = Field(0.6, gt=0.0, le=1.0)
    nms_threshold: float = Field(0.3, gt=0.0, le=1.0)
    detect_max_side: int = Field(1024, ge=64)  # detection runs on a copy at most this big
    margin: float = Field(0.2, ge=0.0, le=1.0)  # each side of a box pushed out by this x its size
    # Gaussian sigma / the face box's larger side. img2dataset (DataComp) uses 0.1; 0.15 leaves no
    # eye, mouth or nose of a face, only a smooth blob of its colours.
    blur: float = Field(0.15, gt=0.0, le=1.0)
    quality: int = Field(95, ge=1, le=100)  # jpg and webp re-encoding (the image stage's default)

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"YuNet model file {Path(value).resolve()} does not exist")
        return value

    @model_validator(mode="after")
    def _detector_options(self) -> FaceBlurConfig:
        if self.detector == "yunet" and self.model is None:
            raise ValueError("detector yunet needs `model`: the path of a YuNet ONNX file "
                             "(opencv_zoo's face_detection_yunet_2023mar.onnx)")
        for detector, options in _DETECTOR_OPTIONS.items():
            stray = sorted(set(options) & self.model_fields_set) if detector != self.detector else []
            if stray:
                raise ValueError(f"{stray} apply to detector {detector}, not {self.detector}")
        return self


Box = tuple[float, float, float, float]  # x, y, width, height in pixels of the stored image


def grown_box(box: Box, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of `box` with each side pushed out by `margin` of the box's
    size, rounded outwards and clipped to the image."""
    x, y, w, h = box
    left, top = math.floor(x - margin * w), math.floor(y - margin * h)
    right, bottom = math.ceil(x + w + margin * w), math.ceil(y + h + margin * h)
    return max(0, left), max(0, top), min(width, right), min(height, bottom)


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image; 1 when absent or unreadable (EXIF is
    untrusted, and a broken block is no reason to lose an image whose pixels decode)."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - Pillow has raised on malformed EXIF blocks before
        return 1
    return value if value in range(1, 9) else 1


@register
class FaceBlur(RowStage):
    """Detects faces and blurs them in place (module docstring)."""

    name = "face_blur"
    Config = FaceBlurConfig
    config: FaceBlurConfig
    kinds = ("pair", "doc")
    per_image = True  # on docs: each image; a decode failure removes its segment
    output_columns: ClassVar[dict[str, pa.DataType]] = {FACES_COLUMN: pa.int32()}

    def setup(self) -> None:
        # OpenCV is the safety extra's, and importing curate must not need it: loaded per worker.
        import cv2

        self.cv2 = cv2
        if self.config.detector == "opencv_cascade":
            self.cascade_path = str(Path(cv2.data.haarcascades) / CASCADE_FILE)
        self._detectors = threading.local()  # neither detector is safe to share between threads
        self._detector()  # a model OpenCV cannot read fails here, once, not as a drop per image

    def _detector(self) -> Any:
        detector = getattr(self._detectors, "detector", None)
        if detector is None:
            cfg, cv2 = self.config, self.cv2
            if cfg.detector == "opencv_cascade":
                detector = cv2.CascadeClassifier(self.cascade_path)
                if detector.empty():
                    raise RuntimeError(f"OpenCV could not load its bundled cascade {self.cascade_path}")
            else:
                detector = cv2.FaceDetectorYN.create(cfg.model, "", (320, 320), cfg.score_threshold,
                                                     cfg.nms_threshold, 5000)
            self._detectors.detector = detector
        return detector

    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Face boxes (x, y, width, height) in `rgb`'s pixels, searched on a copy whose larger
        side is at most `detect_max_side`."""
        cv2, cfg = self.cv2, self.config
        height, width = rgb.shape[:2]
        scale = min(1.0, cfg.detect_max_side / max(height, width))
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        sx, sy = width / rgb.shape[1], height / rgb.shape[0]  # back to the stored image's pixels
        detector = self._detector()
        if cfg.detector == "opencv_cascade":
            gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            found = detector.detectMultiScale(gray, scaleFactor=cfg.scale_factor, minNeighbors=cfg.min_neighbors,
                                              minSize=(cfg.min_size, cfg.min_size))
            boxes = [tuple(map(float, b)) for b in found]
        else:
            detector.setInputSize((rgb.shape[1], rgb.shape[0]))
            _, found = detector.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            boxes = [tuple(map(float, f[:4])) for f in (found if found is not None else [])]
        return [(x * sx, y * sy, w * sx, h * sy) for x, y, w, h in boxes]

    def blur(self, pixels: np.ndarray, box: Box) -> None:
        """Blur one face of `pixels` in place: the box grown by `margin` is blended with its
        Gaussian blur (sigma `blur` x the box's larger side) through a mask blurred the same way
        (soft edges, no hard rectangle; DataComp's img2dataset blurrer, after Yang et al.'s
        ImageNet face obfuscation). Computed on the region shrunk so the box's larger side is
        `BLUR_WORK_SIDE` px and scaled back: the same low-pass at a constant cost."""
        cv2 = self.cv2
        height, width = pixels.shape[:2]
        left, top, right, bottom = grown_box(box, self.config.margin, width, height)
        if right - left < 2 or bottom - top < 2:
            return
        sigma = self.config.blur * max(box[2], box[3])
        pad = math.ceil(2 * sigma)  # the soft edge reaches this far out
        x0, y0, x1, y1 = max(0, left - pad), max(0, top - pad), min(width, right + pad), min(height, bottom + pad)
        patch = pixels[y0:y1, x0:x1].astype(np.float32)
        mask = np.zeros(patch.shape[:2], np.float32)
        mask[top - y0:bottom - y0, left - x0:right - x0] = 1.0
        h, w = mask.shape
        scale = min(1.0, BLUR_WORK_SIDE / max(right - left, bottom - top))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))

        def low_pass(a: np.ndarray) -> np.ndarray:
            small = cv2.resize(a, size, interpolation=cv2.INTER_AREA)
            small = cv2.GaussianBlur(small, (0, 0), sigma * scale, borderType=cv2.BORDER_REPLICATE)
            return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR).reshape(a.shape)

        soft, smooth = low_pass(mask), low_pass(patch)
        soft = soft.reshape(h, w, *([1] if patch.ndim == 3 else []))
        blended = patch * (1.0 - soft) + smooth * soft
        pixels[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)

    def process_row(self, row: dict[str, Any]) -> Drop | None:
        data = row.get("image")
        if not data:
            return Drop(MISSING_IMAGE, "no image bytes")
        data = bytes(data)
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as exc:
            return Drop(TOO_MANY_PIXELS, str(exc))
        except Exception as exc:  # noqa: BLE001 - untrusted bytes: whatever Pillow raises is a decode error
            return Drop(DECODE_ERROR, describe_decode_error(exc, data))
        with img:
            try:
                img.load()
            except Image.DecompressionBombError as exc:
                return Drop(TOO_MANY_PIXELS, str(exc))
            except Exception as exc:  # noqa: BLE001 - truncated or corrupt data, whatever Pillow raises
                return Drop(DECODE_ERROR, describe_decode_error(exc, data))
            # The image stage leaves RGB (or grayscale kept as is); anything else is converted its
            # way (alpha on white) before blurring, since it is re-encoded anyway.
            pixels = np.array(img if img.mode in ("RGB", "L") else to_rgb(img))
            orientation = exif_orientation(img)
        rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[:, :, None], 3, axis=2)
        boxes = self.detect(np.ascontiguousarray(rgb))
        encoder = _ENCODERS.get(row.get("image_format") or "")
        if boxes and encoder is None:
            return Drop(UNSUPPORTED_FORMAT, f"{len(boxes)} face(s) in a {row.get('image_format')!r} image, "
                                            "which face_blur cannot write; put the image stage before it")
        row[FACES_COLUMN] = len(boxes)
        totals = getattr(_DOC_FACES, "totals", None)
        if totals is not None:  # one image of a doc: its count goes to the doc's total
            totals[row.get("id")] += len(boxes)
        if not boxes:
            return None  # the bytes stay exactly as they were
        for box in boxes:
            self.blur(pixels, box)
        out = Image.fromarray(pixels)
        options: dict[str, Any] = {"compress_level": 6} if encoder == "PNG" else {"quality": self.config.quality}
        if orientation != 1:  # keep how the image displays; nothing else of its metadata
            exif = Image.Exif()
            exif[_ORIENTATION_TAG] = orientation
            options["exif"] = exif.tobytes()
        buffer = io.BytesIO()
        out.save(buffer, format=encoder, **options)
        row["image"] = buffer.getvalue()
        row["image_sha256"] = image_digest(row["image"])
        row["image_nbytes"] = len(row["image"])
        self.count("faces", len(boxes))
        self.count("images_blurred")
        return None

    def process(self, table: pa.Table) -> pa.Table:
        """Row stages' processing; on docs, `faces_blurred` then holds each doc's total over its
        images (summed from the per-image calls, which see one image of the doc at a time)."""
        if table_kind(table.schema) != "doc":
            return super().process(table)
        live = [not reason for reason in table.column("drop_reason").to_pylist()]
        _DOC_FACES.totals = totals = Counter()
        try:
            out = super().process(table)
        finally:
            _DOC_FACES.totals = None
        index = out.schema.get_field_index(FACES_COLUMN)
        before = out.column(index).to_pylist()
        values = [totals[doc_id] if was_live else old
                  for doc_id, was_live, old in zip(out.column("id").to_pylist(), live, before)]
        return out.set_column(index, out.schema.field(index), pa.array(values, pa.int32()))
