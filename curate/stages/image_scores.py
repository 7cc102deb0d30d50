"""Image scores: an aesthetic and an NSFW score from CLIP image embeddings, a watermark probability
from an image model. Each stage only adds its float32 `column` (null where a row has no image).

- `aesthetic_score`: LAION's improved aesthetic predictor (an MLP regression over the L2-normalised
  OpenAI ViT-L/14 image embedding; about 1-10, higher is more aesthetic).
- `nsfw_score`: LAION's CLIP-based NSFW detector (an MLP over the normalised ViT-L/14 or B/32
  embedding, standardised first; a sigmoid: 1 is NSFW).
- `watermark_score`: LAION-5B's watermark detector (timm EfficientNet-B3 with an MLP classifier over
  a 256 x 256 squashed image; the softmax probability of class 0, "watermark").

Weights: a local safetensors head file whose metadata says what its tensors are (`read_head`),
written once from the published weights by `python -m tools.convert_heads`. Pickles (.pt/.pth),
a head of another task and a first layer not as wide as the declared embedding fail at recipe load.
A head reads clip_score's `embedding_column` only if that stage ran the head's model and weights
(`check_recipe`); `embedding_column: null` runs its own open_clip tower (clip_score's code: the same
decode and float16 embeddings), adding nothing else. A head runs a batch as one matmul chain on the
CPU (a few MFLOP a row: less than a GPU transfer); the watermark model runs on the stage's device.
Undecodable bytes are dropped (`decode_error`). A doc's images are scored one by one (each from
its clip_score embedding): the score goes into the image's segment, the doc's column holds the
mean (aesthetic) or the maximum (NSFW, watermark: the doc's worst image); curate/stages/doc_images.py.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from pydantic import Field, field_validator, model_validator

from curate.documents import table_kind
from curate.stages.base import Drop, RowStage, Stage, StageConfig, register
from curate.stages.clip_score import ClipScoreStage
from curate.stages.doc_images import Aggregate, score_doc_images
from curate.stages.score_heads import (
    HeadSpec,
    head_forward,
    load_tensors,
    open_clip_embed_dim,
    read_head,
)
from curate.stages.image import DECODE_ERROR, to_rgb

_COLUMN = r"^[a-z][a-z0-9_]*$"
DROP_COLUMNS = ("drop_stage", "drop_reason", "drop_detail")


def _set_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    i = table.schema.get_field_index(name)
    if i < 0:
        return table.append_column(name, values)
    return table.set_column(i, table.schema.field(i), values.cast(table.schema.field(i).type))


def _scores_column(n: int, rows: np.ndarray, scores: np.ndarray) -> pa.Array:
    full = np.zeros(n, np.float32)
    valid = np.zeros(n, bool)
    full[rows], valid[rows] = scores, True
    return pa.array(full, pa.float32(), mask=~valid)


# --- heads over CLIP embeddings ---------------------------------------------------------------


class ScoreWeightsConfig(StageConfig):
    """Options every image score has: its head file and output column, and where it runs."""

    task: ClassVar[str]
    weights: str  # a head file (safetensors + metadata), written by `python -m tools.convert_heads`
    column: str = Field(pattern=_COLUMN)
    # execution only (a head's own tower, the watermark model): where and how fast, not what
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra={"execution_only": True})
    batch_size: int = Field(64, ge=1, le=4096, json_schema_extra={"execution_only": True})
    decode_threads: int = Field(2, ge=1, le=64, json_schema_extra={"execution_only": True})

    @field_validator("weights")
    @classmethod
    def _head_file(cls, value: str) -> str:
        read_head(value, cls.task)
        return value


class HeadScoreConfig(ScoreWeightsConfig):
    # clip_score's stored embeddings, accepted only from a clip_score stage of the head's model and
    # weights; null: the head runs its own open_clip image tower (the options below)
    embedding_column: str | None = Field("clip_embedding", pattern=_COLUMN)
    model: str | None = None  # the head's open_clip model, if stated: a guard against a wrong weights file
    # null: the head's tag (or random weights for a random head); a checkpoint file here stands
    # for the head's weights (offline copies), also when checking a clip_score stage's column
    pretrained: str | None = None
    model_overrides: dict[str, Any] = Field(default_factory=dict)  # the tower's (tiny test models)
    init_seed: int = 0  # random tower weights (pretrained null) come from this seed, as in clip_score
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # the tower's

    @model_validator(mode="after")
    def _fits_head(self) -> HeadScoreConfig:
        spec = read_head(self.weights, self.task)
        if self.model is not None and self.model != spec.embedding_model:
            raise ValueError(f"model {self.model!r} is not the embedding model of the head in {self.weights} "
                             f"({spec.embedding_model!r})")
        if self.pretrained not in (None, spec.embedding_pretrained) and not os.path.isfile(self.pretrained):
            raise ValueError(f"pretrained {self.pretrained!r} is neither the head's ({spec.embedding_pretrained!r}, "
                             f"from {self.weights}) nor a checkpoint file standing for it")
        if self.embedding_column is None:
            tower = self.tower_config()  # open_clip names and tags checked as clip_score checks them
            dim = open_clip_embed_dim(tower.model, tower.model_overrides)
            if dim is not None and dim != spec.embedding_dim:
                raise ValueError(f"the tower {tower.model} embeds in {dim} dimensions; the head in {self.weights} "
                                 f"takes {spec.embedding_dim}")
        return self

    def expected_pretrained(self) -> str | None:
        """The weights the head's embeddings must come from: `pretrained` if set, else the head's."""
        return self.pretrained or read_head(self.weights, self.task).embedding_pretrained

    def tower_config(self) -> ClipScoreStage.Config:
        """The clip_score config of this head's own tower pass: its embeddings, nothing else."""
        spec = read_head(self.weights, self.task)
        return ClipScoreStage.Config(
            model=self.model or spec.embedding_model, pretrained=self.expected_pretrained(),
            model_overrides=self.model_overrides, init_seed=self.init_seed, precision=self.precision,
            device=self.device, batch_size=self.batch_size, decode_threads=self.decode_threads,
            name=self.name or self.kind, column=f"{self.column}_tower_score",
            embedding_column=f"{self.column}_tower_embedding")


