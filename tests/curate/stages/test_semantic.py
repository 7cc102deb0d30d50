"""Semantic dedup (curate/stages/semantic_dedup.py) on synthetic embeddings: the Dask result equals a
brute-force all-pairs reference (components of pairs at or above the threshold, keep the highest
score then the smallest id), whatever the partitioning. Mechanics only: no model is involved."""

from __future__ import annotations

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from curate.engine.near_groups import hamming_distance
from curate.stages.base import build_stage
from curate.stages.semantic_dedup import (SemanticDedup, measured_chance, scaled_bands, simhash_bands, simhash_sketch,
                                         sketch_distance)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _corpus(seed: int = 0, dim: int = 32):
    """60 distinct directions plus planted near copies (cosine ~0.97-0.995) of 12 of them, one
    copy chained off another copy, some rows without a score."""
    rng = np.random.default_rng(seed)
    base = _unit(rng.standard_normal((60, dim)))
    vectors, ids = list(base), [f"s:{i:03d}" for i in range(60)]
    for j, i in enumerate(range(0, 60, 5)):
        noise = _unit(rng.standard_normal(dim))
        copy = _unit(base[i] + (0.08 + 0.04 * (j % 3)) * noise)
        vectors.append(copy)
        ids.append(f"s:{100 + j:03d}")
    vectors.append(_unit(vectors[-1] + 0.05 * _unit(rng.standard_normal(dim))))  # a copy of a copy
    ids.append("s:200")
    scores = rng.uniform(0.1, 0.4, len(ids))
    scores[::7] = np.nan
    frame = pd.DataFrame({
        "id": ids,
        "_partition": np.arange(len(ids)) % 5,
        "clip_embedding": [v.astype(np.float16) for v in vectors],
        "clip_score": scores,
    })
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def _reference(frame: pd.DataFrame, threshold: float) -> dict[str, str]:
    """id -> kept id, for every dropped row: all pairs, exact components, the keep rule."""
    v = np.stack([np.asarray(x, dtype=np.float32) for x in frame["clip_embedding"]])
    v = _unit(v)
    close = (v @ v.T) >= threshold - 1e-6
    np.fill_diagonal(close, False)
    _, label = connected_components(csr_matrix(close), directed=False)
    out = {}
    ranked = frame.assign(_g=label, _s=frame["clip_score"]).sort_values(
        ["_g", "_s", "id"], ascending=[True, False, True], na_position="last", kind="stable")
    for _, group in ranked.groupby("_g", sort=False):
        if len(group) > 1:
            kept = group["id"].iloc[0]
            out.update({i: kept for i in group["id"].iloc[1:]})
    return out


@pytest.mark.parametrize("threshold", [0.95, 0.99])
def test_semantic_dedup_equals_all_pairs_reference(threshold):
    frame = _corpus()
    want = _reference(frame, threshold)
    assert want, "the corpus must plant duplicates at this threshold"
    stage = build_stage(SemanticDedup.Config(threshold=threshold))
    # embeddings stay arrays (dask would turn object columns into strings)
    with dask.config.set({"scheduler": "synchronous", "dataframe.convert-string": False}):
        for nparts in (1, 3, 8):
            got = stage.decide(dd.from_pandas(frame, npartitions=nparts)).compute()
            assert set(got["drop_reason"]) == {"duplicate"}
            assert dict(zip(got["id"], got["drop_detail"].str.rsplit(" ", n=1).str[-1])) == want
    assert stage.summary()["verified_pairs"] >= len(want)
    assert (stage.summary()["bands"], stage.summary()["bits_per_band"]) == (80, 26)  # few rows: the defaults


def test_simhash_bands_find_close_pairs_and_not_far_ones():
    rng = np.random.default_rng(1)
    a = _unit(rng.standard_normal((2000, 64)))
    close = _unit(a + 0.15 * _unit(rng.standard_normal((2000, 64))))  # cosine ~0.99
    far = _unit(rng.standard_normal((2000, 64)))
    ka, kc, kf = (simhash_bands(x, 16, 8, seed=0) for x in (a, close, far))
    assert (ka == kc).any(axis=1).mean() > 0.999
    assert (ka == kf).any(axis=1).mean() < 0.1
    assert np.array_equal(simhash_bands(a, 16, 8, seed=0), ka)  # the same planes every time


