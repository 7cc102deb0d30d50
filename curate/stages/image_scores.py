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
Undecodable bytes are dropped (`decode_error`). Pairs only: docs' images are not scored.
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from pydantic import Field, field_validator, model_validator

from curate.stages.base import Drop, RowStage, Stage, StageConfig, register
from curate.stages.clip_score import ClipScoreStage
from curate.stages.image import DECODE_ERROR, to_rgb

_COLUMN = r"^[a-z][a-z0-9_]*$"
HEAD_FORMAT = "mm1-score-head"  # metadata `format` of a head file
TASKS = ("aesthetic", "nsfw", "watermark")
ACTIVATIONS = ("none", "relu")
OUTPUTS = ("identity", "sigmoid", "softmax")
DROP_COLUMNS = ("drop_stage", "drop_reason", "drop_detail")
_DTYPES = {"F16", "BF16", "F32", "F64"}
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is not one


@dataclass(frozen=True)
class HeadSpec:
    """What a head file declares. `widths` are the layers' widths read from the tensors, input
    first (`layers.<i>.weight`, out x in, in order); `activations` sit between them."""

    path: str
    task: str
    head: str
    embedding_model: str  # open_clip name (mlp) or timm architecture (timm)
    embedding_pretrained: str | None  # open_clip tag or None (random weights); mlp only
    embedding_dim: int
    input_normalized: bool  # L2-normalise the embedding first
    activations: tuple[str, ...]
    output: str
    output_index: int  # softmax: the class whose probability is the score
    widths: tuple[int, ...]
    standardized: bool  # `input.mean` / `input.variance` tensors: (x - mean) / (sqrt(var) + 1e-10)
    image_size: int | None = None  # timm: the squashed input size
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    source: str = ""  # where the weights came from; "RANDOM weights ..." for test and demo heads


def _not_safetensors(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is {why}, not a safetensors head file: pickled weights are never loaded; "
                      "convert the published weights once with `python -m tools.convert_heads`")


