"""Image size, aspect ratio and caption length filters: decisions, details and config checks."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import ValidationError

from curate.contract import record_schema
from curate.stages import STAGES, build_stage
from curate.stages.pair_filters import (
    AspectRatioConfig,
    AspectRatioFilter,
    CaptionLengthConfig,
    CaptionLengthFilter,
    ImageSizeConfig,
    ImageSizeFilter,
)


def pair(i: int, **columns) -> dict:
    return {"id": f"test:{i}", "source": "test", **columns}


def run(config, rows: list[dict]) -> list[tuple[str | None, str | None]]:
    """(drop_reason, drop_detail) per row, after checking the filter changed nothing else."""
    table = pa.Table.from_pylist(rows, schema=record_schema("pair"))
    out = build_stage(config).process(table)
    assert out.num_rows == table.num_rows
    assert out.drop(["drop_stage", "drop_reason", "drop_detail"]).equals(
        table.drop(["drop_stage", "drop_reason", "drop_detail"])
    )
    for row in out.to_pylist():
        assert (row["drop_stage"] is None) == (row["drop_reason"] is None)
    return [(r["drop_reason"], r["drop_detail"]) for r in out.to_pylist()]


def test_registered_under_their_kinds():
    assert STAGES["image_size_filter"] is ImageSizeFilter
    assert STAGES["aspect_ratio_filter"] is AspectRatioFilter
    assert STAGES["caption_length_filter"] is CaptionLengthFilter


# ---------------------------------------------------------------------------------------------
# Image size
# ---------------------------------------------------------------------------------------------


def test_image_size_bounds():
    config = ImageSizeConfig(min_width=64, min_height=64, max_width=4000, max_height=3000)
    rows = [
        pair(0, width=256, height=256, original_width=16, original_height=12),
        pair(1, width=256, height=256, original_width=640, original_height=480),
        pair(2, width=256, height=256, original_width=5000, original_height=300),
        pair(3, width=256, height=256, original_width=64, original_height=3000),  # bounds inclusive
        pair(4, width=256, height=256, original_width=100, original_height=40),
    ]
    assert run(config, rows) == [
        ("image_too_small", "16x12 < min 64x64"),
        (None, None),
        ("image_too_large", "5000x300 > max 4000x3000"),
        (None, None),
        ("image_too_small", "100x40 < min 64x64"),
    ]


def test_image_size_one_sided_bounds():
    rows = [pair(0, original_width=50, original_height=500)]
    assert run(ImageSizeConfig(min_width=64), rows) == [("image_too_small", "50x500 < min width 64")]
    assert run(ImageSizeConfig(max_height=400), rows) == [("image_too_large", "50x500 > max height 400")]


def test_image_size_original_or_current():
    row = pair(0, width=256, height=256, original_width=2000, original_height=2000)
    assert run(ImageSizeConfig(max_width=1024), [row]) == [("image_too_large", "2000x2000 > max width 1024")]
    assert run(ImageSizeConfig(max_width=1024, use_original=False), [row]) == [(None, None)]
    # no original size recorded: the current one is used
    assert run(ImageSizeConfig(max_width=100), [pair(0, width=256, height=256)]) == [
        ("image_too_large", "256x256 > max width 100")
    ]


def test_image_size_without_dimensions_is_a_stage_error():
    """Filtering before the image stage is a recipe bug: loud, not a silent keep."""
    ((reason, detail),) = run(ImageSizeConfig(min_width=1), [pair(0)])
    assert reason == "stage_error" and "run the image stage" in detail


# ---------------------------------------------------------------------------------------------
# Aspect ratio
# ---------------------------------------------------------------------------------------------


def test_aspect_ratio():
    config = AspectRatioConfig(max_aspect_ratio=3)
    rows = [
        pair(0, original_width=300, original_height=100),  # exactly 3: kept
        pair(1, original_width=301, original_height=100),
        pair(2, original_width=100, original_height=400),  # portrait counts the same
        pair(3, original_width=640, original_height=480),
    ]
    assert run(config, rows) == [
        (None, None),
        ("aspect_ratio", "301x100 ratio 3.01 > max 3"),
        ("aspect_ratio", "100x400 ratio 4.00 > max 3"),
        (None, None),
    ]


def test_aspect_ratio_judges_the_original_by_default():
    """center_crop makes every output square: the original shape is what matters."""
    row = pair(0, width=256, height=256, original_width=2560, original_height=256)
    assert run(AspectRatioConfig(max_aspect_ratio=2.5), [row]) == [
        ("aspect_ratio", "2560x256 ratio 10.00 > max 2.5")
    ]
    assert run(AspectRatioConfig(max_aspect_ratio=2.5, use_original=False), [row]) == [(None, None)]


# ---------------------------------------------------------------------------------------------
# Caption length
# ---------------------------------------------------------------------------------------------


def test_caption_length():
    config = CaptionLengthConfig(min_chars=5, max_chars=40, min_words=2, max_words=6)
    rows = [
        pair(0, caption="a cat"),
        pair(1, caption="   cat   "),  # stripped: 3 chars
        pair(2, caption="kitten"),  # 6 chars but 1 word
        pair(3, caption="a cat sitting on a red sofa in the sun"),  # 10 words
        pair(4, caption="x" * 41 + " y"),
        pair(5, caption=None),
        pair(6, caption="  a grey cat\non a sofa\t"),
    ]
    assert run(config, rows) == [
        (None, None),
        ("caption_too_short", "3 chars < min 5"),
        ("caption_too_short", "1 words < min 2"),
        ("caption_too_long", "10 words > max 6"),
        ("caption_too_long", "43 chars > max 40"),
        ("caption_too_short", "0 chars < min 5"),
        (None, None),
    ]


def test_caption_only_an_upper_bound():
    assert run(CaptionLengthConfig(max_words=3), [pair(0, caption=None)]) == [(None, None)]


# ---------------------------------------------------------------------------------------------
# Rows already dropped and bad configs
# ---------------------------------------------------------------------------------------------


def test_rows_dropped_earlier_are_not_judged_again():
    row = pair(0, caption="", drop_stage="image", drop_reason="decode_error", drop_detail="truncated")
    table = pa.Table.from_pylist([row], schema=record_schema("pair"))
    (out,) = build_stage(CaptionLengthConfig(min_chars=5)).process(table).to_pylist()
    assert (out["drop_stage"], out["drop_reason"], out["drop_detail"]) == ("image", "decode_error", "truncated")


@pytest.mark.parametrize(
    "config, options, message",
    [
        (ImageSizeConfig, {}, "set at least one of min_width"),
        (ImageSizeConfig, {"min_width": 512, "max_width": 256}, r"min_width \(512\) must not exceed max_width"),
        (ImageSizeConfig, {"min_height": 0}, "min_height"),
        (ImageSizeConfig, {"min_width": "wide"}, "min_width"),
        (ImageSizeConfig, {"min_widht": 5}, "min_widht"),  # a typo is an error, not ignored
        (AspectRatioConfig, {}, "max_aspect_ratio"),
        (AspectRatioConfig, {"max_aspect_ratio": 0.5}, "greater than or equal to 1"),
        (CaptionLengthConfig, {}, "set at least one of min_chars"),
        (CaptionLengthConfig, {"min_words": 10, "max_words": 3}, r"min_words \(10\) must not exceed max_words"),
        (CaptionLengthConfig, {"max_chars": 0}, "max_chars"),
        (CaptionLengthConfig, {"min_chars": -1}, "min_chars"),
    ],
)
def test_bad_config_fails_at_load(config, options, message):
    with pytest.raises(ValidationError, match=message):
        config(**options)
