"""Eval-set decontamination: drop training pairs whose image is a near copy of an evaluation image,
so a benchmark never scores a model on pictures it trained on (re-encoded or resized copies
included).

`eval_decontaminate` (a Filter) compares each live pair's image with every image of an eval set by
perceptual hash (`curate.stages.phash`): a row within `max_distance` bits of an eval image is
dropped with code `eval_overlap` and detail `"<set name>: <eval file> at distance <d>"` (the
closest eval image; ties to the first file name). It adds no column.

The stage hashes each row's image itself, with the same function and `flip_invariant` it used
for the eval images, rather than reading `image_phash`: it needs no earlier stage and cannot
compare hashes made two different ways. The cost is one more small decode a row (after the
image stage, a 256 px image: about a millisecond). Rows whose image does not decode are dropped
as the phash stage drops them (`missing_image`, `decode_error`, `too_many_pixels`,
`unsupported_format`).

The eval set (`eval_set`) is a folder (every image file under it, recursively, by extension) or a
list file: `.txt` (one path a line; blank lines and `#` comments skipped) or `.csv` (the `path`
column, else the first column); relative paths in a list are relative to the list's folder. The
set is listed when the recipe loads: a missing path, an empty set or a listed file that does not
exist fails there, naming the path. Every worker process hashes the set once, lazily in
`setup()`, and indexes it by band keys (`max_distance + 1` blocks: any hash within the distance
shares one block exactly), so a row costs a few dictionary lookups, not a scan of the set. An
eval image that does not decode fails `setup()` with its name (a broken eval set is a recipe
error, not a drop).

The recipe names the set by path only: its content is not part of the recipe hash, so a run
resumed after the set changed mixes decisions made against both. Give a changed set a new path.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from curate.stages.base import Drop, Filter, StageConfig, register
from curate.stages.image import MISSING_IMAGE
from curate.engine.near_groups import hamming_band_keys, hamming_band_masks, hamming_distance
from curate.stages.phash import BITS, DEFAULT_MAX_DISTANCE, DEFAULT_MAX_PIXELS, phash_bytes

EVAL_OVERLAP = "eval_overlap"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def list_eval_images(eval_set: str | Path) -> list[tuple[str, Path]]:
    """The images of an eval set as (name in drop details, path), sorted by name. Raises
    ValueError, naming the path, for a missing set, an empty one or a listed file that is not
    there. A folder names its images by their path under it; a list file by the line."""
    root = Path(eval_set)
    if root.is_dir():
        found = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*")
                 if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    elif root.is_file():
        found = [(entry, root.parent / entry) for entry in _list_entries(root)]
        missing = [name for name, path in found if not path.is_file()]
        if missing:
            raise ValueError(f"eval set {root}: {len(missing)} listed file(s) not found, e.g. {missing[:3]}")
    else:
        raise ValueError(f"eval set {root}: no such folder or list file")
    if not found:
        raise ValueError(f"eval set {root}: holds no images (folders: {', '.join(IMAGE_SUFFIXES)} files; "
                         "list files: one path a line)")
    return sorted(found)


def _list_entries(path: Path) -> list[str]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
        if not rows:
            return []
        header = [c.strip().lower() for c in rows[0]]
        if "path" in header:
            column = header.index("path")
            return [r[column].strip() for r in rows[1:] if len(r) > column and r[column].strip()]
        return [r[0].strip() for r in rows if r[0].strip()]
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


class EvalIndex:
    """The hashes of an eval set, indexed by band keys: `nearest` finds the closest eval image
    within `max_distance` without scanning the set."""

    def __init__(self, names: list[str], hashes: np.ndarray, max_distance: int):
        self.names, self.hashes, self.max_distance = names, np.asarray(hashes, dtype=np.int64), max_distance
        self.masks = hamming_band_masks(max_distance, max_distance + 1, BITS)
        self.buckets: list[dict[int, list[int]]] = [{} for _ in self.masks]
        for i, keys in enumerate(hamming_band_keys(self.hashes, self.masks)):
            for band, key in enumerate(keys.tolist()):
                self.buckets[band].setdefault(key, []).append(i)

    def nearest(self, phash: int) -> tuple[str, int] | None:
        """(eval name, distance) of the closest eval image within `max_distance`, or None."""
        keys = hamming_band_keys(np.array([phash], dtype=np.int64), self.masks)[0].tolist()
        candidates = sorted({i for band, key in enumerate(keys) for i in self.buckets[band].get(key, ())})
        if not candidates:
            return None
        distances = hamming_distance(self.hashes[candidates], np.full(len(candidates), phash, dtype=np.int64))
        best = min(zip(distances.tolist(), (self.names[i] for i in candidates)))
        return (best[1], best[0]) if best[0] <= self.max_distance else None


class EvalSetConfig(StageConfig):
    """What every decontamination stage is configured with: the eval set and its name."""

    # A folder of images, or a .txt/.csv list of image paths (absolute, or relative to the list).
    eval_set: str
    # The set's name in drop details; defaults to the folder's or list file's name (stem).
    set_name: str | None = Field(None, min_length=1)

    @field_validator("eval_set")
    @classmethod
    def _set_exists(cls, value: str) -> str:
        list_eval_images(value)  # fails at recipe load, naming the path
        return value

    @property
    def label(self) -> str:
        return self.set_name or Path(self.eval_set).stem or str(self.eval_set)


class EvalDecontaminateConfig(EvalSetConfig):
    kind: Literal["eval_decontaminate"] = "eval_decontaminate"
    max_distance: int = Field(DEFAULT_MAX_DISTANCE, ge=0, le=16)
    flip_invariant: bool = False
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)


@register
class EvalDecontaminate(Filter):
    """Drops pairs whose image is within `max_distance` bits of an eval image (module docstring)."""

    name = "eval_decontaminate"
    Config = EvalDecontaminateConfig
    config: EvalDecontaminateConfig
    kinds = ("pair",)

    def setup(self) -> None:
        cfg = self.config
        names, hashes = [], []
        for name, path in list_eval_images(cfg.eval_set):
            h = phash_bytes(path.read_bytes(), cfg.flip_invariant, cfg.max_pixels)
            if isinstance(h, Drop):
                raise ValueError(f"eval set {cfg.eval_set}: {name} cannot be hashed: {h.reason}: {h.detail}")
            names.append(name)
            hashes.append(h)
        self.index = EvalIndex(names, np.array(hashes, dtype=np.int64), cfg.max_distance)

    def check(self, row: dict[str, Any]) -> Drop | None:
        data = row.get("image")
        if not data:
            return Drop(MISSING_IMAGE, "no image bytes")
        h = phash_bytes(bytes(data), self.config.flip_invariant, self.config.max_pixels)
        if isinstance(h, Drop):
            return h
        found = self.index.nearest(h)
        if found is None:
            return None
        name, distance = found
        return Drop(EVAL_OVERLAP, f"{self.config.label}: {name} at distance {distance}")