def read_safetensors_header(path: str | Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    """(metadata, {tensor name: shape}) of a safetensors file, read from its header alone (no
    tensor data, no safetensors import). ValueError naming the path for anything else: a zip (what
    torch.save writes), a bare pickle, a truncated or garbled header."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such file")
    size = p.stat().st_size
    with p.open("rb") as f:
        start = f.read(8)
        n = struct.unpack("<Q", start)[0] if len(start) == 8 else 0
        raw = f.read(n) if 2 <= n <= min(size - 8, _MAX_HEADER) else b""
    try:
        header = json.loads(raw)
        metadata = header.pop("__metadata__", None) or {}
        shapes = {k: [int(d) for d in v["shape"]] for k, v in header.items()}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        dtypes = {v["dtype"] for v in header.values()}
    except (ValueError, KeyError, TypeError, AttributeError):
        if start.startswith(b"PK\x03\x04"):
            raise _not_safetensors(p, "a zip archive (torch.save's .pt/.pth format, a pickle inside)") from None
        if start[:1] == b"\x80":
            raise _not_safetensors(p, "a pickle") from None
        raise _not_safetensors(p, "a file without a safetensors header") from None
    if 8 + n + end > size:
        raise ValueError(f"{p}: truncated ({size} bytes; its header describes {8 + n + end})")
    if not dtypes <= _DTYPES:
        raise ValueError(f"{p}: tensors of dtype {sorted(dtypes - _DTYPES)}; a head holds floats")
    return {str(k): str(v) for k, v in metadata.items()}, shapes


def _numbers(meta: dict[str, str], key: str, n: int, path: str, cast: type = float) -> tuple[Any, ...]:
    try:
        values = tuple(cast(v) for v in meta[key].split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise ValueError(f"{path}: metadata {key}={meta[key]!r} is not {n} comma-separated {cast.__name__}(s)")
    return values


def read_head(path: str | Path, task: str) -> HeadSpec:
    """The head file at `path`, checked from its header: a safetensors file of `task` (TASKS)
    with complete metadata, whose layers chain (each layer's input width is the previous output
    width), take `embedding_dim` inputs and give one output (two or more for a softmax).
    ValueError naming the path and the metadata key at fault."""
    meta, shapes = read_safetensors_header(path)
    p = str(path)
    if meta.get("format") != HEAD_FORMAT:
        raise ValueError(f"{p}: metadata format is {meta.get('format')!r}, not {HEAD_FORMAT!r} (write head "
                         "files with `python -m tools.convert_heads`)")
    if meta.get("task") != task:
        raise ValueError(f"{p}: metadata task is {meta.get('task')!r}: a head for {task} was expected")
    head = meta.get("head")
    if head != ("timm" if task == "watermark" else "mlp"):
        raise ValueError(f"{p}: metadata head is {head!r}; a {task} head is "
                         f"{'a timm image model' if task == 'watermark' else 'an mlp over CLIP embeddings'}")
    need = ["embedding_model", "embedding_dim", "activations", "output"]
    need += ["embedding_pretrained", "input_normalized"] if head == "mlp" else ["image_size", "mean", "std"]
    missing = [k for k in need if k not in meta]
    if missing:
        raise ValueError(f"{p}: metadata keys {missing} are missing")
    (dim,) = _numbers(meta, "embedding_dim", 1, p, int)
    widths: list[int] = []
    i = 0
    while f"layers.{i}.weight" in shapes:
        w, b = shapes[f"layers.{i}.weight"], shapes.get(f"layers.{i}.bias")
        if len(w) != 2 or b != [w[0]] or (widths and w[1] != widths[-1]):
            raise ValueError(f"{p}: layers.{i} is {w} with bias {b}: not a linear layer taking "
                             f"{widths[-1] if widths else dim} inputs")
        widths = widths or [w[1]]
        widths.append(w[0])
        i += 1
    if not widths:
        raise ValueError(f"{p}: no layers.0.weight tensor")
    if widths[0] != dim:
        raise ValueError(f"{p}: the first layer takes {widths[0]} inputs, but metadata embedding_dim is {dim} "
                         f"(the width of {meta['embedding_model']}'s embeddings)")
    activations = tuple(a.strip() for a in meta["activations"].split(",")) if meta["activations"] else ()
    if len(activations) != len(widths) - 2 or not set(activations) <= set(ACTIVATIONS):
        raise ValueError(f"{p}: metadata activations={meta['activations']!r}: one of {ACTIVATIONS} per gap "
                         f"between its {len(widths) - 1} layers")
    output = meta["output"]
    (index,) = _numbers({"output_index": "0", **meta}, "output_index", 1, p, int)
    if output not in OUTPUTS or (output == "softmax") != (widths[-1] > 1) or not 0 <= index < widths[-1]:
        raise ValueError(f"{p}: metadata output={output!r} (output_index {index}) does not fit a last layer "
                         f"of {widths[-1]} outputs (one of {OUTPUTS}; softmax for two or more)")
    standardized = "input.mean" in shapes
    if standardized and not shapes["input.mean"] == shapes.get("input.variance") == [dim]:
        raise ValueError(f"{p}: input.mean / input.variance must both be [{dim}]")
    spec = dict(path=p, task=task, head=head, embedding_model=meta["embedding_model"],
                embedding_pretrained=meta.get("embedding_pretrained") or None, embedding_dim=dim,
                input_normalized=meta.get("input_normalized") == "true", activations=activations,
                output=output, output_index=index, widths=tuple(widths), standardized=standardized,
                source=meta.get("source", ""))
    if head == "timm":
        if not any(k.startswith("backbone.") for k in shapes):
            raise ValueError(f"{p}: a timm head file holds its backbone's backbone.* tensors; there are none")
        spec.update(image_size=_numbers(meta, "image_size", 1, p, int)[0], mean=_numbers(meta, "mean", 3, p),
                    std=_numbers(meta, "std", 3, p))
    return HeadSpec(**spec)


def open_clip_embed_dim(model: str, overrides: dict[str, Any] | None = None) -> int | None:
    """The embedding width of an open_clip model: `embed_dim` of the overrides, else of the
    config file open_clip ships for the name (read without importing open_clip); None when
    unknown here (a hub or local-dir model)."""
    if overrides and "embed_dim" in overrides:
        return int(overrides["embed_dim"])
    spec = find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        config = Path(folder, "model_configs", f"{model}.json")
        if config.is_file():
            return int(json.loads(config.read_text())["embed_dim"])
    return None


def head_forward(x: Any, spec: HeadSpec, params: dict[str, Any]) -> Any:
    """The score of each row of `x` (a float32 tensor, rows x embedding_dim): the head's layers as
    one chain of matmuls over the whole batch, then its output transform (a 1-D tensor)."""
    import torch  # keeps torch out of curate/ (clip extra); callers hold tensors already

    if spec.input_normalized:
        x = torch.nn.functional.normalize(x, dim=-1)
    if spec.standardized:  # the NSFW detector's Keras Normalization layer
        x = (x - params["input.mean"]) / (params["input.variance"].sqrt() + 1e-10)
    for i, act in enumerate((*spec.activations, "none")):
        x = torch.addmm(params[f"layers.{i}.bias"], x, params[f"layers.{i}.weight"].T)
        if act == "relu":
            x = torch.relu(x)
    if spec.output == "softmax":
        return torch.softmax(x, dim=-1)[:, spec.output_index]
    return torch.sigmoid(x[:, 0]) if spec.output == "sigmoid" else x[:, 0]


def _load_tensors(path: str) -> dict[str, Any]:
    from safetensors.torch import load_file  # optional (safety extra); no pickle is ever read

    return {k: v.float() for k, v in load_file(path).items()}


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

    kinds = ("pair",)
    config: HeadScoreConfig

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
        self.params = _load_tensors(cfg.weights)
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
        import torch  # keeps torch out of curate/ (clip extra): loaded by setup() already

        self.ensure_setup()
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
    kinds = ("pair",)

    @property
    def output_columns(self) -> dict[str, pa.DataType]:  # type: ignore[override]
        return {self.config.column: pa.float32()}

    def setup(self) -> None:
        # keeps torch and timm out of curate/ (clip extra): loaded once per worker
        import timm
        import torch

        cfg = self.config
        self.spec = read_head(cfg.weights, cfg.task)
        tensors = _load_tensors(cfg.weights)
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.params = {k: v.to(self.device) for k, v in tensors.items() if not k.startswith("backbone.")}
        backbone = timm.create_model(self.spec.embedding_model, pretrained=False, num_classes=0)
        backbone.load_state_dict({k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")})
        self.backbone = backbone.eval().to(self.device)
        self.pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="mm1-watermark-decode")

    def process(self, table: pa.Table) -> pa.Table:
        import torch  # keeps torch out of curate/ (clip extra): loaded by setup() already

        self.ensure_setup()
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


__all__ = ["AestheticScore", "HeadScoreStage", "HeadSpec", "NsfwScore", "WatermarkScore", "head_forward",
           "open_clip_embed_dim", "read_head", "read_safetensors_header", "squashed_pixels"]
