"""Cheap filters on a pair's image size, aspect ratio and caption length.

Each filter only decides keep or drop with a stable code and a detail naming the threshold; it
never changes a row. The image filters read the dimensions the image stage wrote, so they run
after it; by default they judge the original size, since a resize (center_crop, border) makes
every output the same shape.

Thresholds are validated when the recipe loads: a minimum above its maximum, a non-positive size
or a filter with no bound at all is a recipe mistake, reported with the key at fault.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from curate.stages.base import Drop, Filter, StageConfig, register

IMAGE_TOO_SMALL = "image_too_small"
IMAGE_TOO_LARGE = "image_too_large"
ASPECT_RATIO = "aspect_ratio"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"


def _check_bounds(config: StageConfig, pairs: list[tuple[str, str]]) -> None:
    """At least one bound set, and each minimum at most its maximum."""
    if all(getattr(config, name) is None for pair in pairs for name in pair):
        names = ", ".join(name for pair in pairs for name in pair)
        raise ValueError(f"{config.kind}: set at least one of {names}")
    for low, high in pairs:
        lo, hi = getattr(config, low), getattr(config, high)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"{low} ({lo}) must not exceed {high} ({hi})")


def _dimensions(row: dict[str, Any], use_original: bool) -> tuple[int, int]:
    """The image's (width, height): the original size when asked and known, else the current one."""
    if use_original and row.get("original_width") is not None and row.get("original_height") is not None:
        return row["original_width"], row["original_height"]
    if row.get("width") is None or row.get("height") is None:
        # A recipe that filters before the image stage: fail loudly rather than keep blindly.
        raise ValueError("row has no image dimensions; run the image stage before this filter")
    return row["width"], row["height"]


def _bound(width: int | None, height: int | None) -> str:
    if width is not None and height is not None:
        return f"{width}x{height}"
    return f"width {width}" if width is not None else f"height {height}"


class ImageSizeConfig(StageConfig):
    kind: Literal["image_size_filter"] = "image_size_filter"
    min_width: int | None = Field(None, ge=1)
    min_height: int | None = Field(None, ge=1)
    max_width: int | None = Field(None, ge=1)
    max_height: int | None = Field(None, ge=1)
    use_original: bool = True

    @model_validator(mode="after")
    def _bounds(self) -> ImageSizeConfig:
        _check_bounds(self, [("min_width", "max_width"), ("min_height", "max_height")])
        return self


@register
class ImageSizeFilter(Filter):
    """Drops images narrower/shorter than the minimums or wider/taller than the maximums."""

    name = "image_size_filter"
    kinds = ("pair", "doc")
    per_image = True  # on docs: each image, a failure removes its segment
    Config = ImageSizeConfig

    def check(self, row: dict[str, Any]) -> Drop | None:
        c = self.config
        w, h = _dimensions(row, c.use_original)
        if (c.min_width is not None and w < c.min_width) or (c.min_height is not None and h < c.min_height):
            return Drop(IMAGE_TOO_SMALL, f"{w}x{h} < min {_bound(c.min_width, c.min_height)}")
        if (c.max_width is not None and w > c.max_width) or (c.max_height is not None and h > c.max_height):
            return Drop(IMAGE_TOO_LARGE, f"{w}x{h} > max {_bound(c.max_width, c.max_height)}")
        return None


class AspectRatioConfig(StageConfig):
    kind: Literal["aspect_ratio_filter"] = "aspect_ratio_filter"
    # max(w/h, h/w): 1 is a square; the orientation (portrait or landscape) does not matter.
    max_aspect_ratio: float = Field(ge=1.0)
    use_original: bool = True


@register
class AspectRatioFilter(Filter):
    """Drops images more elongated than `max_aspect_ratio` (banners, strips, separators)."""

    name = "aspect_ratio_filter"
    kinds = ("pair", "doc")
    per_image = True  # on docs: each image, a failure removes its segment
    Config = AspectRatioConfig

    def check(self, row: dict[str, Any]) -> Drop | None:
        w, h = _dimensions(row, self.config.use_original)
        ratio = max(w, h) / min(w, h) if min(w, h) > 0 else float("inf")
        if ratio > self.config.max_aspect_ratio:
            return Drop(ASPECT_RATIO, f"{w}x{h} ratio {ratio:.2f} > max {self.config.max_aspect_ratio:g}")
        return None


class CaptionLengthConfig(StageConfig):
    kind: Literal["caption_length_filter"] = "caption_length_filter"
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=1)
    min_words: int | None = Field(None, ge=0)
    max_words: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> CaptionLengthConfig:
        _check_bounds(self, [("min_chars", "max_chars"), ("min_words", "max_words")])
        return self


@register
class CaptionLengthFilter(Filter):
    """Drops pairs whose caption (whitespace-stripped; a missing one counts as empty) is outside the
    character or word bounds. Words are whitespace-separated tokens: cheap and language-blind."""

    name = "caption_length_filter"
    Config = CaptionLengthConfig

    def check(self, row: dict[str, Any]) -> Drop | None:
        c = self.config
        caption = (row.get("caption") or "").strip()
        chars = len(caption)
        words = len(caption.split())
        if c.min_chars is not None and chars < c.min_chars:
            return Drop(CAPTION_TOO_SHORT, f"{chars} chars < min {c.min_chars}")
        if c.min_words is not None and words < c.min_words:
            return Drop(CAPTION_TOO_SHORT, f"{words} words < min {c.min_words}")
        if c.max_chars is not None and chars > c.max_chars:
            return Drop(CAPTION_TOO_LONG, f"{chars} chars > max {c.max_chars}")
        if c.max_words is not None and words > c.max_words:
            return Drop(CAPTION_TOO_LONG, f"{words} words > max {c.max_words}")
        return None
