"""CLIP / DFN image-text scoring on open_clip: the cosine similarity of each image with its caption.

Contract, for each live row with image bytes:
- adds `<column>` (float32): cosine similarity of the L2-normalised image and caption embeddings
  of the model, and `<column>_<name>` for each of `extra_caption_columns` (synthetic captions,
  VeCap), null where that caption is null;
- adds `<embedding_column>` (list of float16, the normalised image embedding) for semantic dedup
  and decontamination downstream. It lives in the intermediate data only: sidecars and KEY.json
  never carry list columns (curate/contract.py);
- or drops the row with `decode_error` when its bytes do not decode here. Grayscale, CMYK,
  palette, 16-bit and alpha images are converted to RGB (alpha on white) first; captions are
  tokenised with the model's tokenizer and truncated at its context length (an empty caption is
  scored like any other text; a filter decides what to do with it).

A doc's images are scored one by one against their alt-text (`doc_caption: alt`; the nearest text
segment when an image has none) or the nearest text (`nearest_text`): each score goes into its
image's segment and their mean into the doc's `<column>`, each embedding into
`<embedding_column>_per_image` (aligned with `images`), and an image that does not decode removes
its segment (curate/stages/doc_images.py).

The model: `model` is an open_clip name (`ViT-B-32`, `ViT-H-14-378-quickgelu`, ...), or
`hf-hub:org/repo` / `local-dir:/path` as open_clip reads them; `pretrained` is an open_clip tag
(`laion2b_s34b_b79k`, `dfn5b`, `openai`, ...) or a checkpoint file on disk, or null for random
weights (mechanics only: the demo and the tests, which say so). `model_overrides` replaces parts
of the model's config (a tiny model for tests and the demo). Names and tags are checked when the
recipe loads (a tag that does not exist for the model fails there, not mid-run); weights are
loaded once per worker process, lazily, in `setup()`. torch.load runs with weights_only=True.

Speed: decoding and preprocessing run on a thread pool (Pillow and torchvision release the GIL)
one model batch ahead of the forward pass, so decode overlaps compute where cores allow; the
forward runs under `torch.inference_mode` in `batch_size` images per step on the stage's device:
`cuda` when the stage declares a GPU resource and torch sees one, else CPU (`device` forces it).
"""

from __future__ import annotations

import importlib.util
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from pydantic import Field, model_validator

from curate.documents import PER_IMAGE, table_kind
from curate.stages.base import Drop, RowStage, StageConfig, register
from curate.stages.doc_images import score_doc_images
from curate.stages.image import DECODE_ERROR, to_rgb

_COLUMN = r"^[a-z][a-z0-9_]*$"
_SCHEMES = ("hf-hub:", "local-dir:")


def _shipped_configs() -> set[str]:
    """The model names open_clip ships a config file for (its `model_configs/*.json`), found
    without importing open_clip: a recipe check in a fresh process then costs milliseconds, not
    the ~7 CPU-seconds of importing open_clip (torch, torchvision, transformers)."""
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or ()) if spec else []
    return {p.stem for folder in folders for p in Path(folder, "model_configs").glob("*.json")}


def _check_model(model: str, pretrained: str | None) -> None:
    """A model name open_clip knows (or a hub/local-dir name) and a tag it has for that model, or
    an existing checkpoint file. ValueError with what exists otherwise. open_clip itself is
    imported only for what the config files cannot answer: a tag, or a name registered at run time."""
    if model.startswith(_SCHEMES):
        if model.startswith("local-dir:") and not os.path.isdir(model.split(":", 1)[1]):
            raise ValueError(f"model {model!r}: no such directory")
    elif model not in _shipped_configs():
        import open_clip  # keeps torch out of curate/ (train extra); only for a name no config file has

        if model not in open_clip.list_models():
            close = [m for m in open_clip.list_models() if model.lower()[:5] in m.lower()][:8]
            raise ValueError(f"unknown open_clip model {model!r}; similar names: {close}")
    if pretrained is None or model.startswith(_SCHEMES):
        return
    if os.path.exists(pretrained):
        if not os.path.isfile(pretrained):
            raise ValueError(f"pretrained {pretrained!r} is not a checkpoint file")
        return
    import open_clip  # keeps torch out of curate/ (train extra); the tags live in its code

    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise ValueError(f"pretrained {pretrained!r} is neither a file nor a tag of {model} (tags: {tags})")