class HeadScoreStage(RowStage):
    """A score from a head over CLIP image embeddings (module docstring)."""

    kinds = ("pair", "doc")
    config: HeadScoreConfig
    doc_aggregate: ClassVar[Aggregate] = "mean"  # a doc's column over its images' scores

    @property
    def input_columns(self) -> list[str]:
        return [self.config.embedding_column] if self.config.embedding_column else []

    @property
    def output_columns(self) -> dict[str, pa.DataType]:  # type: ignore[override]
        return {self.config.column: pa.float32()}

    def check_recipe(self, earlier: Sequence[Stage]) -> None:
        """When the recipe loads: the stage that last adds `embedding_column` before this one is a
        clip_score stage of the head's model, weights and width. ValueError otherwise."""
        cfg = self.config
        if cfg.embedding_column is None:
            return
        spec = read_head(cfg.weights, cfg.task)
        want = f"model {spec.embedding_model}, pretrained {cfg.expected_pretrained() or 'null'}"
        hint = (f"add a clip_score stage with {want} before it, or set embedding_column: null to embed "
                "the images with the head's own tower")
        producer = next((s for s in reversed(earlier) if cfg.embedding_column in s.output_columns), None)
        if producer is None:
            raise ValueError(f"it reads {cfg.embedding_column!r}, which no earlier stage adds: {hint}")
        if not isinstance(producer, ClipScoreStage):
            raise ValueError(f"it reads {cfg.embedding_column!r} from stage {producer.name!r}, which is not a "
                             f"clip_score stage: {hint}")
        clip = producer.config
        if (clip.model, clip.pretrained) != (spec.embedding_model, cfg.expected_pretrained()):
            raise ValueError(f"the head in {cfg.weights} expects embeddings of {want}, but "
                             f"{cfg.embedding_column!r} comes from stage {producer.name!r} (model {clip.model}, "
                             f"pretrained {clip.pretrained or 'null'}): {hint}")
        dim = open_clip_embed_dim(clip.model, clip.model_overrides)
        if dim is not None and dim != spec.embedding_dim:
            raise ValueError(f"stage {producer.name!r} embeds in {dim} dimensions, the head in "
                             f"{cfg.weights} takes {spec.embedding_dim}")

    def setup(self) -> None:
        cfg = self.config
        self.spec = read_head(cfg.weights, cfg.task)
        self.params = load_tensors(cfg.weights)
        self.tower = None if cfg.embedding_column else ClipScoreStage(cfg.tower_config())

    def _embeddings(self, table: pa.Table) -> tuple[pa.Table, pa.ChunkedArray]:
        """(table with the tower's drops, the embedding column): clip_score's column, or the tower's
        embeddings of the live rows' images (captions hidden from it: no text pass)."""
        if self.tower is None:
            return table, table.column(self.config.embedding_column)
        blank = _set_column(table, "caption", pa.nulls(table.num_rows, pa.string()))
        embedded = self.tower.process(blank)
        for name in DROP_COLUMNS:
            table = _set_column(table, name, embedded.column(name))
        return table, embedded.column(self.tower.config.embedding_column)

    def process(self, table: pa.Table) -> pa.Table:
        self.ensure_setup()
        if table_kind(table.schema) == "doc":  # each image's embedding (clip_score's per image)
            return score_doc_images(table, self, self._score, {self.config.column: self.doc_aggregate})
        return self._score(table)

    def _score(self, table: pa.Table) -> pa.Table:
        import torch  # keeps torch out of curate/ (clip extra): loaded by setup() already

        table, vectors = self._embeddings(table)
        rows = pc.indices_nonzero(pc.and_(pc.is_null(table.column("drop_reason")), pc.is_valid(vectors)))
        picked = pc.take(vectors, rows).combine_chunks()
        widths = set(pc.list_value_length(picked).to_pylist())
        dim = self.spec.embedding_dim
        if widths - {dim}:  # the recipe check passed, so the stored column is not what it said
            raise ValueError(f"{self.name}: {self.config.embedding_column} has embeddings of width "
                             f"{sorted(widths)}; the head in {self.config.weights} takes {dim}")
        x = np.asarray(picked.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)
        with torch.inference_mode():
            scores = head_forward(torch.from_numpy(x), self.spec, self.params).numpy()
        out = _scores_column(table.num_rows, rows.to_numpy(), scores)
        return _set_column(table, self.config.column, out)


