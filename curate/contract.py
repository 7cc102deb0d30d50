"""The data contract: record schemas, shard layout, sidecars, manifest and ledger.

This is the one module that `train/` and `tools/` import from `curate/`. It holds what a
curated output *is* on disk, so a reader never has to know how it was produced, and re-exports
the two modules a reader needs with it: the storage seam (curate/storage.py: locations, reads
with their store retries) and the typed manifest (curate/manifest.py: `Manifest`):

    OUT/pairs/00000.tar  00000.parquet  sizes.json   WebDataset: KEY.jpg KEY.txt KEY.json
    OUT/docs/00000.tar   00000.parquet               WebDataset: KEY.json KEY.0.jpg KEY.1.jpg ...
    OUT/text/00000.tar   00000.parquet               WebDataset: KEY.txt KEY.json
    OUT/manifest.json                                shards, counts, bytes, sha256, recipe + hash
    OUT/ledger/*.parquet                             exactly one outcome per input id

Records move between stages as Arrow tables with one schema per kind (below). A row is never
deleted: a stage that rejects it sets `drop_stage`, `drop_reason` (a short stable code) and
`drop_detail`, and the runner routes it to the ledger.

A sidecar (NNNNN.parquet) has one row per sample, in tar order: our fixed columns
(`SIDECAR_COMMON`, `SIDECAR_KIND`), then every scalar column stages added, then the typed input
columns a source carried (`meta_<name>`, sorted by name; today a URL list's extra columns, typed
as its file declares: parquet's Arrow types, text for csv/tsv, a JSON value's own type for
json/jsonl; the rules are curate/carried.py's, re-exported here). The text kind's sidecar holds
each record's `text` (exactly KEY.txt): text users (datatrove, NeMo Curator) read text from
parquet, and zstd keeps it near the text's compressed size. A doc's sidecar holds no text: a doc's text is interleaved with its images in KEY.json's
segments, and a flattened copy would lose where the images were. Sidecar columns are only ever
added: readers name the columns they read, so a new column needs no `format_version` bump;
removing, renaming or retyping one of ours does.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa

# Re-exported: train/ and tools/ reach the storage seam, the manifest's type and the recipe reading
# (curate/recipe_io.py, shared by curate and train recipes) through here.
from curate.manifest import (  # noqa: F401
    FORMAT_VERSION, MANIFEST, KindEntry, Manifest, ManifestError, ShardEntry, WithdrawnEntry, manifest_path,
    read_manifest, sizes_json, withdrawn_keys,
)
# Re-exported: the carried input columns' sidecar types (curate/carried.py), for sources and verify.
from curate.carried import (  # noqa: F401
    META_PREFIX, META_TYPES, meta_type, meta_type_name, meta_value, value_type_name,
)
from curate.recipe_io import RecipeError, parse_override, read_recipe_yaml, validate_recipe  # noqa: F401
from curate.storage import (  # noqa: F401
    RETRIES, RETRY_ATTEMPTS, RateLimitedLog, StoreUnavailable, check_url, dask_url, exists, fs_path, inside,
    is_transient_error, is_url, join, list_names, location, missing_files, open_read, parquet_file, parquet_files,
    read_json, read_range, read_schema, read_table, relative, retrying,
)

KINDS: tuple[str, ...] = ("pair", "doc", "text")
KIND_DIRS: dict[str, str] = {"pair": "pairs", "doc": "docs", "text": "text"}

LEDGER_DIR = "ledger"
SIZES_JSON = "sizes.json"  # open_clip's loader reads it from beside the tars
# A local attempt's file before its rename (NAME.<12 hex>.tmp, curate/engine/commit.py): never part
# of a finished output.
TMP_SUFFIX = ".tmp"

# ---------------------------------------------------------------------------------------------
# Record schemas (between stages)
# ---------------------------------------------------------------------------------------------

COMMON_FIELDS: list[pa.Field] = [
    pa.field("id", pa.string(), nullable=False),  # unique input id: "<source>:<locator>"
    pa.field("source", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("attempts", pa.int32()),
    pa.field("extra", pa.string()),  # JSON object of carried input columns, copied into KEY.json
    # JSON object: carried column -> its sidecar type (a META_TYPES name, or null: no type known),
    # from sources that know their columns' types (url_list); those columns become `meta_<name>`
    pa.field("extra_types", pa.string()),
    pa.field("drop_stage", pa.string()),
    pa.field("drop_reason", pa.string()),
    pa.field("drop_detail", pa.string()),
]

IMAGE_FIELDS: list[pa.Field] = [
    pa.field("image", pa.binary()),  # encoded bytes (JPEG/PNG/WebP); never decoded in bulk
    pa.field("image_format", pa.string()),  # file extension in the tar: jpg, png, webp
    pa.field("image_sha256", pa.string()),  # the hash of `image` as it is now (wherever a stage reads it)
    pa.field("image_nbytes", pa.int64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
]

SEGMENT_FIELDS: list[pa.Field] = [
    # The raw page a doc was extracted from (WARC/HTML sources), cleared by the extraction stage
    # once `segments` exist: never in a tar, a sidecar or the ledger. `charset` is what the HTTP
    # header or the source declared (a hint only: the bytes decide).
    pa.field("html", pa.binary()),
    pa.field("charset", pa.string()),
    # JSON list, in reading order: {"type": "text", "text": ...} or
    # {"type": "image", "image": i, "url": ..., "alt": ...} where i indexes the image lists below
    # (before the images are fetched, image segments carry no "image" index: see curate/documents.py).
    pa.field("segments", pa.string()),
    pa.field("images", pa.list_(pa.binary())),
    pa.field("image_formats", pa.list_(pa.string())),
    pa.field("image_sha256s", pa.list_(pa.string())),
    pa.field("image_nbytes_list", pa.list_(pa.int64())),
    # per image, as the image stage found them: stored size (after resizing) and original size
    pa.field("image_widths", pa.list_(pa.int32())),
    pa.field("image_heights", pa.list_(pa.int32())),
    pa.field("image_original_widths", pa.list_(pa.int32())),
    pa.field("image_original_heights", pa.list_(pa.int32())),
    # JSON list of {"segment": i, "reason": code, "detail": ...}: segments dropped inside the doc.
    pa.field("segment_drops", pa.string()),
]

RECORD_SCHEMAS: dict[str, pa.Schema] = {
    "pair": pa.schema(COMMON_FIELDS + [pa.field("caption", pa.string())] + IMAGE_FIELDS),
    "doc": pa.schema(COMMON_FIELDS + SEGMENT_FIELDS),
    "text": pa.schema(COMMON_FIELDS + [
        pa.field("text", pa.string()),
        # JSON list of {"segment": i, "reason": code, "detail": ...}: paragraphs removed from `text`
        pa.field("segment_drops", pa.string()),
    ]),
}

DROP_COLUMNS = ("drop_stage", "drop_reason", "drop_detail")
DUPLICATE = "duplicate"  # the drop reason of every dedup stage (exact, near, minhash, segments)
# Columns that hold payload bytes: cleared on dropped rows, never copied into sidecars.
HEAVY_COLUMNS = ("image", "images", "html")


def record_schema(kind: str, extra_columns: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """The schema of `kind` records plus the columns stages add (scores, hashes, captions)."""
    if kind not in RECORD_SCHEMAS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    schema = RECORD_SCHEMAS[kind]
    for name, dtype in (extra_columns or {}).items():
        if schema.get_field_index(name) >= 0:
            if schema.field(name).type != dtype:
                raise ValueError(f"column {name!r} redeclared as {dtype}, is {schema.field(name).type}")
            continue
        schema = schema.append(pa.field(name, dtype))
    return schema


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Order and cast `table`'s columns to `schema`, adding missing nullable columns as nulls."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def image_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Shard layout and sample encoding
# ---------------------------------------------------------------------------------------------

SAFE_MEMBER = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+$")
IMAGE_EXTENSIONS = ("jpg", "png", "webp")
MAX_SAMPLES_PER_SHARD = 100_000  # keys are "<shard:05d><index:05d>"


def shard_stem(index: int) -> str:
    return f"{index:05d}"


def sample_key(shard: int, index: int) -> str:
    """Keys sort in write order and are unique within a kind's folder (shard-major); each kind
    numbers its shards from 00000, so the (kind, key) pair is what is unique across an output."""
    if not 0 <= index < MAX_SAMPLES_PER_SHARD:
        raise ValueError(f"sample index {index} outside a shard's 0..{MAX_SAMPLES_PER_SHARD - 1}")
    return f"{shard:05d}{index:05d}"


def kind_dir(out: str | Path, kind: str) -> Path:
    return location(out) / KIND_DIRS[kind]


def tar_path(out: str | Path, kind: str, shard: int) -> Path:
    return kind_dir(out, kind) / f"{shard_stem(shard)}.tar"


def sidecar_path(out: str | Path, kind: str, shard: int) -> Path:
    return kind_dir(out, kind) / f"{shard_stem(shard)}.parquet"


def is_safe_member(name: str) -> bool:
    return bool(SAFE_MEMBER.match(name)) and ".." not in name


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


# Bookkeeping that must not reach KEY.json (attempts vary with the network, not the data).
_NOT_IN_JSON = set(HEAVY_COLUMNS) | set(DROP_COLUMNS) | {"extra", "extra_types", "attempts", "charset"}


def _metadata(row: dict[str, Any], key: str, skip: set[str]) -> dict[str, Any]:
    """KEY.json: carried input columns first, then ours (ours win on a name clash)."""
    meta: dict[str, Any] = {}
    if row.get("extra"):
        meta.update(json.loads(row["extra"]))
    for name, value in row.items():
        if name in skip or name in _NOT_IN_JSON or name.startswith("_"):
            continue
        if isinstance(value, (bytes, bytearray, list, dict)):
            continue
        meta[name] = value
    meta["key"] = key
    return meta


PACK_STAGE = "pack"
UNSUPPORTED_FORMAT = "unsupported_format"


def unpackable(kind: str, row: dict[str, Any]) -> str | None:
    """Why a live row cannot be written as a sample (it is then dropped at stage "pack" with
    code `unsupported_format`), or None. A recipe without the image stage can meet a GIF."""
    if kind == "pair" and row.get("image_format") not in IMAGE_EXTENSIONS:
        return f"image format {row.get('image_format')!r} is not one of {IMAGE_EXTENSIONS}; add the image stage"
    if kind == "doc":
        bad = sorted({f for f in row.get("image_formats") or [] if f not in IMAGE_EXTENSIONS})
        if bad:
            return f"image formats {bad} are not among {IMAGE_EXTENSIONS}; add the image stage"
    return None


# KEY.txt of a pair: the alt-text, unless the recaptioning stage chose another caption for it
# (`txt_source`, curate/stages/recaption.py); the alt-text stays in `caption`/`caption_alt`.
PAIR_TEXT_COLUMNS = {"alt": "caption", "synthetic": "caption_synthetic", "vecap": "caption_vecap"}


def pair_text(row: dict[str, Any]) -> str:
    column = PAIR_TEXT_COLUMNS.get(row.get("txt_source") or "alt", "caption")
    return row.get(column) or row.get("caption") or ""


def encode_sample(kind: str, row: dict[str, Any], key: str) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in a fixed order; names are `KEY.ext`."""
    if kind == "pair":
        ext = row["image_format"]
        if ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"pair {row['id']}: image format {ext!r} not in {IMAGE_EXTENSIONS}")
        meta = _metadata(row, key, skip={"image_nbytes"})
        return [
            (f"{key}.{ext}", bytes(row["image"])),
            (f"{key}.json", _json_bytes(meta)),
            (f"{key}.txt", pair_text(row).encode()),
        ]
    if kind == "doc":
        meta = _metadata(row, key, skip={"segments", "segment_drops", "image_nbytes_list"})
        meta["segments"] = json.loads(row["segments"] or "[]")
        members = [(f"{key}.json", _json_bytes(meta))]
        for i, (data, ext) in enumerate(zip(row.get("images") or [], row.get("image_formats") or [])):
            if ext not in IMAGE_EXTENSIONS:
                raise ValueError(f"doc {row['id']}: image format {ext!r} not in {IMAGE_EXTENSIONS}")
            members.append((f"{key}.{i}.{ext}", bytes(data)))
        return members
    if kind == "text":
        meta = _metadata(row, key, skip={"text", "segment_drops"})
        return [(f"{key}.json", _json_bytes(meta)), (f"{key}.txt", (row.get("text") or "").encode())]
    raise ValueError(f"unknown record kind {kind!r}")