@register
class ClipScoreStage(RowStage):
    name = "clip_score"
    kinds = ("pair", "doc")

    class Config(StageConfig):
        kind: Literal["clip_score"] = "clip_score"
        model: str
        pretrained: str | None  # required: null (random weights) must be written out
        model_overrides: dict[str, Any] = Field(default_factory=dict)
        # random weights (pretrained: null) are drawn from this seed, so every worker process
        # builds the same model and reruns give the same scores
        init_seed: int = 0
        column: str = Field("clip_score", pattern=_COLUMN)
        embedding_column: str | None = Field("clip_embedding", pattern=_COLUMN)
        extra_caption_columns: list[str] = Field(default_factory=list)  # pairs' (synthetic captions)
        # what a doc's image is scored against: its alt-text (the nearest text segment when it has
        # none), or the nearest text segment (curate/stages/doc_images.py)
        doc_caption: Literal["alt", "nearest_text"] = Field("alt", json_schema_extra={"added_later": True})
        precision: Literal["fp32", "bf16", "fp16"] = "fp32"
        # execution only: where and how fast, not what
        device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra={"execution_only": True})
        batch_size: int = Field(64, ge=1, le=4096, json_schema_extra={"execution_only": True})
        decode_threads: int = Field(2, ge=1, le=64, json_schema_extra={"execution_only": True})

        @model_validator(mode="after")
        def _known_model(self) -> ClipScoreStage.Config:
            _check_model(self.model, self.pretrained)
            return self

    config: Config

    @property
    def input_columns(self) -> list[str]:
        return list(self.config.extra_caption_columns)

    @property
    def output_columns(self) -> dict[str, pa.DataType]:  # type: ignore[override]
        cfg = self.config
        out = {cfg.column: pa.float32()}
        out.update({f"{cfg.column}_{c}": pa.float32() for c in cfg.extra_caption_columns})
        if cfg.embedding_column:
            out[cfg.embedding_column] = pa.list_(pa.float16())
            out[cfg.embedding_column + PER_IMAGE] = pa.list_(pa.list_(pa.float16()))  # a doc's, per image
        return out

    def setup(self) -> None:
        # keeps torch out of curate/ (train extra): loaded once per worker
        import open_clip
        import torch

        cfg = self.config
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):  # the seed stays here, not in the process's RNG
            torch.manual_seed(cfg.init_seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                cfg.model, pretrained=cfg.pretrained, precision=cfg.precision, device=self.device,
                weights_only=True, **cfg.model_overrides,
            )
        model.eval()
        self.model, self.preprocess = model, preprocess
        self.tokenizer = open_clip.get_tokenizer(cfg.model, context_length=model.context_length)
        self.dtype = next(model.parameters()).dtype
        self.pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="mm1-clip-decode")

    # -----------------------------------------------------------------------------------------

    def _prepare(self, data: bytes) -> Any:
        """Decoded, RGB, preprocessed image tensor; or a Drop for bytes that do not decode."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                rgb = to_rgb(img)  # the image stage's rule: alpha on white, 16-bit scaled
                return self.preprocess(rgb)
        except Exception as exc:  # noqa: BLE001 - untrusted bytes: any failure is this drop
            return Drop(DECODE_ERROR, f"{type(exc).__name__}: {exc}"[:300])

    def _text(self, captions: list[str]) -> Any:
        import torch  # keeps torch out of curate/ (train extra)

        tokens = self.tokenizer(captions).to(self.device)
        with torch.inference_mode():
            text = self.model.encode_text(tokens).float()
        return torch.nn.functional.normalize(text, dim=-1)

    def _images(self, tensors: list[Any]) -> Any:
        import torch  # keeps torch out of curate/ (train extra)

        batch = torch.stack(tensors).to(self.device, dtype=self.dtype)
        with torch.inference_mode():
            image = self.model.encode_image(batch).float()
        return torch.nn.functional.normalize(image, dim=-1)

    def process(self, table: pa.Table) -> pa.Table:
        self.ensure_setup()
        cfg = self.config
        if table_kind(table.schema) == "doc":  # each image against its alt-text or nearby text
            return score_doc_images(table, self, lambda rows: self._score(rows, []), {cfg.column: "mean"},
                                    [cfg.embedding_column] if cfg.embedding_column else [], cfg.doc_caption)
        missing = [c for c in cfg.extra_caption_columns if c not in table.column_names]
        if missing:  # a recipe mistake, not a sample's fault: fail the task with what is wrong
            raise ValueError(f"clip_score: extra_caption_columns {missing} are not columns of the "
                             f"records (no earlier stage adds them); columns: {table.column_names}")
        return self._score(table, cfg.extra_caption_columns)

    def _score(self, table: pa.Table, extra_captions: list[str]) -> pa.Table:
        """The pairs' pass: each live row's image against its caption (and `extra_captions`)."""
        cfg = self.config
        n = table.num_rows
        todo = pc.indices_nonzero(pc.and_(pc.is_null(table.column("drop_reason")),
                                          pc.is_valid(table.column("image")))).to_pylist()
        captions = {c: table.column(c).to_pylist() for c in ["caption", *extra_captions]}
        scores = {c: [None] * n for c in captions}
        embeddings: list[Any] = [None] * n
        drops: dict[int, Drop] = {}
        images = table.column("image")
        step = cfg.batch_size
        # decode + preprocess one model batch ahead of the forward pass
        futures = [self.pool.submit(self._prepare, images[i].as_py()) for i in todo[:step]]
        for start in range(0, len(todo), step):
            rows = todo[start : start + step]
            ahead = todo[start + step : start + 2 * step]
            prepared = [f.result() for f in futures]
            futures = [self.pool.submit(self._prepare, images[i].as_py()) for i in ahead]
            ok = [(i, t) for i, t in zip(rows, prepared) if not isinstance(t, Drop)]
            drops.update({i: t for i, t in zip(rows, prepared) if isinstance(t, Drop)})
            if not ok:
                continue
            image = self._images([t for _, t in ok])
            for name, values in captions.items():
                have = [(j, values[i]) for j, (i, _) in enumerate(ok) if values[i] is not None]
                if not have:
                    continue
                text = self._text([c for _, c in have])
                sims = (image[[j for j, _ in have]] * text).sum(-1).cpu().numpy()
                for (j, _), s in zip(have, sims):
                    scores[name][ok[j][0]] = float(s)
            vectors = image.cpu().numpy().astype(np.float16)
            for (i, _), v in zip(ok, vectors):
                embeddings[i] = v
        return self._columns(table, scores, embeddings, drops)

    def _columns(self, table: pa.Table, scores: dict[str, list[Any]], embeddings: list[Any],
                 drops: dict[int, Drop]) -> pa.Table:
        cfg = self.config
        for name, values in scores.items():
            column = cfg.column if name == "caption" else f"{cfg.column}_{name}"
            table = _put(table, column, pa.array(values, pa.float32()))
        if cfg.embedding_column:
            dim = next((len(v) for v in embeddings if v is not None), 0)
            flat = np.concatenate([v for v in embeddings if v is not None]) if dim else np.empty(0, np.float16)
            offsets, at = [], 0
            for v in embeddings:
                offsets.append(at)
                at += 0 if v is None else dim
            offsets.append(at)
            mask = pa.array([v is None for v in embeddings])
            values = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.float16()), mask=mask)
            table = _put(table, cfg.embedding_column, values)
        if drops:
            cols = {c: table.column(c).to_pylist() for c in ("drop_stage", "drop_reason", "drop_detail")}
            for i, drop in drops.items():
                cols["drop_stage"][i], cols["drop_reason"][i], cols["drop_detail"][i] = self.name, drop.reason, drop.detail
            for c, values in cols.items():
                table = _put(table, c, pa.array(values, pa.string()))
        return table


def _put(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """Set or append a column (output columns may not exist yet in the incoming batch)."""
    i = table.schema.get_field_index(name)
    if i < 0:
        return table.append_column(pa.field(name, values.type), values)
    return table.set_column(i, table.schema.field(i), values.cast(table.schema.field(i).type))


__all__ = ["ClipScoreStage"]