class AestheticScoreConfig(HeadScoreConfig):
    task: ClassVar[str] = "aesthetic"
    kind: Literal["aesthetic_score"] = "aesthetic_score"
    column: str = Field("aesthetic_score", pattern=_COLUMN)


@register
class AestheticScore(HeadScoreStage):
    """LAION's aesthetic predictor over CLIP ViT-L/14 image embeddings (module docstring)."""

    name = "aesthetic_score"
    Config = AestheticScoreConfig


class NsfwScoreConfig(HeadScoreConfig):
    task: ClassVar[str] = "nsfw"
    kind: Literal["nsfw_score"] = "nsfw_score"
    column: str = Field("nsfw_score", pattern=_COLUMN)


@register
class NsfwScore(HeadScoreStage):
    """LAION's CLIP-based NSFW detector over CLIP image embeddings (module docstring)."""

    name = "nsfw_score"
    Config = NsfwScoreConfig
    doc_aggregate = "max"  # a doc is as unsafe as its worst image


# --- a watermark probability from an image model ---------------------------------------------


def squashed_pixels(data: bytes, spec: HeadSpec) -> np.ndarray | Drop:
    """3 x S x S float32 input of a timm head (S = image_size): RGB (alpha on white), resized to S x S
    ignoring the aspect ratio (bilinear, as torchvision's Resize((S, S)) on a PIL image), scaled to
    0..1 and normalised by the file's mean and std; or a Drop for bytes that do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = to_rgb(img).resize((spec.image_size, spec.image_size), Image.Resampling.BILINEAR)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any failure is this drop
        return Drop(DECODE_ERROR, f"{type(exc).__name__}: {exc}"[:300])
    pixels = np.asarray(rgb, np.float32) / 255.0
    pixels = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


class WatermarkScoreConfig(ScoreWeightsConfig):
    task: ClassVar[str] = "watermark"
    kind: Literal["watermark_score"] = "watermark_score"
    column: str = Field("watermark_score", pattern=_COLUMN)


@register
class WatermarkScore(RowStage):
    """The probability that an image carries a watermark, from LAION's detector (module docstring)."""

    name = "watermark_score"
    Config = WatermarkScoreConfig
    config: WatermarkScoreConfig
    kinds = ("pair", "doc")

    @property
    def output_columns(self) -> dict[str, pa.DataType]:  # type: ignore[override]
        return {self.config.column: pa.float32()}

    def setup(self) -> None:
        # keeps torch and timm out of curate/ (clip extra): loaded once per worker
        import timm
        import torch

        cfg = self.config
        self.spec = read_head(cfg.weights, cfg.task)
        tensors = load_tensors(cfg.weights)
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.params = {k: v.to(self.device) for k, v in tensors.items() if not k.startswith("backbone.")}
        backbone = timm.create_model(self.spec.embedding_model, pretrained=False, num_classes=0)
        backbone.load_state_dict({k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")})
        self.backbone = backbone.eval().to(self.device)
        self.pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="mm1-watermark-decode")

    def process(self, table: pa.Table) -> pa.Table:
        self.ensure_setup()
        if table_kind(table.schema) == "doc":  # a doc's worst image
            return score_doc_images(table, self, self._score, {self.config.column: "max"})
        return self._score(table)

    def _score(self, table: pa.Table) -> pa.Table:
        import torch  # keeps torch out of curate/ (clip extra): loaded by setup() already

        todo = pc.indices_nonzero(pc.and_(pc.is_null(table.column("drop_reason")),
                                          pc.is_valid(table.column("image")))).to_pylist()
        images, step = table.column("image"), self.config.batch_size
        rows: list[int] = []
        scores, drops = [np.empty(0, np.float32)], {}

        def decode(chunk: list[int]) -> list[Any]:  # on the pool, one model batch ahead of the forward
            return [self.pool.submit(squashed_pixels, images[i].as_py(), self.spec) for i in chunk]

        ahead = decode(todo[:step])
        for start in range(0, len(todo), step):
            chunk, pixels, ahead = todo[start:start + step], [f.result() for f in ahead], decode(
                todo[start + step:start + 2 * step])
            drops.update({i: p for i, p in zip(chunk, pixels) if isinstance(p, Drop)})
            ok = [(i, p) for i, p in zip(chunk, pixels) if not isinstance(p, Drop)]
            if ok:
                batch = torch.from_numpy(np.stack([p for _, p in ok])).to(self.device)
                with torch.inference_mode():
                    scores.append(head_forward(self.backbone(batch).float(), self.spec, self.params).cpu().numpy())
                rows += [i for i, _ in ok]
        for k, name in enumerate(DROP_COLUMNS):  # (stage, reason, detail) of the rows that did not decode
            values = table.column(name).to_pylist()
            for i, drop in drops.items():
                values[i] = (self.name, *drop)[k]
            table = _set_column(table, name, pa.array(values, pa.string()))
        out = _scores_column(table.num_rows, np.array(rows, np.int64), np.concatenate(scores))
        return _set_column(table, self.config.column, out)


__all__ = ["AestheticScore", "HeadScoreStage", "NsfwScore", "WatermarkScore", "squashed_pixels"]
