"""The demo's input corpus is deterministic, real, and says truthfully what it holds."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tools.demo.data import build_demo_inputs

REASONS = {
    "decode_error", "image_too_small", "aspect_ratio", "caption_too_short", "no_caption",
    "duplicate", "malformed_row", "missing_image",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo")
    return root, build_demo_inputs(root)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            assert m.isfile() and m.mtime and m.uid == 0 and m.gid == 0, m.name
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def _bad_paths(summary: dict) -> set[str]:
    return {b["path"] for b in summary["bad"] if "line" not in b and "key" not in b}


def test_builds_byte_identical_trees(tmp_path: Path, built: tuple[Path, dict]) -> None:
    root, summary = built
    again = build_demo_inputs(tmp_path / "again")
    assert _tree(root) == _tree(tmp_path / "again")
    # rebuilding in place replaces what is there, stale files included
    (tmp_path / "again" / "folder" / "stale.jpg").write_bytes(b"x")
    build_demo_inputs(tmp_path / "again")
    assert _tree(root) == _tree(tmp_path / "again")
    strip = lambda s: json.loads(json.dumps(s).replace(str(tmp_path / "again"), str(root)))  # noqa: E731
    assert strip(again) == summary


def test_counts_match_the_files(built: tuple[Path, dict]) -> None:
    root, summary = built
    folder, mapped, wds = (summary["sources"][k] for k in ("folder", "mapped", "wds"))

    images = sorted(p for p in (root / "folder").iterdir() if p.suffix != ".txt")
    assert [f"folder/{p.name}" for p in images] == folder["files"]
    assert folder["images"] == folder["expected_inputs"] == len(images)
    assert 20 <= len(images) <= 30
    assert folder["captions"] == len(list((root / "folder").glob("*.txt"))) == len(images) - 1

    lines = (root / "mapped" / "captions.jsonl").read_text().splitlines()
    assert mapped["rows"] == mapped["expected_inputs"] == len(lines)
    assert mapped["images"] == len([p for p in (root / "mapped").iterdir() if p.name != "captions.jsonl"])
    assert 5 <= mapped["images"] <= 8

    samples = {}
    for shard in wds["shards"]:
        samples.update(_tar_samples(Path(shard)))
    assert wds["samples"] == wds["expected_inputs"] == len(samples)
    assert sum(1 for s in samples.values() if "jpg" in s) == wds["expected_kept"]

    per_source = summary["sources"].values()
    assert summary["expected_inputs"] == sum(s["expected_inputs"] for s in per_source)
    assert summary["expected_kept"] == sum(s["expected_kept"] for s in per_source)
    assert summary["expected_inputs"] - summary["expected_kept"] == len(summary["bad"])
    assert sum(summary["expected_drops"].values()) == len(summary["bad"])
    assert set(summary["expected_drops"]) == REASONS  # every reason shows up


def test_bad_inputs_are_what_they_claim(built: tuple[Path, dict]) -> None:
    root, summary = built
    by_reason: dict[str, list[dict]] = {}
    for bad in summary["bad"]:
        by_reason.setdefault(bad["reason"], []).append(bad)

    (dup,) = by_reason["duplicate"]
    assert (root / dup["path"]).read_bytes() == (root / dup["duplicate_of"]).read_bytes()
    assert (root / dup["path"]).with_suffix(".txt").read_text() != (
        root / dup["duplicate_of"]).with_suffix(".txt").read_text()

    (corrupt,) = by_reason["decode_error"]
    with pytest.raises(Exception):
        with Image.open(root / corrupt["path"]) as im:
            im.load()

    (tiny,) = by_reason["image_too_small"]
    with Image.open(root / tiny["path"]) as im:
        assert max(im.size) <= 16
    (long,) = by_reason["aspect_ratio"]
    with Image.open(root / long["path"]) as im:
        assert im.size[0] / im.size[1] >= 10
    (short,) = by_reason["caption_too_short"]
    assert len((root / short["path"]).with_suffix(".txt").read_text().strip()) < 5
    (uncaptioned,) = by_reason["no_caption"]
    assert not (root / uncaptioned["path"]).with_suffix(".txt").exists()

    (malformed,) = by_reason["malformed_row"]
    lines = (root / malformed["path"]).read_text().splitlines()
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[malformed["line"] - 1])
    missing = {b["source"]: b for b in by_reason["missing_image"]}
    row = json.loads(lines[missing["mapped"]["line"] - 1])
    assert not (root / "mapped" / row["file"]).exists()
    sample = _tar_samples(root / missing["wds"]["path"])[missing["wds"]["key"]]
    assert set(sample) == {"txt", "json"}


def test_good_images_are_real_and_captioned(built: tuple[Path, dict]) -> None:
    root, summary = built
    bad_paths = _bad_paths(summary)
    bounds = summary["good_images"]
    sizes = []
    for rel in summary["sources"]["folder"]["files"]:
        if rel in bad_paths:
            continue
        with Image.open(root / rel) as im:
            im.load()
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 64, rel  # real content, not a flat image
            sizes.append(im.size)
        caption = (root / rel).with_suffix(".txt").read_text()
        assert len(caption) >= bounds["min_caption_chars"] >= 20
    rows = []
    for line in (root / "mapped" / "captions.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    for row in rows:
        assert set(row) == {"file", "caption", "license"}
        if (root / "mapped" / row["file"]).exists():
            with Image.open(root / "mapped" / row["file"]) as im:
                im.load()
                sizes.append(im.size)
    for shard in summary["sources"]["wds"]["shards"]:
        for key, sample in _tar_samples(Path(shard)).items():
            meta = json.loads(sample["json"])
            assert meta["key"] == key and meta["status"] == "success"
            assert meta["caption"] == sample["txt"].decode()
            if "jpg" in sample:
                with Image.open(io.BytesIO(sample["jpg"])) as im:
                    assert im.format == "JPEG"
                    assert im.size == (meta["width"], meta["height"])
                    sizes.append(im.size)
    assert min(min(s) for s in sizes) == bounds["min_side"]
    assert max(max(s) for s in sizes) == bounds["max_side"] <= 640
    formats = {Path(rel).suffix for rel in summary["sources"]["folder"]["files"]}
    assert {".jpg", ".png", ".webp"} <= formats
    # every caption is distinct
    captions = [p.read_text() for p in (root / "folder").glob("*.txt")] + [r["caption"] for r in rows]
    assert len(captions) == len(set(captions))


def test_small_and_runnable(tmp_path: Path, built: tuple[Path, dict]) -> None:
    root, _ = built
    assert sum(len(b) for b in _tree(root).values()) < 4 * 1024 * 1024
    out = subprocess.run(
        [sys.executable, "-m", "tools.demo.data", str(tmp_path / "cli")],
        check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    summary = json.loads(out.stdout)
    assert summary["root"] == str(tmp_path / "cli")
    assert _tree(tmp_path / "cli") == _tree(root)