def test_embedding_decontamination_drops_what_matches_the_eval_set(tmp_path):
    """RANDOM-weight tiny CLIP (mechanics only): eval images embedded by the same model as the
    rows; rows whose image IS an eval image (cosine 1) drop as eval_overlap naming the file."""
    import io

    import pyarrow as pa
    from PIL import Image
    from skimage import data as skdata

    from curate.contract import record_schema
    from curate.recipe import RecipeError, parse_recipe
    from curate.stages.clip_score import ClipScoreStage
    from curate.stages.semantic_dedup import EmbeddingDecontaminate

    tiny = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    blobs = []
    for p in photos:
        buf = io.BytesIO()
        Image.fromarray(p).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    evals = tmp_path / "evalset"
    evals.mkdir()
    (evals / "cat.jpg").write_bytes(blobs[2])
    (evals / "rocket.jpg").write_bytes(blobs[3])
    model = {"model": "ViT-B-32", "pretrained": None, "model_overrides": tiny}
    rows = [{"id": f"t:{i}", "source": "t", "image": b, "caption": "x"} for i, b in enumerate(blobs)]
    table = ClipScoreStage(ClipScoreStage.Config(**model)).process(
        pa.Table.from_pylist(rows, schema=record_schema("pair")))
    stage = EmbeddingDecontaminate(EmbeddingDecontaminate.Config(eval_set=str(evals), threshold=0.9999, **model))
    out = stage.process(table).to_pylist()
    assert [r["drop_reason"] for r in out] == [None, None, "eval_overlap", "eval_overlap"]
    assert out[2]["drop_detail"].startswith("evalset: cat.jpg at cosine") and "rocket.jpg" in out[3]["drop_detail"]
    empty = tmp_path / "empty"
    empty.mkdir()
    data = {"name": "x", "sources": [{"kind": "image_folder", "name": "f", "path": str(tmp_path)}],
            "stages": [{"kind": "embedding_decontaminate", "eval_set": str(empty), **model}],
            "output": {"path": str(tmp_path / "o")}}
    with pytest.raises(RecipeError, match="holds no images"):
        parse_recipe(data, "<test>")


def test_scaled_bands_keep_chance_candidates_linear_and_recall_at_the_threshold():
    """`scale`: while the chance candidates cost less than more band keys (up to ~4M rows with
    orthogonal embeddings) the configured 80 x 26 stand; beyond, more bits (fewer chance
    candidates a row) with more bands, so that a pair at the threshold is missed no more often
    than 80 x 26 miss it; the candidates a row stay a fraction of the unscaled ones."""
    import math

    def miss(bands, bits, cosine=0.95):
        return (1 - (1 - math.acos(cosine) / math.pi) ** bits) ** bands

    assert scaled_bands(10_000, 80, 26, 0.95) == (80, 26) == scaled_bands(1_000_000, 80, 26, 0.95)
    for rows in (100_000_000, 1_000_000_000):
        bands, bits = scaled_bands(rows, 80, 26, 0.95)
        assert bits > 26 and bands > 80 and miss(bands, bits) <= miss(80, 26)
        assert rows * bands / 2 ** (bits + 1) < rows * 80 / 2 ** 27 / 4  # unscaled: 60 a row at 100M
    assert scaled_bands(1_000_000_000, 80, 26, 1.0)[0] == 80  # identical embeddings: bits alone