TAR_BLOCK = 512


def member_footprint(size: int) -> int:
    """Bytes a member of `size` bytes takes in a ustar archive (header + padded data)."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


# ---------------------------------------------------------------------------------------------
# Sidecars: one parquet per tar, indexing its samples for stats, reports and random access
# ---------------------------------------------------------------------------------------------

MEMBER_TYPE = pa.struct(
    [pa.field("name", pa.string()), pa.field("offset", pa.int64()), pa.field("size", pa.int64())]
)

SIDECAR_COMMON: list[pa.Field] = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("url", pa.string()),
    # data offset and size of every member inside the tar: read one sample without a scan
    pa.field("members", pa.list_(MEMBER_TYPE)),
    pa.field("sample_bytes", pa.int64()),
    pa.field("n_images", pa.int32()),
    pa.field("token_count", pa.int32()),
    pa.field("tokenizer", pa.string()),
]

SIDECAR_KIND: dict[str, list[pa.Field]] = {
    "pair": [
        pa.field("caption", pa.string()),
        pa.field("caption_chars", pa.int32()),
        pa.field("image_format", pa.string()),
        pa.field("image_sha256", pa.string()),
        pa.field("image_nbytes", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
    ],
    "doc": [
        pa.field("n_segments", pa.int32()),
        pa.field("n_text_segments", pa.int32()),
        pa.field("text_chars", pa.int64()),
        pa.field("segments_dropped", pa.int32()),
    ],
    "text": [
        pa.field("text", pa.string()),  # KEY.txt as a string: text users read it from parquet
        pa.field("text_chars", pa.int64()),
        pa.field("segments_dropped", pa.int32()),
    ],
}

# Record columns that never reach a sidecar (payloads, bookkeeping, what the sidecar derives).
_NOT_IN_SIDECAR = set(HEAVY_COLUMNS) | set(DROP_COLUMNS) | {
    "extra", "segments", "segment_drops", "image_formats", "image_sha256s", "image_nbytes_list",
    "image_widths", "image_heights", "image_original_widths", "image_original_heights", "text",
    "attempts", "charset", "extra_types",
}


def sidecar_schema(kind: str, record: pa.Schema | None = None) -> pa.Schema:
    """Fixed columns, then every scalar column stages added to the record (scores, language...)."""
    fields = SIDECAR_COMMON + SIDECAR_KIND[kind]
    names = {f.name for f in fields}
    if record is not None:
        for f in record:
            if f.name in names or f.name in _NOT_IN_SIDECAR or f.name.startswith("_"):
                continue
            if pa.types.is_nested(f.type) or pa.types.is_binary(f.type):
                continue
            fields = fields + [f]
    return pa.schema(fields)


def sidecar_row(kind: str, row: dict[str, Any], key: str, members: list[dict[str, int | str]]) -> dict:
    """One sidecar row from a record row and the members written for it."""
    out = {k: v for k, v in row.items() if k not in _NOT_IN_SIDECAR}
    out.update(
        key=key,
        kind=kind,
        members=members,
        sample_bytes=sum(int(m["size"]) for m in members),
    )
    if kind == "pair":
        out["n_images"] = 1
        out["caption_chars"] = len(row.get("caption") or "")
    elif kind == "doc":
        segments = json.loads(row.get("segments") or "[]")
        out["n_images"] = sum(1 for s in segments if s.get("type") == "image")
        out["n_segments"] = len(segments)
        out["n_text_segments"] = sum(1 for s in segments if s.get("type") == "text")
        out["text_chars"] = sum(len(s.get("text", "")) for s in segments if s.get("type") == "text")
        out["segments_dropped"] = len(json.loads(row.get("segment_drops") or "[]"))
    else:
        out["n_images"] = 0
        out["text"] = row.get("text") or ""  # exactly KEY.txt
        out["text_chars"] = len(out["text"])
        out["segments_dropped"] = len(json.loads(row.get("segment_drops") or "[]"))
    values = json.loads(row.get("extra") or "{}")
    if isinstance(values, dict) and (values or row.get("extra_types")):
        # typed until `sidecar_table` knows the shard's column types: as the source declares
        # them (a URL list), else from the JSON values (a folder's or a tar's json, a WARC's facts)
        types = json.loads(row["extra_types"]) if row.get("extra_types") else \
            {name: value_type_name(v) for name, v in values.items()}
        out["extra_types"] = {META_PREFIX + name: (values.get(name), t) for name, t in types.items()}
    return out


def sidecar_table(kind: str, record: pa.Schema | None, rows: list[dict[str, Any]]) -> pa.Table:
    """One shard's sidecar from its `sidecar_row`s: `sidecar_schema` plus the carried columns,
    each typed by `meta_type` over the shard's rows (the same rows give the same bytes)."""
    carried: dict[str, set[str]] = {}
    for row in rows:
        for name, (_, t) in (row.get("extra_types") or {}).items():
            carried.setdefault(name, set()).update([t] if t else [])
    types = {name: meta_type(carried[name]) for name in sorted(carried)}
    schema = sidecar_schema(kind, record)
    schema = pa.schema(list(schema) + [pa.field(n, t) for n, t in types.items() if n not in schema.names])
    if types:
        rows = [{**row, **{n: meta_value(v, types[n]) for n, (v, _) in row.get("extra_types", {}).items()}}
                for row in rows]
    return pa.Table.from_pylist(rows, schema=schema)


