"""Embedding-based stages: semantic image dedup, and eval-set decontamination by embedding.

`semantic_dedup`: images whose embeddings (from `clip_score`) are closer than a cosine threshold
are one group; one is kept per group. A global stage through Dask (curate/engine/near_groups.py's
four steps), never an all-pairs matrix. Its items are the pairs and, with `docs: true`, the
image segments of docs (their embeddings from `<embedding_column>_per_image`, their scores from
their segments), grouped by kind (`across_kinds: true`: together, so that an image kept in a
pair removes its copy from a document). A dropped pair is dropped whole, a doc's duplicate image
removes its segment (`duplicate`; a doc left with no segment is dropped `empty_document`), as
doc_image_dedup does.

Candidates by random-hyperplane LSH (SimHash): `bands` x `bits_per_band` fixed random
hyperplanes (drawn from `seed`, so every worker and every run uses the same ones); a row's key
in band b is the sign pattern of its embedding against that band's planes. Two embeddings at
angle t agree on one plane with probability 1 - t/pi, so they share a band key with probability
p = (1 - t/pi) ** bits_per_band and are missed by every band with (1 - p) ** bands. The
defaults (80 bands of 26 bits) are tuned for the default threshold 0.95: a pair at cosine 0.95
is found with probability 0.994 (0.9999 at 0.98), and two unrelated embeddings (cosine near 0)
become candidates with probability 80 / 2**26 = 1.2e-6, so at 100k rows the candidates stay
within twice the true pairs and the cost grows about linearly (tools/bench/semantic_scaling:
10x the rows, 9x the time). The price is 80 band keys a row in the shuffle. Shorter bands are
a trap: with 8-bit bands 6% of ALL pairs are candidates (quadratic). For a lower threshold
lower `bits_per_band` (at 0.9 these defaults find only 76% of the pairs; 16 bits x 64 bands find
99%), and for a corpus whose images sit close together (real CLIP embeddings of a narrow domain)
raise it: chance candidates grow with (1 - angle/pi) ** bits_per_band.
Chance pairs also grow with the rows: n rows make about n * bands * c(bits) / 2 a row, c(k)
the chance that two unrelated embeddings share a k-bit key, quadratic in all. Most never reach
the verification: every row also carries a sketch, a 64-bit SimHash of planes of its own, and a
pair that shares a band key stays a candidate only where the two sketches differ in at most
`sketch_distance(threshold)` bits (`band_pairs`' `sketch`), tested in the bucket itself. Bits
differ with probability angle/pi each, so a pair at the threshold fails the test with
probability at most SKETCH_MISS (1e-4; 17 bits at 0.95) while ~1% of random 64-d embeddings'
chance pairs pass it: the verification (two joins carrying embeddings, ~8x a band key's work)
sees the true pairs and few others. Measured (tools/bench/global_passes, 64-d): 4M rows made
58M chance pairs and 1.2M candidates (0.4M true) in 525 s, where without the test 38M
candidates (90 x 27 bits) took 837 s; 8 bytes more in each band row.
With `scale: true` (the default) the pass counts the rows that reach it, measures c(k) on a
sample of their embeddings (~2,000 rows chosen by a hash of their ids, so the same rows however
they are partitioned: `measured_chance`), and picks the `bits_per_band` whose measured work a
row (band keys, pairs tested on their sketches, and candidates left to verify) is least, with
the `bands` that miss a pair at `threshold` no more often than the configured bands and bits do
(`scaled_bands`). c(k) is measured because embeddings are rarely orthogonal: for random 64-d
ones it is 6x 2**-26 at 26 bits (8x at 28), real CLIP embeddings of unrelated images sit closer
still, and the 1/2 a plane of the textbook model left 24M chance candidates at 4M rows where it
expected 3M. For random 64-d embeddings: the defaults up to ~5M rows, 27 x 90 at 10M, 31 x
139 at 100M, 35 x 213 at 1B: LSH's n ** (1 + rho) instead of n ** 2 (rho ~0.18 here), the sketch test keeping the
work that grows faster than the rows a small part of a row's. The bands and bits used, the rows
sampled and the expected chance pairs and candidates a row are in the stage's summary.
Each candidate pair is then verified exactly: cosine of the two (normalised) embeddings
>= `threshold`. Groups are the connected components of the verified pairs.

`embedding_decontaminate` (below) drops pairs whose image embedding is within a cosine threshold
of an evaluation image embedded by the same model: the semantic counterpart of the perceptual-hash
`eval_decontaminate` (curate/stages/eval_decontaminate.py), which catches re-encoded and resized
copies; this one also catches crops, flips and re-photographs, as far as the model sees them.

Keep rule: the highest `score_column` in the group (e.g. the CLIP score: the best-captioned of
the near-identical images), nulls last, then the smallest id. The others are dropped with
`duplicate`, the detail naming the kept id and the threshold. Rows without an embedding take no
part. With random weights (tests, demo) the embeddings mean nothing: the mechanics still hold.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.documents import PER_IMAGE
from curate.stages.base import GlobalStage, RowStage, StageConfig, register
from curate.stages.clip_score import ClipScoreStage
from curate.stages.doc_images import SEGMENTS, image_decisions, image_items
from curate.stages.eval_decontaminate import EVAL_OVERLAP, EvalSetConfig, list_eval_images
from curate.engine.near_groups import near_duplicate_decisions

_COLUMN = r"^[a-z][a-z0-9_]*$"


@functools.lru_cache(maxsize=8)
def _planes(count: int, dim: int, seed: int | tuple[int, ...]) -> np.ndarray:
    """`count` fixed Gaussian planes in `dim` dimensions (float32), drawn from `seed`: the same in
    every process; drawn once a process (1024-d embeddings: 2M normals for 80 x 26 planes)."""
    planes = np.random.default_rng(list(seed) if isinstance(seed, tuple) else seed).standard_normal((count, dim))
    planes = planes.astype(np.float32)
    planes.flags.writeable = False
    return planes


def _codes(signs: np.ndarray) -> np.ndarray:
    """(n, groups) int64 of (n, groups, bits <= 64) booleans: bit j of a code is sign j (packed
    eight to a byte, not as an (n, groups, bits) int64 product: 8x less memory to traverse)."""
    n, groups, bits = signs.shape
    packed = np.packbits(signs, axis=2, bitorder="little")
    codes = np.zeros((n, groups, 8), dtype=np.uint8)
    codes[..., : packed.shape[2]] = packed
    return codes.view("<i8")[..., 0].astype(np.int64, copy=False)


def simhash_bands(vectors: np.ndarray, bands: int, bits: int, seed: int) -> np.ndarray:
    """(n, bands) int64 band keys of the rows of `vectors` (n x dim): for band b, the bits of the
    signs of the vectors against planes b*bits .. (b+1)*bits-1 of a fixed Gaussian draw."""
    n, dim = vectors.shape
    signs = (vectors.astype(np.float32) @ _planes(bands * bits, dim, seed).T) >= 0  # (n, bands * bits)
    return _codes(signs.reshape(n, bands, bits))


# The work of a pass in band keys of a row (the unit), measured with the global-passes bench
# (64-d, 1M and 4M rows, `task_seconds`): a band key ~0.55 us of a worker (its bits, melt,
# shuffle, its share of the bucket), a pair tested on its sketch in a bucket ~0.35-0.43 us (the
# bucket's time at 1M and 4M solved for band rows and pairs), a candidate verified ~11 us before
# the sketch test (two joins carrying both embeddings, then the cosine). At 4M rows 80 bands cost
# 80 + 10 (14.6 chance pairs) + 1.6 (0.2 candidates); 27 bits, 90 bands, more.
CANDIDATE_COST = 8
PAIR_COST = 0.7
MAX_SCALED_BANDS = 512
SAMPLE_EVERY = 1024  # `scale`'s sample: the rows whose id hashes to 0 modulo this...
SAMPLE_ROWS = 2000  # ...the SAMPLE_ROWS of them with the smallest hashes
SKETCH_BITS = 64  # the sketch: a SimHash of this many planes of its own (one int64 a row)
SKETCH_MISS = 1e-4  # the most often the sketch test may lose a pair at the threshold


def simhash_sketch(vectors: np.ndarray, seed: int) -> np.ndarray:
    """(n,) int64 sketches of the rows of `vectors`: the signs against SKETCH_BITS planes drawn
    apart from the bands' (their own stream of `seed`). Two rows at angle t differ in each bit
    with probability t/pi, independently of their band keys."""
    signs = (vectors.astype(np.float32) @ _planes(SKETCH_BITS, vectors.shape[1], (seed, 1)).T) >= 0
    return _codes(signs[:, None, :])[:, 0]


def _at_most(t: int, n: int, p: np.ndarray | float) -> np.ndarray:
    """P(Binomial(n, p) <= t), elementwise in p."""
    p = np.asarray(p, dtype=np.float64)
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(t + 1))


def sketch_distance(threshold: float) -> int:
    """The fewest differing sketch bits that lose a pair at cosine `threshold` with probability
    at most SKETCH_MISS (its bits differ with probability angle/pi each: a binomial tail). At
    0.95: 17 of 64, where two orthogonal rows pass with probability 1e-5."""
    apart = math.acos(min(1.0, threshold)) / math.pi
    return next(t for t in range(SKETCH_BITS + 1) if 1 - _at_most(t, SKETCH_BITS, apart) <= SKETCH_MISS)


def isotropic(bits: int) -> float:
    """The chance that two unrelated embeddings share a band key of `bits` bits when a plane
    agrees half the time (orthogonal embeddings)."""
    return 0.5 ** bits


def scaled_bands(rows: int, bands: int, bits: int, threshold: float,
                 chance: Callable[[int], float] = isotropic,
                 kept: Callable[[int], float] | None = None) -> tuple[int, int]:
    """(bands, bits_per_band) for `rows` rows: the bits (never fewer than given) whose work per
    row is least, each with the bands that miss a pair at cosine `threshold` at most as often as
    the given bands and bits do. The work a row: its band keys, PAIR_COST for each pair that
    shares one by chance (rows * bands * chance(bits) / 2 a row, `chance(k)` the probability that
    two unrelated rows share a k-bit key), and CANDIDATE_COST for each of those left to verify
    (`kept(k)`: the probability that they share one and pass the sketch test; without a sketch
    test, every one). At most MAX_SCALED_BANDS bands and 62 bits."""
    kept = kept or chance
    agree = 1 - math.acos(min(1.0, threshold)) / math.pi  # one plane, a pair at the threshold
    miss = (1 - agree ** bits) ** bands

    def cost(b: int, k: int) -> float:
        return b + rows * b / 2 * (PAIR_COST * chance(k) + CANDIDATE_COST * kept(k))

    while bits < 62 and rows * bands * chance(bits) / 2 >= 0.01:  # (below: nothing left to gain)
        found = agree ** (bits + 1)
        need = bands if found >= 1 or miss <= 0 else max(bands, math.ceil(math.log(miss) / math.log1p(-found)))
        if need > MAX_SCALED_BANDS or cost(need, bits + 1) >= cost(bands, bits):
            break
        bands, bits = need, bits + 1
    return bands, bits


def _sampled(part: pd.DataFrame, column: str) -> pd.DataFrame:
    """The rows of `part` whose id hashes to 0 modulo SAMPLE_EVERY: their hash and embedding."""
    hashes = pd.util.hash_pandas_object(part["id"], index=False).to_numpy()
    keep = hashes % np.uint64(SAMPLE_EVERY) == 0
    return pd.DataFrame({"hash": hashes[keep], column: part[column].to_numpy()[keep]})


def measured_chance(sample: np.ndarray, threshold: float,
                    sketch: int | None = None) -> Callable[[int], float]:
    """`chance(k)` for `scaled_bands` measured on `sample` (rows x dim embeddings): the mean of
    (1 - angle/pi) ** k over its pairs below the threshold (the pairs above it are duplicates,
    found on purpose). Embeddings are rarely orthogonal (real CLIP embeddings of unrelated images
    sit at cosines of 0.1-0.3, and even random 64-d ones spread around 0): the tail of closer
    pairs dominates the mean, 6x the isotropic figure at 26 bits for random 64-d embeddings, 8x
    at 28, which made the chance candidates grow faster than the rows. Isotropic without pairs.
    With `sketch` (a sketch distance), the chance that they share a key AND their sketches
    differ in at most that many bits (`kept` of `scaled_bands`): ~1% of the former at 0.95."""
    passes = (lambda apart: _at_most(sketch, SKETCH_BITS, apart)) if sketch is not None else (lambda apart: 1.0)
    fallback = (lambda k: isotropic(k) * float(passes(0.5))) if sketch is not None else isotropic
    if len(sample) < 2:
        return fallback
    unit = sample / np.maximum(np.linalg.norm(sample, axis=1, keepdims=True), 1e-12)
    cosines = (unit @ unit.T)[np.triu_indices(len(unit), k=1)]
    cosines = cosines[cosines < threshold]
    if not len(cosines):
        return fallback
    apart = np.arccos(np.clip(cosines, -1.0, 1.0)).astype(np.float64) / math.pi
    agree, weight = 1 - apart, passes(apart)
    return functools.lru_cache(maxsize=None)(lambda k: float(np.mean(agree ** k * weight)))  # ~2M pairs: once a k


def _with_columns(part: pd.DataFrame, names: list[str], values: np.ndarray) -> pd.DataFrame:
    """`part` and one column per name (a column of `values` each), joined at once: assigning a
    hundred band columns one by one fragments the frame (pandas' PerformanceWarning, and slower)."""
    return pd.concat([part, pd.DataFrame(values, columns=names, index=part.index)], axis=1)


def _stack(column: pd.Series) -> np.ndarray:
    return np.stack([np.asarray(v, dtype=np.float32) for v in column]) if len(column) else np.empty((0, 0))


class _CosineAtLeast:
    """The verification of a candidate pair: cosine of the embeddings >= threshold (picklable)."""

    def __init__(self, column: str, threshold: float):
        self.column, self.threshold = column, threshold

    def __call__(self, left: pd.DataFrame, right: pd.DataFrame) -> np.ndarray:
        if not len(left):
            return np.zeros(0, dtype=bool)
        a, b = _stack(left[self.column]), _stack(right[self.column])
        a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return (a * b).sum(axis=1) >= self.threshold - 1e-6


@register
class SemanticDedup(GlobalStage):
    """Drops all but one of each group of images whose embeddings (from `clip_score`) are within
    a cosine `threshold` (a global pass): pairs whole, a doc's image by its segment."""

    name = "semantic_dedup"
    kinds = ("pair", "doc")  # docs with `docs: true` only (__init__)

    class Config(StageConfig):
        kind: Literal["semantic_dedup"] = "semantic_dedup"
        embedding_column: str = Field("clip_embedding", pattern=_COLUMN)
        threshold: float = Field(0.95, gt=0, le=1)  # cosine at or above which two images are one
        score_column: str | None = Field("clip_score", pattern=_COLUMN)
        bands: int = Field(80, ge=1, le=256)
        bits_per_band: int = Field(26, ge=1, le=62)
        seed: int = 0
        # raise bits_per_band and bands (never below the given) where the rows reaching the pass
        # would make chance candidates (their rate measured on a sample of the embeddings) cost
        # more than band keys, keeping the recall at `threshold`; the manifest's summary of the
        # stage has the values used
        scale: bool = Field(True, json_schema_extra={"added_later": True})
        # the image segments of docs too (their embeddings from clip_score's `_per_image` column)
        docs: bool = Field(False, json_schema_extra={"added_later": True})
        # with docs: False groups pairs with pairs and a doc's images with docs' images (each
        # kind's own dedup, as DataComp's and OBELICS's); True: a doc's image and a pair's too
        across_kinds: bool = Field(False, json_schema_extra={"added_later": True})

    def __init__(self, config: Config):
        super().__init__(config)
        if not config.docs:  # the runner reads only the pairs' partitions
            self.kinds = ("pair",)  # type: ignore[misc]

    config: Config

    @property
    def input_columns(self) -> list[str]:
        cfg = self.config
        return [cfg.embedding_column, *([cfg.score_column] if cfg.score_column else [])]

    @property
    def columns(self) -> list[str]:  # type: ignore[override]
        # with docs, their images' embeddings and the segments naming them (and their scores)
        docs = [self.config.embedding_column + PER_IMAGE, SEGMENTS] if self.config.docs else []
        return [*self.input_columns, *docs]

    def decide(self, live: Any) -> Any:
        cfg = self.config
        items_meta = image_items(live._meta, cfg.embedding_column, cfg.score_column, PER_IMAGE)
        docs = live
        live = live.map_partitions(image_items, cfg.embedding_column, cfg.score_column, PER_IMAGE, meta=items_meta)
        bands, bits = cfg.bands, cfg.bits_per_band
        within = sketch_distance(cfg.threshold)
        self._stats: dict[str, Any] = {"sketch_bits": SKETCH_BITS, "sketch_distance": within}
        if cfg.scale:  # the rows, and a sample of their embeddings (one read: dask shares it)
            import dask  # ~0.1 s of import, paid where a global pass runs (workers import the stages)

            meta = pd.DataFrame({"hash": pd.Series(dtype=np.uint64), cfg.embedding_column: pd.Series(dtype=object)})
            rows, sample = dask.compute(live.map_partitions(len).sum(),
                                        live.map_partitions(_sampled, cfg.embedding_column, meta=meta))
            sample = sample.sort_values("hash", kind="stable").head(SAMPLE_ROWS)
            vectors = _stack(sample[cfg.embedding_column])
            chance = measured_chance(vectors, cfg.threshold)
            kept = measured_chance(vectors, cfg.threshold, sketch=within)
            bands, bits = scaled_bands(int(rows), bands, bits, cfg.threshold, chance, kept)
            self._stats.update(sampled_rows=len(sample),
                               chance_pairs_per_row=round(int(rows) * bands * chance(bits) / 2, 3),
                               chance_candidates_per_row=round(int(rows) * bands * kept(bits) / 2, 4))
        band_names = [f"_band{b}" for b in range(bands)]

        def with_bands(part: pd.DataFrame) -> pd.DataFrame:
            vectors = _stack(part[cfg.embedding_column])
            if len(part):
                keys = simhash_bands(vectors, bands, bits, cfg.seed)
                sketches = simhash_sketch(vectors, cfg.seed)
            else:
                keys, sketches = np.empty((0, bands), dtype=np.int64), np.empty(0, dtype=np.int64)
            if not cfg.across_kinds:  # a doc image's keys apart from every pair's: bit 62 (keys use <= 62 bits)
                keys = keys | (part["_segment"].to_numpy() >= 0).astype(np.int64)[:, None] << np.int64(62)
            return _with_columns(part, [*band_names, "_sketch"], np.column_stack([keys, sketches]))

        self._stats.update(bands=bands, bits_per_band=bits)
        drops = near_duplicate_decisions(
            live,
            add_bands=with_bands,
            bands=band_names,
            columns=[cfg.embedding_column],
            accept=_CosineAtLeast(cfg.embedding_column, cfg.threshold),
            detail=f"image embedding within cosine {cfg.threshold:g} of {{kept}}",
            score_column=cfg.score_column,
            stats=self._stats,
            sketch="_sketch",
            sketch_distance=within,
        )
        return image_decisions(drops, docs) if cfg.docs else drops  # pairs only: their decisions as they are

    def summary(self) -> dict[str, Any]:
        return dict(getattr(self, "_stats", {}))


class EmbeddingDecontaminateConfig(EvalSetConfig):
    kind: Literal["embedding_decontaminate"] = "embedding_decontaminate"
    threshold: float = Field(0.95, gt=0, le=1)
    embedding_column: str = Field("clip_embedding", pattern=_COLUMN)
    # The model that made `embedding_column`: the same fields as that clip_score stage's
    # (another model's embeddings are not comparable; nothing here can check that).
    model: str
    pretrained: str | None
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    init_seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra={"execution_only": True})