def test_the_chance_of_a_shared_key_is_measured_on_a_sample_the_same_however_partitioned():
    """Random 64-d embeddings are not orthogonal: their pairs' tail of closer angles makes a
    shared 26-bit key ~6x likelier than 2**-26 (what left 8x the expected chance candidates at
    4M rows), so `scaled_bands` picks more bits with it than with the textbook 1/2 a plane, at
    the same recall. The sample is the rows whose id hashes to 0 mod SAMPLE_EVERY: the same
    rows in any partitioning. Pairs at the threshold (duplicates) are not chance."""
    import math

    from curate.stages import semantic_dedup as sd

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((1000, 64)).astype(np.float32)
    chance = measured_chance(vectors, 0.95)
    assert 4 < chance(26) * 2**26 < 9 and chance(28) / chance(26) > 0.25
    assert measured_chance(np.ones((50, 64), np.float32), 0.95) is sd.isotropic  # all duplicates
    assert measured_chance(vectors[:1], 0.95) is sd.isotropic

    def miss(bands, bits, cosine=0.95):
        return (1 - (1 - math.acos(cosine) / math.pi) ** bits) ** bands

    textbook, measured = scaled_bands(4_000_000, 80, 26, 0.95), scaled_bands(4_000_000, 80, 26, 0.95, chance)
    assert measured[1] > textbook[1] and miss(*measured) <= miss(80, 26)
    assert measured[0] * chance(measured[1]) < 80 * chance(26) * 0.7  # fewer chance candidates a row

    frame = pd.DataFrame({"id": [f"r:{i}" for i in range(20_000)], "clip_embedding": list(np.zeros((20_000, 2)))})
    whole = sd._sampled(frame, "clip_embedding")["hash"]
    parts = pd.concat([sd._sampled(frame.iloc[i::7], "clip_embedding") for i in range(7)])["hash"]
    assert len(whole) > 5 and sorted(whole) == sorted(parts)


def test_the_sketch_test_keeps_pairs_at_the_threshold_and_drops_unrelated_ones():
    """A pair sharing a band key stays a candidate only where its 64-bit sketches (planes of
    their own) differ in at most `sketch_distance(threshold)` bits: chosen so that a pair at the
    threshold is lost with probability <= SKETCH_MISS (a binomial tail, bits apart with
    probability angle/pi each), measured here on 4,000 pairs at exactly cosine 0.95; unrelated
    random embeddings pass almost never. `scaled_bands` with the sketch keeps the defaults
    longer (the candidates it leaves cost a verification each; the pairs it tests almost
    nothing) and still scales at 100M rows, at the same recall."""
    import math

    from curate.stages import semantic_dedup as sd

    assert [sketch_distance(t) for t in (0.9, 0.95, 0.99, 1.0)] == [21, 17, 11, 0]
    t = sketch_distance(0.95)
    apart = math.acos(0.95) / math.pi
    assert 1 - sd._at_most(t, 64, apart) <= sd.SKETCH_MISS < 1 - sd._at_most(t - 1, 64, apart)

    rng = np.random.default_rng(5)
    a = _unit(rng.standard_normal((4000, 64)))
    side = _unit(rng.standard_normal((4000, 64)))
    side = _unit(side - (side * a).sum(1, keepdims=True) * a)  # orthogonal to a
    at_threshold = 0.95 * a + math.sqrt(1 - 0.95**2) * side
    far = _unit(rng.standard_normal((4000, 64)))
    sa, sc, sf = (simhash_sketch(x, seed=0) for x in (a, at_threshold, far))
    bits_apart = hamming_distance(sa, sc)
    assert abs(bits_apart.mean() - 64 * apart) < 0.3  # each bit apart with probability angle/pi
    assert (bits_apart <= t).all()
    assert (hamming_distance(sa, sf) <= t).mean() < 0.01
    assert np.array_equal(simhash_sketch(a, seed=0), sa) and not np.array_equal(simhash_sketch(a, seed=1), sa)

    chance = measured_chance(far[:1000], 0.95)
    kept = measured_chance(far[:1000], 0.95, sketch=t)
    assert kept(26) < chance(26) / 50
    assert measured_chance(far[:1], 0.95, sketch=t)(26) < sd.isotropic(26) / 1000
    assert scaled_bands(4_000_000, 80, 26, 0.95, chance, kept) == (80, 26)
    assert scaled_bands(4_000_000, 80, 26, 0.95, chance)[1] > 26  # without the sketch test: scaled at 4M
    assert scaled_bands(1_000_000_000, 80, 26, 0.95, chance, kept)[1] > 26
