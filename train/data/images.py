"""Encoded image bytes from a shard -> the normalised tensor the vision tower takes.

Written with Pillow and torch alone (no torchvision in the data path), and equal to open_clip's
evaluation transform for the same settings: `squash` resizes to S x S ignoring the aspect ratio
(DFN-5B's ViT-H-14-378 was trained so), `shortest_crop` resizes the shortest side to S and crops
the centre (open_clip's default, "shortest"); then /255 and (x - mean) / std per channel.

Shard bytes are untrusted: only JPEG, PNG and WebP are opened (the formats shards hold; Pillow's
other plugins, some of which run external programs, are never reached), and the size in the header
is checked against `max_pixels` before any pixel is decoded (a decompression bomb costs nothing).
The EXIF orientation is applied, so the model sees the image its caption describes; the first
frame of an animation is used.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageOps

RESIZE_MODES = ("squash", "shortest_crop")
# open_clip's resize_mode names -> ours ("longest", resize and pad, is not supported here)
OPEN_CLIP_RESIZE = {"squash": "squash", "shortest": "shortest_crop"}
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 8192 * 8192  # 64 Mi pixels, curate's image stage default too


class BadImage(ValueError):
    """Bytes that are not a usable image (undecodable, another format, too many pixels); the
    caller counts the sample and skips it."""


class ImagePreprocessor:
    """`__call__(bytes) -> float32 tensor [3, image_size, image_size]`, normalised by mean/std;
    with `uint8=True`, the resized pixels as uint8 instead (a quarter of the bytes through the
    loader's queues, pinned memory and the host-to-device copy), to be normalised on the device
    (`normalize`, or the vision tower itself: `VisionEncoder.forward` takes uint8 images)."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 resize_mode: str = "squash", interpolation: str = "bicubic",
                 max_pixels: int = DEFAULT_MAX_PIXELS, uint8: bool = False):
        if image_size < 1:
            raise ValueError(f"image_size {image_size} < 1")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {resize_mode!r}; expected one of {RESIZE_MODES}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {interpolation!r}; expected one of {tuple(INTERPOLATIONS)}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean {mean} and std {std} need 3 values each, std > 0")
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.interpolation = interpolation
        self.max_pixels = max_pixels
        self.uint8 = uint8
        self.mean = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(3, 1, 1)

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained: str | None = None, **kwargs: Any) -> ImagePreprocessor:
        """The preprocessing of an open_clip model name (and pretrained tag), read from open_clip's
        bundled configs without building the model or fetching anything: the size from the model
        config, then mean, std, resize mode and interpolation from open_clip's defaults, the model
        config's `preprocess_cfg` and the tag's entry, later ones winning (open_clip's own order).
        E.g. ("ViT-H-14-378-quickgelu", "dfn5b"): 378 px, squash, bicubic, OpenAI CLIP mean/std."""
        # open_clip: heavy (~6 s to import, torchvision with it): imported where used, not with this module
        import open_clip
        from open_clip.transform import PreprocessCfg

        model_cfg = open_clip.get_model_config(model_name) if ":" not in model_name else None
        if model_cfg is None:
            raise ValueError(f"{model_name!r} is not one of open_clip's bundled model configs")
        cfg = dataclasses.asdict(PreprocessCfg())
        cfg["size"] = model_cfg["vision_cfg"].get("image_size", cfg["size"])
        cfg.update(model_cfg.get("preprocess_cfg") or {})
        if pretrained is not None:
            tag = open_clip.get_pretrained_cfg(model_name, pretrained)
            if not tag:
                raise ValueError(f"open_clip has no pretrained tag {pretrained!r} for {model_name!r}")
            cfg.update({k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag})
        size = cfg["size"]
        if isinstance(size, (list, tuple)):
            if size[0] != size[1]:
                raise ValueError(f"{model_name}: a non-square image size {size}")
            size = size[0]
        mode = OPEN_CLIP_RESIZE.get(cfg["resize_mode"])
        if mode is None:
            raise ValueError(f"{model_name}: open_clip resize_mode {cfg['resize_mode']!r} is not supported "
                             f"(only {tuple(OPEN_CLIP_RESIZE)})")
        return cls(int(size), cfg["mean"], cfg["std"], resize_mode=mode, interpolation=cfg["interpolation"],
                   **kwargs)

    def decode(self, data: bytes) -> Image.Image:
        """The RGB image of `data`, upright, size-checked on the header before decoding."""
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError as exc:
            raise BadImage(f"too many pixels: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any failure to parse untrusted bytes
            raise BadImage(f"cannot decode: {exc}") from None
        with img:
            w, h = img.size
            if w < 1 or h < 1:
                raise BadImage(f"empty image {w}x{h}")
            if w * h > self.max_pixels:
                raise BadImage(f"too many pixels: {w}x{h} > max_pixels {self.max_pixels}")
            try:
                img.load()
                return ImageOps.exif_transpose(img).convert("RGB")
            except Image.DecompressionBombError as exc:
                raise BadImage(f"too many pixels: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - truncated or corrupt data, odd modes
                raise BadImage(f"cannot decode: {exc}") from None

    def resize(self, img: Image.Image) -> Image.Image:
        """S x S pixels by the resize mode (torchvision's rounding, so open_clip's output matches)."""
        s, resample = self.image_size, INTERPOLATIONS[self.interpolation]
        if self.resize_mode == "squash":
            return img.resize((s, s), resample)
        w, h = img.size
        if w <= h:
            size = (s, int(s * h / w))
        else:
            size = (int(s * w / h), s)
        img = img.resize(size, resample)
        left = int(round((size[0] - s) / 2.0))
        top = int(round((size[1] - s) / 2.0))
        return img.crop((left, top, left + s, top + s))

    def __call__(self, data: bytes) -> torch.Tensor:
        img = self.resize(self.decode(data))
        s = self.image_size
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(s, s, 3).permute(2, 0, 1)
        if self.uint8:
            return pixels.contiguous()
        return normalize(pixels, self.mean, self.std)


def normalize(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] -> float32 (x / 255 - mean) / std, on the pixels' device (mean
    and std: [3, 1, 1] or broadcastable)."""
    x = pixels.to(torch.float32).div_(255.0)
    return (x - mean.to(x.device)) / std.to(x.device)