@register
class EmbeddingDecontaminate(RowStage):
    """Drops pairs whose image embedding is within `threshold` (cosine) of an eval image's."""

    name = "embedding_decontaminate"
    kinds = ("pair",)
    Config = EmbeddingDecontaminateConfig
    config: EmbeddingDecontaminateConfig

    @property
    def input_columns(self) -> list[str]:
        return [self.config.embedding_column]

    def setup(self) -> None:
        cfg = self.config
        clip = ClipScoreStage(ClipScoreStage.Config(
            model=cfg.model, pretrained=cfg.pretrained, model_overrides=cfg.model_overrides,
            init_seed=cfg.init_seed, precision=cfg.precision, device=cfg.device, resources=cfg.resources))
        clip.ensure_setup()
        names, tensors = [], []
        for name, path in list_eval_images(cfg.eval_set):
            prepared = clip._prepare(path.read_bytes())
            if not hasattr(prepared, "shape"):
                raise ValueError(f"eval set {cfg.eval_set}: {name} does not decode: {prepared.detail}")
            names.append(name)
            tensors.append(prepared)
        vectors = [clip._images(tensors[i : i + 64]).cpu().numpy() for i in range(0, len(tensors), 64)]
        self.names, self.eval = names, np.concatenate(vectors).astype(np.float32)
        self.label = cfg.label
        clip.pool.shutdown(wait=False)

    def process(self, table: pa.Table) -> pa.Table:
        self.ensure_setup()
        cfg = self.config
        live = pc.indices_nonzero(pc.and_(pc.is_null(table.column("drop_reason")),
                                          pc.is_valid(table.column(cfg.embedding_column)))).to_pylist()
        if not live:
            return table
        column = table.column(cfg.embedding_column)
        v = np.stack([np.asarray(column[i].as_py(), dtype=np.float32) for i in live])
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        sims = v @ self.eval.T
        best = sims.argmax(axis=1)
        cols = {c: table.column(c).to_pylist() for c in ("drop_stage", "drop_reason", "drop_detail")}
        for k, (row, j) in enumerate(zip(live, best.tolist())):
            cos = float(sims[k, j])
            if cos >= cfg.threshold - 1e-6:
                cols["drop_stage"][row] = self.name
                cols["drop_reason"][row] = EVAL_OVERLAP
                cols["drop_detail"][row] = f"{self.label}: {self.names[j]} at cosine {cos:.4f}"
        for c, values in cols.items():
            i = table.schema.get_field_index(c)
            table = table.set_column(i, table.schema.field(i), pa.array(values, pa.string()))
        return table


__all__ = ["EmbeddingDecontaminate", "SemanticDedup", "simhash_bands"]
