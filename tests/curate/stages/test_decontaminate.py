"""Eval-set decontamination: exactly the inputs with a near copy in the eval set are dropped, with
`eval_overlap` and the eval file in the detail; a missing or empty eval set fails at recipe load."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curate.contract import record_schema
from curate.recipe import RecipeError, parse_recipe
from curate.stages.eval_decontaminate import EvalDecontaminate, list_eval_images

from skimage import data as skdata


def _encode(img: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _pictures() -> dict[str, Image.Image]:
    """12 distinct pictures: quadrants of three sample photographs."""
    out = {}
    for name in ("astronaut", "coffee", "rocket"):
        array = getattr(skdata, name)()
        h, w = array.shape[:2]
        for i, j in itertools.product(range(2), range(2)):
            out[f"{name}{i}{j}"] = Image.fromarray(np.ascontiguousarray(array[i * h // 2:(i + 1) * h // 2,
                                                                              j * w // 2:(j + 1) * w // 2]))
    return out


def _table(images: dict[str, bytes]) -> pa.Table:
    schema = record_schema("pair")
    n = len(images)
    data = {f.name: pa.nulls(n, f.type) for f in schema}
    data["id"] = pa.array([f"t:{k}" for k in images], pa.string())
    data["source"] = pa.array(["t"] * n, pa.string())
    data["image"] = pa.array(list(images.values()), pa.binary())
    return pa.table(data, schema=schema)


CONTAMINATED = ("astronaut01", "coffee10", "rocket11")


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies of three of the pictures, each changed the way benchmark images are: re-encoded,
    resized, converted."""
    pictures = _pictures()
    root = tmp_path_factory.mktemp("evalsets") / "bench-val"
    (root / "sub").mkdir(parents=True)
    a = pictures["astronaut01"]
    (root / "a.png").write_bytes(_encode(a.resize((a.width * 3 // 4, a.height * 3 // 4)), "PNG"))
    (root / "sub" / "c.webp").write_bytes(_encode(pictures["coffee10"], "WEBP", quality=70))
    r = pictures["rocket11"]
    (root / "r.jpg").write_bytes(_encode(r.resize((r.width * 3 // 2, r.height * 3 // 2)).convert("L"), quality=60))
    (root / "notes.txt").write_text("not an image: ignored by the folder listing")
    return root


def _inputs() -> dict[str, bytes]:
    return {name: _encode(img, quality=90) for name, img in _pictures().items()}


def _run(eval_set: str | Path, **config) -> dict[str, dict]:
    stage = EvalDecontaminate(EvalDecontaminate.Config(eval_set=str(eval_set), **config))
    return {r["id"].removeprefix("t:"): r for r in stage.process(_table(_inputs())).to_pylist()}


def test_exactly_the_inputs_with_a_copy_in_the_eval_set_are_dropped(eval_folder):
    rows = _run(eval_folder)
    dropped = {k: r for k, r in rows.items() if r["drop_reason"]}
    assert sorted(dropped) == sorted(CONTAMINATED)
    assert {r["drop_reason"] for r in dropped.values()} == {"eval_overlap"}
    assert {r["drop_stage"] for r in dropped.values()} == {"eval_decontaminate"}
    assert dropped["astronaut01"]["drop_detail"].startswith("bench-val: a.png at distance ")
    assert dropped["coffee10"]["drop_detail"].startswith("bench-val: sub/c.webp at distance ")
    assert dropped["rocket11"]["drop_detail"].startswith("bench-val: r.jpg at distance ")
    assert all(int(r["drop_detail"].rsplit(" ", 1)[1]) <= 4 for r in dropped.values())


def test_list_files_name_the_same_set(eval_folder, tmp_path):
    listing = tmp_path / "lists" / "val.txt"
    listing.parent.mkdir()
    listing.write_text(f"# the benchmark's images\n{eval_folder / 'a.png'}\n\n../{eval_folder.name}/sub/c.webp\n")
    # relative paths are relative to the list: place a link to the folder beside it
    (tmp_path / eval_folder.name).symlink_to(eval_folder)
    csv = tmp_path / "val.csv"
    csv.write_text(f"split,path\nval,{eval_folder / 'r.jpg'}\n")
    txt_rows = _run(listing, set_name="val-set")
    assert sorted(k for k, r in txt_rows.items() if r["drop_reason"]) == ["astronaut01", "coffee10"]
    assert txt_rows["coffee10"]["drop_detail"].startswith(f"val-set: ../{eval_folder.name}/sub/c.webp at distance")
    csv_rows = _run(csv)
    assert [k for k, r in csv_rows.items() if r["drop_reason"]] == ["rocket11"]
    assert csv_rows["rocket11"]["drop_detail"].startswith(f"val: {eval_folder / 'r.jpg'} at distance")


def _recipe(eval_set: str) -> dict:
    return {"name": "t", "sources": [{"kind": "image_folder", "name": "f", "path": "/nonexistent"}],
            "stages": [{"kind": "eval_decontaminate", "eval_set": eval_set}], "output": {"path": "/tmp/out"}}


def test_missing_or_empty_eval_set_fails_at_recipe_load(tmp_path):
    with pytest.raises(RecipeError, match=r"stages\.0\.eval_decontaminate\.eval_set.*no such folder or list file"):
        parse_recipe(_recipe(str(tmp_path / "absent")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("no images here")
    with pytest.raises(RecipeError, match="holds no images"):
        parse_recipe(_recipe(str(tmp_path / "empty")))
    (tmp_path / "empty.txt").write_text("# nothing listed\n")
    with pytest.raises(RecipeError, match="holds no images"):
        parse_recipe(_recipe(str(tmp_path / "empty.txt")))
    (tmp_path / "gone.txt").write_text("missing.jpg\n")
    with pytest.raises(RecipeError, match=r"listed file\(s\) not found.*missing\.jpg"):
        parse_recipe(_recipe(str(tmp_path / "gone.txt")))


def test_an_eval_image_that_does_not_decode_fails_setup_by_name(tmp_path):
    (tmp_path / "ok.png").write_bytes(_encode(_pictures()["coffee00"], "PNG"))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert [name for name, _ in list_eval_images(tmp_path)] == ["broken.jpg", "ok.png"]
    stage = EvalDecontaminate(EvalDecontaminate.Config(eval_set=str(tmp_path)))
    with pytest.raises(ValueError, match="broken.jpg cannot be hashed: decode_error"):
        stage.ensure_setup()


def test_rows_without_a_usable_image_are_dropped_with_the_image_codes(eval_folder):
    stage = EvalDecontaminate(EvalDecontaminate.Config(eval_set=str(eval_folder)))
    rows = stage.process(_table({"bad": b"GIF89a broken", "none": b""})).to_pylist()
    assert [(r["drop_stage"], r["drop_reason"]) for r in rows] == [
        ("eval_decontaminate", "decode_error"), ("eval_decontaminate", "missing_image")]
