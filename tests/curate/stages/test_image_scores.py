"""The image score stages (curate/stages/image_scores.py): heads over CLIP embeddings and a watermark
model, on a tiny open_clip model and a tiny timm model built from configs.

Every model and head here has RANDOM weights (tools.convert_heads.write_random_head): these tests
check mechanics (columns, the published layer chain, reading clip_score's column or the head's own
tower, refusing heads that do not fit, drops), never the quality of a score.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from skimage import data as skdata

from curate.contract import record_schema
from curate.recipe import RecipeError, parse_recipe
from curate.stages.base import build_stage
from curate.stages.clip_score import ClipScoreStage
from curate.stages.image_scores import AestheticScore, NsfwScore, WatermarkScore
from curate.stages.score_heads import read_safetensors_header
from curate.stages.score_filter import ScoreFilter
from tools.convert_heads import write_random_head

# test_clip.py's tiny ViT-B-32-shaped CLIP (random weights): 32-wide embeddings
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLIP = {"kind": "clip_score", "model": "ViT-B-32", "pretrained": None, "model_overrides": TINY}


def _jpeg(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _table() -> pa.Table:
    """Six live images, one that does not decode, one row without image, one dropped earlier."""
    astro, coffee, cat = skdata.astronaut(), skdata.coffee(), skdata.chelsea()
    images = [_jpeg(astro), _jpeg(coffee), _jpeg(cat), _jpeg(astro[::4, ::4]), _jpeg(cat[:40, :90], "PNG"),
              _jpeg(coffee[:3, :2]), b"\xff\xd8 not a jpeg", None, _jpeg(cat)]
    rows = [{"id": f"t:{i}", "source": "t", "image": img, "caption": f"caption {i}"} for i, img in enumerate(images)]
    rows[-1].update(drop_stage="earlier", drop_reason="too_small", drop_detail="x")
    return pa.Table.from_pylist(rows, schema=record_schema("pair"))


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heads")
    return {kind: write_random_head(folder / f"{kind}.safetensors", kind, model, None, dim, seed=7)
            for kind, model, dim in [("aesthetic", "ViT-B-32", 32), ("nsfw", "ViT-B-32", 32),
                                     ("watermark", "test_efficientnet", None)]}


@pytest.fixture(scope="module")
def embedded() -> pa.Table:
    return build_stage(ClipScoreStage.Config(**CLIP)).process(_table())


def _recipe(tmp_path, *stages):
    return {"name": "scores", "sources": [{"kind": "image_folder", "name": "f", "path": str(tmp_path)}],
            "stages": list(stages), "output": {"path": str(tmp_path / "out")}}


def test_random_heads_score_clip_scores_embeddings_as_the_published_modules_do(heads, embedded):
    """Mechanics: float32 columns for the live rows with an embedding, nothing for the others; the
    chain equals the published architectures (improved-aesthetic-predictor's nn.Sequential, the
    NSFW detector's Normalization + Linear/ReLU + sigmoid) run on the normalised embeddings."""
    aesthetic = build_stage(AestheticScore.Config(weights=str(heads["aesthetic"])))
    nsfw = build_stage(NsfwScore.Config(weights=str(heads["nsfw"])))
    out = nsfw.process(aesthetic.process(embedded))
    assert out.schema.field("aesthetic_score").type == pa.float32() == out.schema.field("nsfw_score").type
    a, n = out.column("aesthetic_score").to_pylist(), out.column("nsfw_score").to_pylist()
    assert all(v is not None for v in a[:6]) and a[6:] == [None] * 3  # decode_error, no image, dropped
    assert all(0 < v < 1 for v in n[:6]) and len(set(n[:6])) == 6
    assert out.column("drop_reason").to_pylist() == embedded.column("drop_reason").to_pylist()

    x = torch.nn.functional.normalize(torch.tensor(np.array(embedded.column("clip_embedding").to_pylist()[:6],
                                                            np.float32)), dim=-1)
    t = load_file(heads["aesthetic"])
    linear = [torch.nn.Linear(t[f"layers.{i}.weight"].shape[1], t[f"layers.{i}.weight"].shape[0]) for i in range(5)]
    published = torch.nn.Sequential(linear[0], torch.nn.Dropout(0.2), linear[1], torch.nn.Dropout(0.2),
                                    linear[2], torch.nn.Dropout(0.1), linear[3], linear[4]).eval()
    published.load_state_dict({f"{j}.{p}": t[f"layers.{i}.{p}"] for i, j in enumerate([0, 2, 4, 6, 7])
                               for p in ("weight", "bias")})
    t = load_file(heads["nsfw"])
    h = (x - t["input.mean"]) / (t["input.variance"].sqrt() + 1e-10)
    for i in range(4):
        h = h @ t[f"layers.{i}.weight"].T + t[f"layers.{i}.bias"]
        h = torch.relu(h) if i < 3 else torch.sigmoid(h)
    with torch.no_grad():
        assert np.allclose(a[:6], published(x)[:, 0].numpy(), atol=1e-4)
    assert np.allclose(n[:6], h[:, 0].numpy(), atol=1e-5)


def test_own_tower_pass_gives_the_scores_of_clip_scores_column(heads, embedded):
    """embedding_column null: the head embeds with its own tower (clip_score's code, the same
    random init), adds only its column, and drops what does not decode."""
    from_column = build_stage(AestheticScore.Config(weights=str(heads["aesthetic"]))).process(embedded)
    tower = build_stage(AestheticScore.Config(weights=str(heads["aesthetic"]), embedding_column=None,
                                              model_overrides=TINY, batch_size=2))
    out = tower.process(_table())
    assert set(out.column_names) == set(_table().column_names) | {"aesthetic_score"}
    assert np.allclose(out.column("aesthetic_score").to_pylist()[:6],
                       from_column.column("aesthetic_score").to_pylist()[:6], atol=1e-5)
    assert out.column("drop_stage").to_pylist()[6:] == ["aesthetic_score", None, "earlier"]
    assert out.column("drop_reason").to_pylist()[6] == "decode_error"


def test_score_cut_drops_with_its_code(heads, embedded):
    """score_filter with max_score on the NSFW column: the rows above it go with `nsfw_score_high`."""
    scored = build_stage(NsfwScore.Config(weights=str(heads["nsfw"]))).process(embedded)
    scores = scored.column("nsfw_score").to_pylist()
    cut = float(np.median(scores[:6]))
    out = build_stage(ScoreFilter.Config(column="nsfw_score", max_score=cut)).process(scored).to_pylist()
    high = [r for r in out[:6] if r["drop_reason"]]
    assert len(high) == 3 and {r["drop_reason"] for r in high} == {"nsfw_score_high"}
    assert all(r["nsfw_score"] > cut and r["drop_detail"].endswith(f"> {cut:g}") for r in high)


def test_recipe_refuses_a_column_from_another_model(tmp_path, heads):
    """The head reads clip_score's column only if that stage ran the head's model, weights and width."""
    other = write_random_head(tmp_path / "l14.safetensors", "aesthetic", "ViT-L-14", "openai", 768)
    wide = write_random_head(tmp_path / "b32-64.safetensors", "nsfw", "ViT-B-32", None, 64)
    parse_recipe(_recipe(tmp_path, CLIP, {"kind": "aesthetic_score", "weights": str(heads["aesthetic"])}), "<t>")
    cases = [
        ([CLIP, {"kind": "aesthetic_score", "weights": str(other)}], "expects embeddings of model ViT-L-14, "
         "pretrained openai.*comes from stage 'clip_score' \\(model ViT-B-32, pretrained null"),
        ([CLIP, {"kind": "nsfw_score", "weights": str(wide)}], "embeds in 32 dimensions.*takes 64"),
        ([{"kind": "aesthetic_score", "weights": str(heads["aesthetic"])}], "no earlier stage adds"),
    ]
    for stages, message in cases:
        with pytest.raises(RecipeError, match=f"stages.{len(stages) - 1}.*{message}"):
            parse_recipe(_recipe(tmp_path, *stages), "<t>")
    # an offline copy of the weights: the same checkpoint file named by both stages stands for them
    ckpt = tmp_path / "b32-copy.pt"
    ckpt.write_bytes(b"only its path is checked at load")
    copy = {**CLIP, "pretrained": str(ckpt)}
    parse_recipe(_recipe(tmp_path, copy, {"kind": "aesthetic_score", "weights": str(heads["aesthetic"]),
                                          "pretrained": str(ckpt)}), "<t>")
    with pytest.raises(RecipeError, match="pretrained null.*comes from.*pretrained .*b32-copy.pt"):
        parse_recipe(_recipe(tmp_path, copy, {"kind": "aesthetic_score", "weights": str(heads["aesthetic"])}), "<t>")
    # its own tower instead: the same mismatch is a load error of the tower's width
    with pytest.raises(RecipeError, match="the tower ViT-B-32 embeds in 32 dimensions.*takes 64"):
        parse_recipe(_recipe(tmp_path, {"kind": "nsfw_score", "weights": str(wide), "embedding_column": None,
                                        "model_overrides": TINY}), "<t>")


def test_head_files_that_do_not_fit_fail_at_load_naming_the_key(tmp_path, heads):
    """A pickle (torch.save's zip, or bare), a head whose first layer is not the declared embedding
    width, a head of another task, another embedding model named in the stage."""
    state = load_file(heads["aesthetic"])
    torch.save(state, tmp_path / "head.pth")
    (tmp_path / "head.safetensors").write_bytes(pickle.dumps({"layers.0.weight": [1.0]}))  # the suffix lies
    meta, _ = read_safetensors_header(heads["aesthetic"])
    save_file(state, str(tmp_path / "narrow.safetensors"), metadata={**meta, "embedding_dim": "24"})
    cases = [
        ({"weights": str(tmp_path / "head.pth")}, "weights.*zip archive .*pickled weights are never loaded"),
        ({"weights": str(tmp_path / "head.safetensors")}, "weights.*is a pickle"),
        ({"weights": str(tmp_path / "narrow.safetensors")}, "weights.*first layer takes 32 inputs, but metadata "
         "embedding_dim is 24"),
        ({"weights": str(heads["nsfw"])}, "weights.*metadata task is 'nsfw'"),
        ({"weights": str(tmp_path / "missing.safetensors")}, "weights.*no such file"),
        ({"weights": str(heads["aesthetic"]), "model": "ViT-L-14"}, "model 'ViT-L-14' is not the embedding model"),
        ({"weights": str(heads["aesthetic"]), "pretrained": "openai"}, "pretrained 'openai' is neither the head's"),
    ]
    for options, message in cases:
        with pytest.raises(RecipeError, match=f"stages.0.*{message}"):
            parse_recipe(_recipe(tmp_path, {"kind": "aesthetic_score", "embedding_column": None, **options}), "<t>")
    with pytest.raises(RecipeError, match="stages.0.watermark_score.weights.*task is 'aesthetic'"):
        parse_recipe(_recipe(tmp_path, {"kind": "watermark_score", "weights": str(heads["aesthetic"])}), "<t>")


def test_watermark_random_tiny_timm_model_mechanics(heads):
    """A random test_efficientnet with the published classifier shape: probabilities in (0, 1),
    independent of batching; undecodable bytes dropped, rows without image unscored."""
    one = build_stage(WatermarkScore.Config(weights=str(heads["watermark"]), batch_size=1)).process(_table())
    many = build_stage(WatermarkScore.Config(weights=str(heads["watermark"]), batch_size=8,
                                             decode_threads=3)).process(_table())
    scores = one.column("watermark_score").to_pylist()
    assert one.schema.field("watermark_score").type == pa.float32()
    assert all(0 < s < 1 for s in scores[:6]) and scores[6:] == [None] * 3
    assert np.allclose(scores[:6], many.column("watermark_score").to_pylist()[:6], atol=1e-5)
    assert one.column("drop_reason").to_pylist()[6:] == ["decode_error", None, "too_small"]
    assert one.column("drop_stage").to_pylist()[6] == "watermark_score"
