"""VeCap-style recaptioning: a synthetic caption per image from a vision-language model, fused
with the alt-text by a language model into a visually enriched caption that keeps the alt-text's
facts (MM1 pretrains on such captions, VeCap-300M, beside the alt-text).

Runs late (DESIGN.md: the most expensive stage last, after filtering and dedup). Contract, for
each live pair with image bytes:

- adds columns, rewriting none: `caption_alt` (the alt-text as it came, = `caption`),
  `caption_synthetic` (the captioner's, cleaned), `caption_vecap` (the fusion, or the synthetic
  caption where a guard refused the fusion), `vecap_fallback` (null when the fusion was kept,
  else the code: curate/captions/vecap.py lists them), `caption_model`, `caption_prompt_hash`,
  `fusion_model`, `fusion_prompt_hash` (what made them), and `txt_source`: which of `alt`,
  `synthetic`, `vecap` the sample's KEY.txt holds (the recipe's `txt`, or the next available:
  vecap -> synthetic -> alt). All reach the sidecar and KEY.json; the trainer samples between
  alt-text and synthetic caption itself (train/data/samples.py);
- a captioner output that is empty or loops leaves the pair with its alt-text only
  (`caption_synthetic` and `caption_vecap` null, `vecap_fallback` = `caption_empty` /
  `caption_repetition`);
- when the captioner cannot be asked (a server's timeout, connection error, 429 or 5xx after
  retries, a 4xx, a malformed answer) or cannot decode the image, the pair is dropped with that
  code (`timeout`, `connection_error`, `http_503`, `bad_response`, `decode_error`...), so
  `mm1 curate --retry-failed` asks again for the transient ones; `on_unavailable: keep` keeps it
  with `vecap_fallback` = `caption_unavailable` instead. A fusion that cannot be asked falls
  back to the synthetic caption (`fusion_error`).

Documents (`docs: true`): every image segment of a live doc gets `caption_synthetic`,
`caption_vecap` and `vecap_fallback` keys in its segment (its `alt` is the alt-text); a doc is
never dropped for a caption (`caption_unavailable` is recorded in the segment instead).

Cost: results are cached (curate/captions/cache.py) by (image sha256, captioner id, prompt hash)
and (alt-text + synthetic caption, fusion model id, prompt hash) in `cache_dir`, shared by all
workers: a killed or repeated run makes no model call for what it already generated. Identical
images or inputs within a batch are generated once.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from curate.captions import vecap
from curate.captions.cache import Cached, GenerationCache, namespace_of
from curate.captions.generation import ChatCompletions, Generated, TransformersLM, TransformersVLM
from curate.contract import conform, image_digest
from curate.documents import dump_json, load_segments
from curate.stages.base import RowStage, StageConfig, register

CAPTION_UNAVAILABLE = "caption_unavailable"
TXT_COLUMNS = {"alt": "caption_alt", "synthetic": "caption_synthetic", "vecap": "caption_vecap"}
_EXEC = {"execution_only": True}


class GeneratorConfig(BaseModel):
    """One model behind a backend. `model`: a local folder (or hub name) for `transformers`, the
    served model's name for `openai`. `prompt`: the captioner's instruction, or the fusion's
    template with `{alt_text}` and `{synthetic_caption}`."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
    backend: Literal["transformers", "openai"]
    model: str
    # openai: http(s)://host:port/v1. Where the model is served, not what it is (execution only:
    # a run may resume against another replica); `model` names it, and `model_id` where one
    # name stands for other weights on another server.
    base_url: str | None = Field(None, json_schema_extra=_EXEC)
    model_id: str | None = None  # the name in the cache and metadata (default: derived, generation.py)
    prompt: str | None = None  # default: curate/captions/vecap.py's
    max_new_tokens: int = Field(128, ge=1, le=4096)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # execution only: where and how fast, not what
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=_EXEC)
    batch_size: int = Field(8, ge=1, le=1024, json_schema_extra=_EXEC)
    concurrency: int = Field(8, ge=1, le=1024, json_schema_extra=_EXEC)
    timeout_s: float = Field(60.0, gt=0, json_schema_extra=_EXEC)
    retries: int = Field(3, ge=0, le=20, json_schema_extra=_EXEC)
    backoff_s: float = Field(0.5, ge=0, json_schema_extra=_EXEC)
    api_key_env: str | None = Field(None, json_schema_extra=_EXEC)  # the variable holding a bearer token

    @model_validator(mode="after")
    def _backend_fields(self) -> GeneratorConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend openai needs base_url (e.g. http://127.0.0.1:8000/v1)")
        if self.backend == "transformers" and self.base_url:
            raise ValueError("base_url is for backend openai")
        return self

    def build(self, role: Literal["caption", "fusion"]) -> Any:
        if self.backend == "openai":
            return ChatCompletions(self.base_url, self.model, concurrency=self.concurrency, timeout_s=self.timeout_s,
                                   retries=self.retries, backoff_s=self.backoff_s, max_tokens=self.max_new_tokens,
                                   api_key_env=self.api_key_env, model_id=self.model_id)
        cls = TransformersVLM if role == "caption" else TransformersLM
        return cls(self.model, device=self.device, dtype=self.dtype, batch_size=self.batch_size,
                   max_new_tokens=self.max_new_tokens, model_id=self.model_id)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


@register
class RecaptionStage(RowStage):
    """VeCap-style recaptioning: a synthetic caption per image from a vision-language model,
    fused with the alt-text into a visually enriched caption that keeps the alt-text's facts."""

    name = "recaption"
    kinds = ("pair", "doc")

    class Config(StageConfig):
        kind: Literal["recaption"] = "recaption"
        captioner: GeneratorConfig
        fusion: GeneratorConfig | None = None  # none: synthetic captions only (no VeCap fusion)
        txt: Literal["alt", "synthetic", "vecap"] = "alt"  # what KEY.txt holds
        docs: bool = False  # also caption the images of documents
        on_unavailable: Literal["drop", "keep"] = "drop"
        max_fusion_words: int = Field(120, ge=1)
        cache_dir: str | None = Field(None, json_schema_extra=_EXEC)  # none: no cache

        @model_validator(mode="after")
        def _prompts(self) -> RecaptionStage.Config:
            if self.fusion is not None:
                vecap.check_fusion_template(self.fusion.prompt or vecap.DEFAULT_FUSION_PROMPT)
            if self.txt == "vecap" and self.fusion is None:
                raise ValueError("txt: vecap needs a fusion model")
            return self

    config: Config
    output_columns = {
        "caption_alt": pa.string(), "caption_synthetic": pa.string(), "caption_vecap": pa.string(),
        "vecap_fallback": pa.string(), "caption_model": pa.string(), "caption_prompt_hash": pa.string(),
        "fusion_model": pa.string(), "fusion_prompt_hash": pa.string(), "txt_source": pa.string(),
    }

    def setup(self) -> None:
        cfg = self.config
        self.captioner = cfg.captioner.build("caption")
        self.caption_prompt = cfg.captioner.prompt or vecap.DEFAULT_CAPTION_PROMPT
        self.caption_hash = vecap.prompt_hash(self.caption_prompt, cfg.captioner.max_new_tokens, cfg.captioner.dtype)
        self.fuser = cfg.fusion.build("fusion") if cfg.fusion else None
        self.fusion_prompt = (cfg.fusion.prompt or vecap.DEFAULT_FUSION_PROMPT) if cfg.fusion else None
        self.fusion_hash = vecap.prompt_hash(self.fusion_prompt, cfg.fusion.max_new_tokens, cfg.fusion.dtype) \
            if cfg.fusion else None
        self.caption_cache = self.fusion_cache = None
        if cfg.cache_dir:
            cid = self.captioner.model_id
            self.caption_cache = GenerationCache(cfg.cache_dir, "caption-" + namespace_of(cid, self.caption_hash), {
                "role": "caption", "model_id": cid, "prompt": self.caption_prompt, "prompt_hash": self.caption_hash})
            if self.fuser is not None:
                fid = self.fuser.model_id
                self.fusion_cache = GenerationCache(cfg.cache_dir, "fusion-" + namespace_of(fid, self.fusion_hash), {
                    "role": "fusion", "model_id": fid, "prompt": self.fusion_prompt, "prompt_hash": self.fusion_hash})

    # generation through the caches -----------------------------------------------------------

    def _captions(self, images: dict[str, bytes]) -> dict[str, Generated]:
        """image sha256 -> the captioner's answer (cached where possible)."""
        out = self._cached(self.caption_cache, list(images))
        todo = [k for k in images if k not in out]
        if todo:
            new = dict(zip(todo, self.captioner.caption([images[k] for k in todo], self.caption_prompt)))
            self._store(self.caption_cache, new)
            out.update(new)
        return out

    def _fusions(self, inputs: dict[str, tuple[str, str]]) -> dict[str, Generated]:
        out = self._cached(self.fusion_cache, list(inputs))
        todo = [k for k in inputs if k not in out]
        if todo:
            prompts = [vecap.fusion_prompt(self.fusion_prompt, *inputs[k]) for k in todo]
            new = dict(zip(todo, self.fuser.complete(prompts)))
            self._store(self.fusion_cache, new)
            out.update(new)
        return out

    @staticmethod
    def _cached(cache: GenerationCache | None, keys: list[str]) -> dict[str, Generated]:
        if cache is None:
            return {}
        return {k: Generated(text=v.text, truncated=v.truncated) for k, v in cache.get_many(keys).items()}

    @staticmethod
    def _store(cache: GenerationCache | None, results: dict[str, Generated]) -> None:
        if cache is not None:
            ok = {k: Cached(g.text or "", g.truncated) for k, g in results.items() if g.ok}
            if ok:
                cache.put_many(ok)

    # one image's captions --------------------------------------------------------------------

    def _enrich(self, items: list[tuple[str, str, bytes]]) -> list[dict[str, Any]]:
        """(sha256, alt-text, image bytes) per image -> {caption_synthetic, caption_vecap,
        vecap_fallback, error, detail} per image, in order."""
        answers = self._captions({sha: data for sha, _, data in items})
        results, fusion_inputs = [], {}
        for sha, alt, _ in items:
            g = answers[sha]
            if not g.ok:
                results.append({"error": g.error, "detail": g.detail})
                continue
            synthetic, why = vecap.judge_caption(g.text)
            r = {"caption_synthetic": synthetic, "caption_vecap": None, "vecap_fallback": why}
            if synthetic is not None and self.fuser is not None:
                alt_clean = vecap.clean(alt)
                if not alt_clean:
                    r.update(caption_vecap=synthetic, vecap_fallback=vecap.NO_ALT_TEXT)
                else:
                    r["_fusion"] = _digest(alt_clean, synthetic)
                    fusion_inputs[r["_fusion"]] = (alt_clean, synthetic)
            results.append(r)
        fused = self._fusions(fusion_inputs) if fusion_inputs else {}
        for r in results:
            key = r.pop("_fusion", None)
            if key is None:
                continue
            alt_clean, synthetic = fusion_inputs[key]
            g = fused[key]
            if not g.ok:
                r.update(caption_vecap=synthetic, vecap_fallback=vecap.FUSION_ERROR)
            else:
                r["caption_vecap"], r["vecap_fallback"] = vecap.judge_fusion(
                    alt_clean, synthetic, g.text, truncated=g.truncated, max_words=self.config.max_fusion_words)
        return results

    def _txt_source(self, r: dict[str, Any]) -> str:
        order = {"vecap": ("vecap", "synthetic", "alt"), "synthetic": ("synthetic", "alt"), "alt": ("alt",)}
        return next(s for s in order[self.config.txt] if s == "alt" or r.get(TXT_COLUMNS[s]))

    # batches ---------------------------------------------------------------------------------

    def process(self, table: pa.Table) -> pa.Table:
        self.ensure_setup()
        kind = "doc" if "segments" in table.column_names else "pair"
        if kind == "doc" and not self.config.docs:
            return self._with_columns(table, table.to_pylist())
        rows = table.to_pylist()
        live = [r for r in rows if not r.get("drop_reason")]
        if kind == "pair":
            self._pairs([r for r in live if r.get("image") is not None])
        else:
            self._docs(live)
        return self._with_columns(table, rows)

    def _meta(self) -> dict[str, Any]:
        return {"caption_model": self.captioner.model_id, "caption_prompt_hash": self.caption_hash,
                "fusion_model": self.fuser.model_id if self.fuser else None, "fusion_prompt_hash": self.fusion_hash}

    def _pairs(self, rows: list[dict[str, Any]]) -> None:
        items = [(r.get("image_sha256") or image_digest(r["image"]), r.get("caption") or "", r["image"]) for r in rows]
        for row, r in zip(rows, self._enrich(items)):
            row["caption_alt"] = row.get("caption")
            if "error" in r:
                if self.config.on_unavailable == "drop":
                    row.update(drop_stage=self.name, drop_reason=r["error"], drop_detail=f"captioner: {r['detail']}"[:500])
                    continue
                r = {"caption_synthetic": None, "caption_vecap": None, "vecap_fallback": CAPTION_UNAVAILABLE}
            row.update(r, **self._meta())
            row["txt_source"] = self._txt_source(row)

    def _docs(self, rows: list[dict[str, Any]]) -> None:
        where, items = [], []
        for n, row in enumerate(rows):
            images, shas = row.get("images") or [], row.get("image_sha256s") or []
            segments = load_segments(row)
            for i, seg in enumerate(segments):
                if seg.get("type") == "image" and seg.get("image") is not None and seg["image"] < len(images):
                    data = images[seg["image"]]
                    sha = shas[seg["image"]] if seg["image"] < len(shas) and shas[seg["image"]] else \
                        hashlib.sha256(data).hexdigest()
                    where.append((n, i))
                    items.append((sha, seg.get("alt") or "", data))
            row["_segments"] = segments
        for (n, i), r in zip(where, self._enrich(items)):
            if "error" in r:
                r = {"caption_synthetic": None, "caption_vecap": None, "vecap_fallback": CAPTION_UNAVAILABLE}
            rows[n]["_segments"][i].update(r)
        captioned = {n for n, _ in where}
        for n, row in enumerate(rows):
            row["segments"] = dump_json(row.pop("_segments"))
            if n in captioned:
                row.update(self._meta())

    def _with_columns(self, table: pa.Table, rows: list[dict[str, Any]]) -> pa.Table:
        schema = table.schema
        for name, dtype in self.output_columns.items():
            if schema.get_field_index(name) < 0:
                schema = schema.append(pa.field(name, dtype))
        return conform(pa.Table.from_pylist(rows, schema=schema), schema)


def model_calls(stage: RecaptionStage) -> dict[str, int]:
    """How many times this process's stage instance asked its models (tests, benchmarks)."""
    out = {"caption_calls": stage.captioner.calls, "caption_items": stage.captioner.items}
    if stage.fuser is not None:
        out.update(fusion_calls=stage.fuser.calls, fusion_items=stage.fuser.items)
    return out


__all__ = ["RecaptionStage", "TXT_COLUMNS", "model_calls"]
