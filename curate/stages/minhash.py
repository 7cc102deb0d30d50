"""MinHash-LSH near-duplicate dedup of text: the `minhash` row stage and the `minhash_dedup`
global stage (docs and text records). The method, step by step, the LSH curve and the choices
behind them: docs/minhash.md.

`minhash` (a RowStage, kinds doc and text) adds `minhash_bands` (list<int64>, `bands` long) to each
live row: the row's text (`curate.documents.record_text`) normalised into words (step 2), cut into
distinct word `ngram`-grams (step 3; a text shorter than `ngram` words is one shingle), hashed
with SHA-1 to 64 bits (step 4), `bands * rows` min-hashes with datatrove's parameters for `seed`
(step 5: the same signature as datatrove's, value for value), folded into one band-salted int64
key per band (step 6). Deterministic across processes and runs. A text with no word, and a row
dropped earlier, gets null; a record that cannot be read is a `stage_error` drop. Run it after
HTML extraction (before, a page's doc has no words).

`minhash_dedup` (a GlobalStage, doc and text together) groups rows that share any band key,
transitively (curate.engine.near_groups; a bucket over `max_bucket` rows is chained in id order),
and keeps one per group: the highest `score_column` (nulls last), then the smallest id; the others
are dropped with `duplicate`, the detail naming the kept id. LSH candidates are duplicates: there
is no verification step.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field

from curate.contract import conform
from curate.documents import record_text, table_kind, words
from curate.stages.base import STAGE_ERROR, Drop, GlobalStage, RowStage, StageConfig, register
from curate.engine.near_groups import (
    DEFAULT_MAX_BUCKET, DEFAULT_WINDOW, ID_HASH, REF, band_pairs, components, keep_best, with_refs,
)

MERSENNE = np.uint64((1 << 61) - 1)
_SHIFT61 = np.uint64(61)
DEFAULT_NGRAM = 5
DEFAULT_BANDS = 14
DEFAULT_ROWS = 8
DEFAULT_SEED = 1  # datatrove's MinhashConfig default
CHUNK_VALUES = 4_000_000  # shingles x hashes per vectorised step: ~32 MB of uint64
COLUMN = "minhash_bands"
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_SCORE_COLUMN = r"^[a-z][a-z0-9_]*$"


# ---------------------------------------------------------------------------------------------
# Text -> shingle hashes
# ---------------------------------------------------------------------------------------------


def normalise(text: str) -> list[str]:
    """The words of `text` after normalisation (docs/minhash.md, step 2)."""
    text = text.lower()
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return words(_NUMBER.sub("0", text))


def shingles(text: str, ngram: int) -> set[str]:
    """The distinct word n-grams of `text` (docs/minhash.md, step 3)."""
    ws = normalise(text)
    if not ws:
        return set()
    if len(ws) < ngram:
        return {" ".join(ws)}
    return set(map(" ".join, zip(*(ws[i:] for i in range(ngram)))))


def sha1_64(items: Sequence[str]) -> np.ndarray:
    """64-bit SHA-1 hashes (datatrove's `sha1_hash64`) of strings, as uint64."""
    digests = b"".join(hashlib.sha1(s.encode("utf-8")).digest()[:8] for s in items)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


# ---------------------------------------------------------------------------------------------
# Shingle hashes -> signatures -> band keys
# ---------------------------------------------------------------------------------------------


def permutations(num_hashes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), each (num_hashes,) uint64: datatrove's draw for the same seed and size."""
    gen = np.random.RandomState(seed)
    a = gen.randint(1, MERSENNE, dtype=np.uint64, size=(1, num_hashes))
    b = gen.randint(0, MERSENNE, dtype=np.uint64, size=(1, num_hashes))
    return a[0], b[0]


def _mod_mersenne(x: np.ndarray) -> None:
    """x mod 2**61 - 1 in place, for any uint64 x: x = hi * 2**61 + lo = hi + lo (mod p)."""
    hi = x >> _SHIFT61
    x &= MERSENNE
    x += hi
    np.subtract(x, MERSENNE, out=x, where=x >= MERSENNE)


def signatures(hashes: Sequence[np.ndarray], num_hashes: int, seed: int) -> np.ndarray:
    """(len(hashes), num_hashes) uint64 min-hash signatures, one row per shingle-hash array
    (each non-empty). Work is in chunks of about CHUNK_VALUES values, whatever the documents'
    sizes: a chunk may hold many small documents or a slice of a huge one."""
    a, b = permutations(num_hashes, seed)
    out = np.full((len(hashes), num_hashes), np.iinfo(np.uint64).max, dtype=np.uint64)
    if not len(hashes):
        return out
    sizes = np.fromiter((len(h) for h in hashes), dtype=np.int64, count=len(hashes))
    if (sizes == 0).any():
        raise ValueError("every document needs at least one shingle")
    flat = np.concatenate(hashes).astype(np.uint64, copy=False)
    owner = np.repeat(np.arange(len(hashes)), sizes)
    step = max(1, CHUNK_VALUES // num_hashes)
    for start in range(0, len(flat), step):
        h, who = flat[start : start + step], owner[start : start + step]
        values = h[:, None] * a[None, :]  # wraps mod 2**64, as datatrove's
        values += b[None, :]
        _mod_mersenne(values)
        starts = np.flatnonzero(np.r_[True, who[1:] != who[:-1]])
        docs = who[starts]
        out[docs] = np.minimum(out[docs], np.minimum.reduceat(values, starts, axis=0))
    return out


def _fmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (a bijection on 64 bits that spreads every input bit)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def band_keys(signature: np.ndarray, bands: int, rows: int, seed: int) -> np.ndarray:
    """(n, bands) int64 band keys of (n, bands * rows) signatures (docs/minhash.md, step 6)."""
    n = signature.shape[0]
    if signature.shape[1] != bands * rows:
        raise ValueError(f"signature of {signature.shape[1]} values is not {bands} bands x {rows} rows")
    runs = signature.reshape(n, bands, rows)
    salt = _fmix64(np.arange(1, bands + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                   ^ np.uint64(seed & (2**64 - 1)))
    state = np.broadcast_to(salt, (n, bands)).copy()
    for j in range(rows):
        state = _fmix64(state ^ runs[:, :, j])
    return state.view(np.int64)


def text_band_keys(texts: Sequence[str | None], ngram: int, bands: int, rows: int, seed: int) -> list[list[int] | None]:
    """The `minhash_bands` value of each text: `bands` ints, or None for a text with no word
    (or None)."""
    sets = [shingles(t, ngram) if t else set() for t in texts]
    present = [i for i, s in enumerate(sets) if s]
    out: list[list[int] | None] = [None] * len(texts)
    if present:
        sig = signatures([sha1_64(list(sets[i])) for i in present], bands * rows, seed)
        for i, keys in zip(present, band_keys(sig, bands, rows, seed).tolist()):
            out[i] = keys
    return out


# ---------------------------------------------------------------------------------------------
# The row stage
# ---------------------------------------------------------------------------------------------


class MinhashConfig(StageConfig):
    kind: Literal["minhash"] = "minhash"
    ngram: int = Field(DEFAULT_NGRAM, ge=1, le=64)
    bands: int = Field(DEFAULT_BANDS, ge=1, le=512)
    rows: int = Field(DEFAULT_ROWS, ge=1, le=64)
    # Draws the permutations: every worker and every run with the same seed computes the same
    # signatures; stages whose signatures are compared must share it (and ngram, bands, rows).
    seed: int = Field(DEFAULT_SEED, ge=0, lt=2**32)


@register
class MinhashStage(RowStage):
    """Adds `minhash_bands` to docs and texts (see the module docstring)."""

    name = "minhash"
    Config = MinhashConfig
    config: MinhashConfig
    kinds = ("doc", "text")
    output_columns: ClassVar[dict[str, pa.DataType]] = {COLUMN: pa.list_(pa.int64())}

    def process_row(self, row: dict[str, Any]) -> Drop | None:
        """One row (the batch path, `process`, is what the runner uses; this serves callers that
        hold a single row). Needs the row's kind, so it accepts docs and texts by their fields."""
        kind = "doc" if "segments" in row else "text"
        cfg = self.config
        row[COLUMN] = text_band_keys([record_text(kind, row)], cfg.ngram, cfg.bands, cfg.rows, cfg.seed)[0]
        return None

    def process(self, table: pa.Table) -> pa.Table:
        """The whole batch at once: only the text columns become Python objects (a doc's html and
        image bytes stay in Arrow), and the signatures are one vectorised computation."""
        self.ensure_setup()
        cfg = self.config
        kind = table_kind(table.schema)
        source = ["segments"] if kind == "doc" else ["text"] if kind == "text" else ["caption"]
        rows = table.select(["drop_reason", *source]).to_pylist()
        texts: list[str | None] = [None] * len(rows)
        errors: dict[int, Drop] = {}
        for i, row in enumerate(rows):
            if row["drop_reason"]:
                continue
            try:
                texts[i] = record_text(kind, row)
            except Exception as exc:  # a record we cannot read: one sample's error
                if cfg.on_error == "raise":
                    raise
                errors[i] = Drop(STAGE_ERROR, f"{type(exc).__name__}: {exc}")
        keys = text_band_keys(texts, cfg.ngram, cfg.bands, cfg.rows, cfg.seed)
        schema = table.schema
        if schema.get_field_index(COLUMN) < 0:
            schema = schema.append(pa.field(COLUMN, self.output_columns[COLUMN]))
        out = conform(table, schema)
        i = schema.get_field_index(COLUMN)
        out = out.set_column(i, schema.field(i), pa.array(keys, type=self.output_columns[COLUMN]))
        return _with_drops(out, errors, self.name) if errors else out


def _with_drops(table: pa.Table, errors: dict[int, Drop], stage: str) -> pa.Table:
    values = {c: table.column(c).to_pylist() for c in ("drop_stage", "drop_reason", "drop_detail")}
    for i, drop in errors.items():
        values["drop_stage"][i], values["drop_reason"][i], values["drop_detail"][i] = stage, drop.reason, drop.detail
    for column, data in values.items():
        j = table.schema.get_field_index(column)
        table = table.set_column(j, table.schema.field(j), pa.array(data, type=pa.string()))
    return table


# ---------------------------------------------------------------------------------------------
# The global stage
# ---------------------------------------------------------------------------------------------


class MinhashDedupConfig(StageConfig):
    kind: Literal["minhash_dedup"] = "minhash_dedup"
    # A float column of a score stage that ranks the members of a group (higher is kept; nulls
    # last); None keeps the smallest id.
    score_column: str | None = Field(None, pattern=_SCORE_COLUMN)
    max_bucket: int = Field(DEFAULT_MAX_BUCKET, ge=2)
    window: int = Field(DEFAULT_WINDOW, ge=1)


def _explode_bands(part: pd.DataFrame) -> pd.DataFrame:
    """`[_ref, _id_hash, _band]`: one row per (row, band key). The keys are band-salted (step 6),
    so one band column serves every band."""
    keys = part[COLUMN].to_numpy()
    lengths = np.fromiter((len(k) for k in keys), dtype=np.int64, count=len(keys))
    flat = np.concatenate([np.asarray(k, dtype=np.int64) for k in keys]) if len(keys) else np.zeros(0, np.int64)
    return pd.DataFrame({REF: np.repeat(part[REF].to_numpy(), lengths),
                         ID_HASH: np.repeat(part[ID_HASH].to_numpy(), lengths), "_band": flat})


@register
class MinhashDedup(GlobalStage):
    """Drops all but one of each group of texts linked by a shared MinHash band key."""

    name = "minhash_dedup"
    kinds = ("doc", "text")
    Config = MinhashDedupConfig
    config: MinhashDedupConfig

    def __init__(self, config: MinhashDedupConfig):
        super().__init__(config)
        self.last_summary: dict[str, Any] = {}

    @property
    def columns(self) -> list[str]:  # type: ignore[override]
        score = self.config.score_column
        return [COLUMN, *([score] if score else [])]

    def decide(self, live: Any) -> Any:
        import dask  # imported where a global pass runs (~0.15 s): importing the stages stays light

        cfg = self.config
        live = with_refs(live[live[COLUMN].notnull()])  # refs, not ids, move through the shuffles
        meta = pd.DataFrame({REF: pd.Series(dtype=np.int64), ID_HASH: pd.Series(dtype=np.int64),
                             "_band": pd.Series(dtype=np.int64)})
        long = live[[REF, ID_HASH, COLUMN]].map_partitions(_explode_bands, meta=meta)
        candidates = band_pairs(long, ["_band"], order=ID_HASH, max_bucket=cfg.max_bucket, window=cfg.window,
                                key=REF).persist()
        rounds: dict[str, int] = {}
        groups = components(candidates, stats=rounds)
        counts = dask.compute(candidates.shape[0], groups.shape[0], groups["group"].nunique())
        pairs, grouped, n_groups = map(int, counts)
        self.last_summary = {"candidate_pairs": pairs, "grouped_rows": grouped, "groups": n_groups,
                             "duplicates": grouped - n_groups, **rounds}
        return keep_best(live, groups, cfg.score_column, "near duplicate of {kept} (MinHash-LSH: a band shared)",
                         key=REF)

    def summary(self) -> dict[str, Any]:
        return dict(self.last_summary)
