"""The CLIP scoring stage (curate/stages/clip_score.py) on a tiny open_clip model built from a config.

Every model here has RANDOM weights: these tests check mechanics (columns, shapes, determinism,
batching, bad input, loading a checkpoint by path, errors at recipe load), never score quality.
No weights are downloaded: real hub names appear only in recipe-load checks of names and tags.
"""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from curate.contract import record_schema
from curate.recipe import RecipeError, parse_recipe
from curate.stages.clip_score import ClipScoreStage


# A ViT-B-32-shaped CLIP shrunk to a few thousand parameters (random weights).
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _jpeg(array: np.ndarray, mode: str | None = None, fmt: str = "JPEG") -> bytes:
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _images() -> list[bytes]:
    astro, coffee, cat = skdata.astronaut(), skdata.coffee(), skdata.chelsea()
    return [
        _jpeg(astro),
        _jpeg(coffee),
        _jpeg(cat, "L"),  # grayscale
        _jpeg(cat, "CMYK"),  # CMYK JPEG
        _jpeg(astro[:100, :100], "RGBA", "PNG"),  # alpha
        _jpeg(coffee[:3, :2]),  # tiny
    ]


def _table(images: list[bytes | None], captions: list[str | None], **extra: list) -> pa.Table:
    rows = [{"id": f"t:{i}", "source": "t", "image": img, "caption": cap, **{k: v[i] for k, v in extra.items()}}
            for i, (img, cap) in enumerate(zip(images, captions))]
    schema = record_schema("pair")
    for name in extra:
        schema = schema.append(pa.field(name, pa.string()))
    return pa.Table.from_pylist(rows, schema=schema)


def _stage(**cfg) -> ClipScoreStage:
    cfg = {"model": "ViT-B-32", "pretrained": None, "model_overrides": TINY, "batch_size": 4, **cfg}
    return ClipScoreStage(ClipScoreStage.Config(**cfg))


def test_random_weights_mechanics_scores_embeddings_and_bad_input():
    stage = _stage(extra_caption_columns=["synthetic_caption"])
    images = _images() + [b"\x89PNG\r\n\x1a\n not really a png", None]
    captions = ["an astronaut", "", "a cat " * 200, "a cat in cmyk", None, "tiny", "broken", "no image"]
    synthetic = ["a woman in a space suit", None, "a cat", "a cat", "alpha", None, None, None]
    out = stage.process(_table(images, captions, synthetic_caption=synthetic)).to_pylist()
    for row in out[:6]:
        assert row["drop_reason"] is None
        emb = np.asarray(row["clip_embedding"], dtype=np.float32)
        assert emb.shape == (32,) and abs(np.linalg.norm(emb) - 1) < 1e-2
    assert all(-1.0 <= r["clip_score"] <= 1.0 for r in out[:4] + out[5:6])
    assert out[4]["clip_score"] is None  # no caption: no score, but an embedding
    assert out[0]["clip_score_synthetic_caption"] is not None and out[1]["clip_score_synthetic_caption"] is None
    assert (out[6]["drop_stage"], out[6]["drop_reason"]) == ("clip_score", "decode_error")
    assert out[7]["clip_score"] is None and out[7]["drop_reason"] is None  # no image: not scored, not dropped


def test_scores_do_not_depend_on_batching_the_process_or_the_run():
    """Random weights come from `init_seed`, so two instances (two worker processes) agree."""
    torch.manual_seed(123)  # the process's RNG does not matter
    a = _stage(batch_size=1)
    torch.manual_seed(456)
    b = _stage(batch_size=64, decode_threads=4)
    table = _table(_images(), ["x", "y", "z", "w", "v", "u"])
    sa = np.array(a.process(table).column("clip_score").to_pylist(), dtype=np.float64)
    sb = np.array(b.process(table).column("clip_score").to_pylist(), dtype=np.float64)
    assert np.allclose(sa, sb, atol=1e-5)
    again = np.array(a.process(table).column("clip_score").to_pylist(), dtype=np.float64)
    assert np.array_equal(sa, again)


def test_weights_load_from_a_checkpoint_file_by_path(tmp_path):
    """The loading path real models take (a file instead of a hub tag), with a checkpoint we save."""
    torch.manual_seed(1)
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, **TINY)
    path = tmp_path / "tiny-clip.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = _stage(pretrained=str(path), init_seed=99)  # only the file can make the scores equal
    table = _table(_images()[:2], ["an astronaut", "coffee"])
    got = loaded.process(table).column("clip_score").to_pylist()
    model.eval()
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    loaded.ensure_setup()
    with torch.no_grad():
        imgs = torch.stack([loaded.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in _images()[:2]])
        i = torch.nn.functional.normalize(model.encode_image(imgs), dim=-1)
        t = torch.nn.functional.normalize(model.encode_text(tok(["an astronaut", "coffee"])), dim=-1)
    assert np.allclose(got, (i * t).sum(-1).numpy(), atol=1e-5)


def _recipe(tmp_path, **stage):
    return {
        "name": "clip-load", "sources": [{"kind": "image_folder", "name": "f", "path": str(tmp_path)}],
        "stages": [{"kind": "clip_score", **stage}], "output": {"path": str(tmp_path / "out")},
    }


def test_bad_model_names_fail_when_the_recipe_loads(tmp_path):
    with pytest.raises(RecipeError, match="unknown open_clip model 'ViT-Z-99'"):
        parse_recipe(_recipe(tmp_path, model="ViT-Z-99", pretrained=None), "<test>")
    with pytest.raises(RecipeError, match="neither a file nor a tag"):
        parse_recipe(_recipe(tmp_path, model="ViT-B-32", pretrained="no_such_tag"), "<test>")
    with pytest.raises(RecipeError, match="pretrained"):
        parse_recipe(_recipe(tmp_path, model="ViT-B-32"), "<test>")  # must be written, even as null
    # real names and tags load (nothing is fetched at load time)
    parse_recipe(_recipe(tmp_path, model="ViT-H-14-378-quickgelu", pretrained="dfn5b"), "<test>")
    parse_recipe(_recipe(tmp_path, model="ViT-B-32", pretrained="laion2b_s34b_b79k"), "<test>")