def read_sidecars(out: str | Path, kind: str, columns: list[str] | None = None) -> pa.Table:
    """All sidecars of one kind, in shard order (only the shards the manifest names). Loads them
    whole: for big outputs iterate `Manifest.read(out).shards(kind)` instead. A carried `meta_`
    column is null in the shards that lack it (another source's)."""
    manifest = Manifest.read(out)
    tables = []
    for shard in manifest.shards(kind):
        path = inside(out, shard.sidecar)
        wanted = columns
        if columns is not None and any(c.startswith(META_PREFIX) for c in columns):
            wanted = [c for c in columns if c in read_schema(path).names]
        tables.append(read_table(path, columns=wanted))
    if not tables:
        return sidecar_schema(kind).empty_table() if columns is None else pa.table({c: [] for c in columns})
    # permissive: a carried JSON column may be int64 in one shard and float64 in the next
    table = pa.concat_tables(tables, promote_options="permissive")
    if columns is None:
        return table
    return pa.table({c: table[c] if c in table.column_names else pa.nulls(table.num_rows) for c in columns})


# ---------------------------------------------------------------------------------------------
# Ledger: exactly one outcome per input id
# ---------------------------------------------------------------------------------------------

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("domain", pa.string()),
        pa.field("outcome", pa.string(), nullable=False),  # "kept" | "dropped"
        pa.field("stage", pa.string()),  # the stage that dropped it
        pa.field("drop_reason", pa.string()),
        pa.field("drop_detail", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("shard", pa.string()),  # e.g. "pairs/00000.tar"
        pa.field("key", pa.string()),
        pa.field("segments_total", pa.int32()),  # docs: segments seen / dropped inside
        pa.field("segments_dropped", pa.int32()),
    ]
)


def domain_of(url: str | None) -> str | None:
    if not url:
        return None
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host.lower() if host else None


def ledger_files(out: str | Path) -> list[Path]:
    return [inside(out, name) for name in Manifest.read(out).ledger]


def read_ledger(out: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The whole ledger (only files the manifest names). For big runs, read columns."""
    files = ledger_files(out)
    if not files:
        return LEDGER_SCHEMA.empty_table()
    return pa.concat_tables([read_table(f, columns=columns) for f in files])


def iter_ledger(out: str | Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    for f in ledger_files(out):
        yield from parquet_file(f).iter_batches(columns=columns)


# ---------------------------------------------------------------------------------------------
# Manifest (its type and reading: curate/manifest.py)
# ---------------------------------------------------------------------------------------------


def shard_urls(out: str | Path, kind: str) -> list[str]:
    """Local paths of the tars of one kind, in order: what a WebDataset reader is given."""
    return [str(inside(out, s.name)) for s in Manifest.read(out).shards(kind)]
