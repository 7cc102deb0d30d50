"""`mm1 verify OUT`: check a finished curation output against the shard contract.

What is checked (each failure is one error naming the file, the key and expected vs found):

- manifest: shard names are exactly `<kind dir>/<NNNNN>.tar` / `.parquet` (so a manifest cannot
  point outside OUT), shard numbers unique per kind, per-kind and overall counts add up;
- files: every tar and sidecar exists as a regular file (not a link), with the manifest's byte size
  and sha256;
- tars, read twice: with `tarfile` (every member a regular file with a safe name, no duplicates,
  header offsets and sizes equal to the sidecar's `members`) and with the stock `webdataset` tar
  iterators on raw bytes, no decoding (samples per tar = manifest count = sidecar rows, each sample
  has the members its kind requires, KEY.json parses and names its key, member bytes read by
  seek + read at the sidecar's offsets equal what webdataset returned); the sidecar's copies of
  the sample agree with its members: a text sidecar's `text` is KEY.txt, each carried
  `meta_<name>` column holds KEY.json's `name` (unless `name` is one of ours, which KEY.json
  gives priority);
- keys unique within each kind across all its shards (shard numbers, hence keys, restart per kind:
  the same key may name a pair and a doc; the ledger tells them apart by shard);
- ledger: no id twice, outcome in {kept, dropped}, dropped rows have a reason, every kept row names
  a (shard, key) some sidecar holds and every sidecar key is kept exactly once or withdrawn by the
  manifest (a `--retry-failed` round, curate/engine/retry.py), never both; ledger totals and per
  stage/reason drop counts equal the manifest's;
- no stray entries in the kind folders or ledger/ that the manifest does not name (pairs/sizes.json
  excepted, and it must equal the manifest's counts), no leftover `*.tmp` anywhere under OUT (on
  a local disk: on an object store attempts keep their own names, and the runner sweeps those
  no marker names).

OUT may be an fsspec URL (s3://bucket/run): every file is then read from the store.

Memory stays bounded on big outputs: tars and sidecars are handled one shard at a time, the ledger
is streamed, and whole-output uniqueness and the ledger <-> sidecar join work on sorted 64-bit
hashes (8 bytes a row); any hash that repeats or mismatches is resolved exactly by a second pass
over the strings, so a reported error is never a hash artefact.

Untrusted input: nothing is decoded or unpickled, manifest paths are validated before opening,
tars are read from file objects we open (never through webdataset's URL opener, so no `pipe:`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pandas.util import hash_array
from webdataset import tariterators

from curate.contract import (
    IMAGE_EXTENSIONS, KIND_DIRS, KINDS, LEDGER_DIR, META_PREFIX, RECORD_SCHEMAS, SIZES_JSON, TMP_SUFFIX, KindEntry,
    Manifest, ManifestError, ShardEntry, is_safe_member, is_url, location, meta_value, open_read, parquet_file,
    read_json, read_table, shard_stem, sizes_json,
)

_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_DOC_IMAGE = re.compile(r"^(\d+)\.(" + "|".join(IMAGE_EXTENSIONS) + ")$")
_LEDGER_COLUMNS = ["id", "outcome", "stage", "drop_reason", "shard", "key"]


@dataclass
class VerifyReport:
    ok: bool
    errors: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    def format(self) -> str:
        head = "OK" if self.ok else f"FAILED: {len(self.errors)} error(s)"
        done = ", ".join(f"{k} {v:,}" for k, v in self.checked.items())
        return "\n".join([f"verify {head} ({done})", *(f"  {e}" for e in self.errors)]) + "\n"


class _Errors:
    """Error messages, at most `cap` per check (then one line saying how many more)."""

    def __init__(self, cap: int):
        self.cap = cap
        self.messages: list[str] = []
        self.per_check: Counter[str] = Counter()

    def add(self, check: str, message: str) -> None:
        self.per_check[check] += 1
        if self.per_check[check] <= self.cap:
            self.messages.append(message)

    def finish(self) -> list[str]:
        more = [f"[{c}] {n - self.cap} more error(s) not shown" for c, n in self.per_check.items() if n > self.cap]
        return self.messages + more


def _hash(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of strings (nulls hash as "")."""
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    values = pc.fill_null(strings, "").to_numpy(zero_copy_only=False)
    return hash_array(np.asarray(values, dtype=object), categorize=False)


def _repeated(hashes: list[np.ndarray]) -> set[int]:
    h = np.sort(np.concatenate(hashes)) if hashes else np.empty(0, np.uint64)
    return set(h[1:][h[1:] == h[:-1]].tolist())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open_read(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Manifest and files
# ---------------------------------------------------------------------------------------------


def _manifest_shards(manifest: Manifest, err: _Errors) -> list[tuple[str, ShardEntry]]:
    """The shard entries whose names are exactly what the contract says (others are not opened).
    The manifest's structure is checked when it is read (`Manifest.from_dict`); its values here."""
    shards: list[tuple[str, ShardEntry]] = []
    n_withdrawn = 0
    for kind, entry in manifest.kinds.items():
        if kind not in KINDS:
            err.add("manifest", f"manifest: unknown kind {kind!r}, expected one of {KINDS}")
            continue
        seen: set[int] = set()
        for s in entry.shards:
            n = s.shard
            stem = f"{KIND_DIRS[kind]}/{shard_stem(n)}" if isinstance(n, int) and n >= 0 else None
            if stem is None or s.name != f"{stem}.tar" or s.sidecar != f"{stem}.parquet":
                err.add("manifest", f"manifest: {kind} shard {n!r} is named {s.name!r} / "
                        f"{s.sidecar!r}, expected {stem}.tar / {stem}.parquet; not opened")
                continue
            if n in seen:
                err.add("manifest", f"manifest: {kind} shard {n} listed twice")
                continue
            seen.add(n)
            if not all(isinstance(v, int) and v >= 0 for v in (s.count, s.bytes)):
                err.add("manifest", f"manifest: {s.name} count/bytes {s.count!r}/{s.bytes!r} "
                        "are not non-negative integers; not opened")
                continue
            if s.kind != kind:
                err.add("manifest", f"manifest: {s.name} has kind {s.kind!r}, listed under {kind!r}")
            shards.append((kind, s))
        withdrawn = _withdrawn(kind, entry, {s.name for k, s in shards if k == kind}, err)
        n_withdrawn += len(withdrawn)
        for what in ("count", "bytes"):
            total = sum(getattr(s, what) for k, s in shards if k == kind)
            total -= len(withdrawn) if what == "count" else 0
            if getattr(entry, what) != total:
                less = f" less {len(withdrawn)} withdrawn" if withdrawn and what == "count" else ""
                err.add("manifest", f"manifest: kinds.{kind}.{what} is {getattr(entry, what)}, "
                        f"its shards sum to {total}{less}")
    counts = manifest.counts
    kept = sum(s.count for _, s in shards) - n_withdrawn
    if counts.get("inputs") != counts.get("kept", 0) + counts.get("dropped", 0):
        err.add("manifest", f"manifest: counts.inputs {counts.get('inputs')} != kept {counts.get('kept')} "
                f"+ dropped {counts.get('dropped')}")
    if counts.get("kept") != kept:
        err.add("manifest", f"manifest: counts.kept is {counts.get('kept')}, the kinds' counts sum to {kept}")
    if sum(manifest.drops.values()) != counts.get("dropped"):
        err.add("manifest", f"manifest: drops sum to {sum(manifest.drops.values())}, "
                f"counts.dropped is {counts.get('dropped')}")
    return shards


def _withdrawn(kind: str, entry: KindEntry, tars: set[str], err: _Errors) -> list[str]:
    """The "shard/key" refs a retry round withdrew (samples in a tar, no longer in the output):
    each must name a listed tar of its kind, once."""
    refs: list[str] = []
    for w in entry.withdrawn or ():
        if not all(isinstance(v, str) for v in (w.shard, w.key, w.id)):
            err.add("manifest", f"manifest: kinds.{kind}.withdrawn entry {w.to_dict()!r} is not {{shard, key, id}}")
        elif w.shard not in tars:
            err.add("manifest", f"manifest: withdrawn {w.shard}/{w.key} names a tar the manifest lacks")
        else:
            refs.append(f"{w.shard}/{w.key}")
    for ref, n in Counter(refs).items():
        if n > 1:
            err.add("manifest", f"manifest: withdrawn {ref} listed {n} times")
    return sorted(set(refs))


def _check_file(out: Path, rel: str, size: int | None, sha: str | None, err: _Errors) -> bool:
    path = out / rel
    if path.is_symlink() or not path.is_file():
        err.add("files", f"{rel}: missing or not a regular file")
        return False
    found = path.stat().st_size
    if size is not None and found != size:
        err.add("files", f"{rel}: {found} bytes, manifest says {size}")
    digest = _sha256(path)
    if digest != sha:
        err.add("files", f"{rel}: sha256 {digest}, manifest says {sha}")
    return True


def _temporaries(out: Path) -> list[str]:
    """Leftover attempt files of killed tasks (`NAME.<uuid>.tmp`, local disks only: on an object
    store an attempt keeps its own name and what no marker names is swept by the runner)."""
    if is_url(out):
        return []
    found = []
    for root, dirs, files in os.walk(out):
        for name in sorted(dirs + files):
            if name.endswith(TMP_SUFFIX):
                found.append(Path(root, name).relative_to(out).as_posix())
    return found


def _check_layout(out: Path, manifest: Manifest, shards: list[tuple[str, ShardEntry]], err: _Errors) -> None:
    """Stray entries in the kind folders and ledger/, leftover temporaries, pairs/sizes.json."""
    named = {name for e in manifest.kinds.values() for s in e.shards for name in (s.name, s.sidecar)}
    named |= set(manifest.ledger)
    named.add(f"{KIND_DIRS['pair']}/{SIZES_JSON}")
    for folder in [*KIND_DIRS.values(), LEDGER_DIR]:
        if not (out / folder).is_dir():
            continue
        for entry in sorted((out / folder).iterdir()):
            rel = f"{folder}/{entry.name}"
            if entry.name.endswith(TMP_SUFFIX):
                continue  # reported below
            if rel not in named:
                err.add("stray", f"{rel}: not named by the manifest")
            elif entry.is_symlink() or not entry.is_file():
                err.add("stray", f"{rel}: not a regular file")
    for path in _temporaries(out):
        err.add("tmp", f"{path}: leftover temporary file")
    if "pair" in manifest.kinds:
        rel = f"{KIND_DIRS['pair']}/{SIZES_JSON}"
        expected = sizes_json([s for kind, s in shards if kind == "pair"])
        try:
            found = read_json(out / rel)
        except (OSError, ValueError) as exc:
            err.add("sizes", f"{rel}: unreadable ({exc})")
        else:
            if found != expected:
                err.add("sizes", f"{rel}: {found}, manifest counts give {expected}")


# ---------------------------------------------------------------------------------------------
# Tars
# ---------------------------------------------------------------------------------------------


def _sample_errors(kind: str, key: str, sample: dict[str, Any]) -> list[str]:
    """What is wrong with one webdataset sample's members (suffix -> raw bytes) for its kind."""
    suffixes = {s for s in sample if not s.startswith("__")}
    problems = []
    doc_images = {s for s in suffixes if _DOC_IMAGE.match(s)}
    if kind == "pair":
        images = sorted(suffixes & set(IMAGE_EXTENSIONS))
        if len(images) != 1:
            problems.append(f"{key}: expected one image member (.jpg/.png/.webp), found {images}")
        required, allowed = {"txt", "json"}, {"txt", "json", *IMAGE_EXTENSIONS}
    elif kind == "text":
        required = allowed = {"txt", "json"}
    else:
        required, allowed = {"json"}, {"json", *doc_images}
    problems += [f"missing member {key}.{s}" for s in sorted(required - suffixes)]
    problems += [f"unexpected member {key}.{s}" for s in sorted(suffixes - allowed)]
    if "txt" in suffixes:
        try:
            sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"{key}.txt is not UTF-8")
    if "json" not in suffixes:
        return problems
    try:
        meta = json.loads(sample["json"])
    except ValueError as exc:
        return problems + [f"{key}.json does not parse ({exc})"]
    found_key = meta.get("key") if isinstance(meta, dict) else None
    if found_key != key:
        return problems + [f"{key}.json names key {found_key!r}"]
    if kind == "doc":
        segments = meta.get("segments") if isinstance(meta.get("segments"), list) else []
        wanted = [s.get("image") for s in segments if isinstance(s, dict) and s.get("type") == "image"]
        have = [int(_DOC_IMAGE.match(s).group(1)) for s in doc_images]  # type: ignore[union-attr]
        if Counter(wanted) != Counter(have):
            problems.append(f"{key}.json has image segments {sorted(wanted, key=str)}, "
                            f"the tar has image members {sorted(have)}")
    return problems


def _copy_errors(kind: str, key: str, sample: dict[str, Any], idx: _Index, i: int) -> list[str]:
    """Where sidecar row i's copies of the sample's content (`text`, `meta_<name>`) disagree with
    its members (a member that is missing or does not parse is reported by `_sample_errors`)."""
    copies = idx.copies
    if not copies.num_columns:
        return []
    problems = []
    row = copies.slice(i, 1).to_pylist()[0]
    if kind == "text" and "text" in row and "txt" in sample:
        if row["text"] != sample["txt"].decode("utf-8", "replace"):
            problems.append(f"key {key}: `text` differs from {key}.txt")
    try:
        meta = json.loads(sample["json"]) if "json" in sample else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        return problems
    ours = set(RECORD_SCHEMAS[kind].names) | idx.columns
    for column in copies.column_names:
        name = column.removeprefix(META_PREFIX)
        if not column.startswith(META_PREFIX) or name in ours:
            continue  # not carried, or KEY.json holds our column of that name
        want = meta_value(meta.get(name), copies.schema.field(column).type)
        if json.dumps(want) != json.dumps(row[column]):  # JSON: NaN equals NaN, 1 is not True
            problems.append(f"key {key}: {column} is {row[column]!r}, {key}.json has {name!r}: {meta.get(name)!r}")
    return problems


def _wds_samples(path: Path, on_error: Any) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar through webdataset's own tar iterators (no decoding)."""
    with open_read(path) as f:
        files = tariterators.tar_file_expander([{"url": str(path), "stream": f}], handler=on_error)
        yield from tariterators.group_by_keys(files, handler=on_error)


_TYPES = {tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hard link", tarfile.DIRTYPE: "a directory",
          tarfile.FIFOTYPE: "a fifo", tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device"}


@dataclass
class _Index:
    """One sidecar's keys and member table, flattened for per-row lookups."""

    keys: list[str]
    row_of: dict[str, int]
    bounds: np.ndarray  # row i's members are [bounds[i], bounds[i + 1])
    names: list[str]
    offsets: np.ndarray
    sizes: np.ndarray
    copies: pa.Table  # the columns that copy a member's content: `text`, `meta_<name>`
    columns: set[str]  # every column of the sidecar

    @classmethod
    def read(cls, path: Path) -> tuple["_Index", pa.Table]:
        names = parquet_file(path).schema_arrow.names
        copied = [n for n in names if n == "text" or n.startswith(META_PREFIX)]
        table = read_table(path, columns=["key", "kind", "members", *copied])
        keys = table["key"].to_pylist()
        members = table["members"].combine_chunks()
        flat = members.values
        return cls(
            keys=keys,
            row_of={k: i for i, k in enumerate(keys)},
            bounds=members.offsets.to_numpy(),
            names=[n or "" for n in flat.field("name").to_pylist()],
            offsets=pc.fill_null(flat.field("offset"), -1).to_numpy(),
            sizes=pc.fill_null(flat.field("size"), -1).to_numpy(),
            copies=table.select(copied),
            columns=set(names),
        ), table

    def members(self, i: int) -> range:
        return range(int(self.bounds[i]), int(self.bounds[i + 1]))


def _check_headers(out: Path, name: str, sidecar: str, idx: _Index, err: _Errors, checked: Counter[str]) -> None:
    """tarfile's view: member types and names, and header offsets/sizes against the sidecar.

    Needed beside webdataset because webdataset silently skips links, directories and devices.
    """
    found: dict[str, tuple[int, int]] = {}
    listed = set(idx.names)
    size = (out / name).stat().st_size
    try:
        with open_read(out / name) as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
            for ti in tf:
                checked["members"] += 1
                if not ti.isreg():
                    err.add("members", f"{name}: member {ti.name!r} is {_TYPES.get(ti.type, f'type {ti.type!r}')}, "
                            "not a regular file")
                if not is_safe_member(ti.name):
                    err.add("members", f"{name}: unsafe member name {ti.name!r}")
                if ti.name in found:
                    err.add("members", f"{name}: member {ti.name!r} appears twice")
                if ti.offset_data + ti.size > size:
                    err.add("members", f"{name}: member {ti.name!r} ends at byte {ti.offset_data + ti.size}, "
                            f"past the end of the file ({size} bytes)")
                if ti.name.split(".", 1)[0] not in idx.row_of:
                    err.add("members", f"{name}: member {ti.name!r} belongs to no sidecar key")
                elif ti.name not in listed:
                    err.add("members", f"{name}: member {ti.name!r} is not listed in {sidecar}")
                found[ti.name] = (ti.offset_data, ti.size)
    except (tarfile.TarError, OSError) as exc:
        err.add("members", f"{name}: tarfile stops reading it after {len(found)} members ({exc})")
        return  # members past the damage cannot be compared
    for i, key in enumerate(idx.keys):
        if not _KEY.match(key or ""):
            err.add("keys", f"{sidecar}: unsafe key {key!r}")
        for j in idx.members(i):
            at = found.get(idx.names[j])
            if not idx.names[j].startswith(f"{key}."):
                err.add("offsets", f"{sidecar}: key {key} lists member {idx.names[j]!r} of another key")
            elif at is None:
                err.add("offsets", f"{sidecar}: key {key} lists member {idx.names[j]}, which {name} lacks")
            elif at != (idx.offsets[j], idx.sizes[j]):
                err.add("offsets", f"{sidecar}: {idx.names[j]} at offset {idx.offsets[j]} size {idx.sizes[j]}, "
                        f"but {name} has it at offset {at[0]} size {at[1]}")


def _check_samples(
    out: Path, kind: str, name: str, sidecar: str, idx: _Index, err: _Errors, checked: Counter[str],
    byte_checks: int | None,
) -> int:
    """webdataset's view: samples, required members, bytes at the sidecar offsets. Returns the count."""
    n = len(idx.keys)
    if byte_checks is None:
        to_compare = set(range(n))
    else:
        to_compare = set(np.linspace(0, n - 1, min(n, byte_checks), dtype=int).tolist()) if n else set()
    failures: set[str] = set()

    def on_error(exc: BaseException) -> bool:
        message = str(exc.args[0]).split(" @ ")[0] if exc.args else ""
        if message not in failures:  # webdataset reports one failure once per layer
            failures.add(message)
            err.add("webdataset", f"{name}: webdataset: {type(exc).__name__}: {message}")
        return True

    count = 0
    seen: set[str] = set()
    with open_read(out / name) as raw:
        for sample in _wds_samples(out / name, on_error):
            key = sample["__key__"]
            count += 1
            if key in seen:
                err.add("samples", f"{name}: key {key!r} read twice by webdataset (its members are not contiguous)")
            seen.add(key)
            i = idx.row_of.get(key)
            if i is None:
                err.add("samples", f"{name}: webdataset sample {key!r} is in no sidecar row")
                continue
            for problem in _sample_errors(kind, key, sample):
                err.add("samples", f"{name}: {problem}")
            for problem in _copy_errors(kind, key, sample, idx, i):
                err.add("sidecar", f"{sidecar}: {problem}")
            names = [idx.names[j] for j in idx.members(i)]
            read = {f"{key}.{s}" for s in sample if not s.startswith("__")}
            if set(names) != read:
                err.add("samples", f"{name}: key {key}: {sidecar} lists {sorted(names)}, webdataset read {sorted(read)}")
            if i not in to_compare:
                continue
            checked["byte_checked_samples"] += 1
            for j in idx.members(i):
                data = sample.get(idx.names[j][len(key) + 1:])
                if data is None:
                    continue  # reported above
                raw.seek(max(0, int(idx.offsets[j])))  # read no more than webdataset did: sizes are untrusted
                if idx.sizes[j] != len(data) or raw.read(len(data)) != data:
                    err.add("offsets", f"{sidecar}: bytes at offset {idx.offsets[j]} size {idx.sizes[j]} differ "
                            f"from member {idx.names[j]} as webdataset read it ({len(data)} bytes)")
    if not failures:
        for key in idx.keys:
            if key not in seen:
                err.add("samples", f"{name}: sidecar key {key} is not in the tar as webdataset reads it")
    return count


def _check_tar(
    out: Path, kind: str, s: ShardEntry, err: _Errors, checked: Counter[str], byte_checks: int | None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Check one tar against its sidecar; return hashes of its keys and of its "shard/key"s."""
    name, sidecar = s.name, s.sidecar
    try:
        idx, table = _Index.read(out / sidecar)
    except Exception as exc:  # a corrupt sidecar is a finding, not a crash
        err.add("sidecar", f"{sidecar}: unreadable ({exc})")
        return None
    checked["sidecar_rows"] += len(idx.keys)
    if len(idx.keys) != s.count:
        err.add("count", f"{sidecar}: {len(idx.keys)} rows, manifest says {s.count}")
    if len(idx.row_of) != len(idx.keys):
        dups = sorted(k for k, n in Counter(idx.keys).items() if n > 1)
        err.add("keys", f"{sidecar}: keys repeated within the shard: {dups[:5]}")
    for bad in sorted(set(table["kind"].to_pylist()) - {kind}, key=str):
        err.add("sidecar", f"{sidecar}: kind {bad!r} in a {kind} shard")
    _check_headers(out, name, sidecar, idx, err, checked)
    count = _check_samples(out, kind, name, sidecar, idx, err, checked, byte_checks)
    checked["samples"] += count
    if count != s.count:
        err.add("count", f"{name}: webdataset reads {count} samples, manifest says {s.count}")
    return _hash(table["key"]), _hash(_refs(name, table["key"]))


def _refs(name: str, keys: pa.ChunkedArray) -> pa.Array:
    """"shard/key" strings: how the ledger names a kept sample."""
    return pc.fill_null(pc.binary_join_element_wise(pa.scalar(name), keys.combine_chunks(), "/"), "")


def _sidecar_keys(out: Path, shards: list[tuple[str, ShardEntry]]) -> Iterator[tuple[str, str, pa.ChunkedArray]]:
    """(kind, tar name, keys) of every readable sidecar: the exact second pass behind hash suspects."""
    for kind, s in shards:
        try:
            yield kind, s.name, read_table(out / s.sidecar, columns=["key"])["key"]
        except Exception:  # already reported by the first pass
            continue


# ---------------------------------------------------------------------------------------------
# Ledger
# ---------------------------------------------------------------------------------------------


def _ledger_batches(out: Path, files: list[str]) -> Iterator[tuple[str, pa.Table]]:
    for rel in files:
        for batch in parquet_file(out / rel).iter_batches(columns=_LEDGER_COLUMNS):
            yield rel, pa.Table.from_batches([batch])


def _check_ledger(
    out: Path, manifest: Manifest, shards: list[tuple[str, ShardEntry]], sidecar_refs: list[np.ndarray],
    err: _Errors, checked: Counter[str],
) -> None:
    """Ledger rows against themselves, the manifest counts and the sidecars (via `sidecar_refs`)."""
    files = []
    for rel in manifest.ledger:
        p = Path(rel)
        if p.is_absolute() or len(p.parts) != 2 or p.parts[0] != LEDGER_DIR or not p.name.endswith(".parquet"):
            err.add("ledger", f"manifest: ledger file {rel!r} is not ledger/*.parquet; not opened")
        elif (out / p).is_symlink() or not (out / p).is_file():
            err.add("ledger", f"{rel}: missing or not a regular file")
        else:
            files.append(rel)
    tars = pa.array(sorted(s.name for _, s in shards), pa.string())
    totals: Counter[str] = Counter()
    drops: Counter[str] = Counter()
    id_hashes: list[np.ndarray] = []
    # a sidecar sample is owned by exactly one kept ledger row, or withdrawn by the manifest
    withdrawn = [f"{w.shard}/{w.key}" for e in manifest.kinds.values() for w in e.withdrawn or ()]
    kept_hashes: list[np.ndarray] = [_hash(pa.array(withdrawn, pa.string()))] if withdrawn else []
    try:
        for rel, t in _ledger_batches(out, files):
            checked["ledger_rows"] += t.num_rows
            outcome = pc.fill_null(t["outcome"], "")
            kept, dropped = pc.equal(outcome, "kept"), pc.equal(outcome, "dropped")
            for row in pc.value_counts(outcome).to_pylist():
                totals[row["values"]] += row["counts"]
            for i in pc.indices_nonzero(pc.invert(pc.or_(kept, dropped))).to_pylist():
                err.add("ledger", f"{rel}: id {t['id'][i]} has outcome {t['outcome'][i]}, expected kept or dropped")
            d = t.filter(dropped)
            for i in pc.indices_nonzero(pc.is_null(d["drop_reason"])).to_pylist():
                err.add("ledger", f"{rel}: dropped id {d['id'][i]} has no drop_reason")
            for row in d.group_by(["stage", "drop_reason"]).aggregate([([], "count_all")]).to_pylist():
                drops[f"{row['stage']}/{row['drop_reason']}"] += row["count_all"]
            k = t.filter(kept)
            for i in pc.indices_nonzero(pc.invert(pc.is_in(pc.fill_null(k["shard"], ""), tars))).to_pylist():
                err.add("ledger", f"{rel}: kept id {k['id'][i]} names shard {k['shard'][i]}, which the manifest lacks")
            for i in pc.indices_nonzero(pc.is_null(k["key"])).to_pylist():
                err.add("ledger", f"{rel}: kept id {k['id'][i]} has no key")
            id_hashes.append(_hash(pc.fill_null(t["id"], "")))
            kept_hashes.append(_hash(_kept_refs(k)))
    except Exception as exc:  # a corrupt ledger file is a finding
        err.add("ledger", f"ledger: unreadable ({exc})")
        return
    counts = manifest.counts
    found = {"inputs": sum(totals.values()), "kept": totals["kept"], "dropped": totals["dropped"]}
    for what, n in found.items():
        if counts.get(what) != n:
            err.add("totals", f"ledger: {n} {what}, manifest counts.{what} says {counts.get(what)}")
    expected = manifest.drops
    for reason in sorted(set(drops) | set(expected)):
        if drops.get(reason, 0) != expected.get(reason, 0):
            err.add("totals", f"ledger: {drops.get(reason, 0)} drops {reason}, manifest drops says {expected.get(reason, 0)}")

    # Uniqueness and the ledger <-> sidecar join on hashes; suspects are resolved exactly below.
    dup_ids = _repeated(id_hashes)
    kept_all = np.sort(np.concatenate(kept_hashes)) if kept_hashes else np.empty(0, np.uint64)
    side_all = np.sort(np.concatenate(sidecar_refs)) if sidecar_refs else np.empty(0, np.uint64)
    suspects = np.array(sorted(set(np.setxor1d(kept_all, side_all).tolist()) | _repeated([kept_all])), np.uint64)
    if not dup_ids and not len(suspects):
        return
    dup = np.array(sorted(dup_ids), np.uint64)
    ids: dict[str, list[str]] = {}
    refs: dict[str, list[str]] = {}
    if withdrawn:
        w = pa.array(withdrawn, pa.string())
        for ref in w.filter(pa.array(np.isin(_hash(w), suspects))).to_pylist():
            refs.setdefault(ref, []).append("(withdrawn in the manifest)")
    for rel, t in _ledger_batches(out, files):
        for i in np.flatnonzero(np.isin(_hash(pc.fill_null(t["id"], "")), dup)).tolist():
            ids.setdefault(t["id"][i].as_py(), []).append(rel)
        k = t.filter(pc.equal(pc.fill_null(t["outcome"], ""), "kept"))
        ref = _kept_refs(k)
        for i in np.flatnonzero(np.isin(_hash(ref), suspects)).tolist():
            if ref[i].as_py():  # "" = no shard or key: reported above
                refs.setdefault(ref[i].as_py(), []).append(k["id"][i].as_py())
    for id_, where in sorted(ids.items()):
        if len(where) > 1:
            err.add("ledger", f"ledger: id {id_!r} appears {len(where)} times (in {', '.join(sorted(set(where)))})")
    held: set[str] = set()
    for _, name, keys in _sidecar_keys(out, shards):
        r = _refs(name, keys)
        held.update(r.filter(pa.array(np.isin(_hash(r), suspects))).to_pylist())
    for ref, who in sorted(refs.items()):
        if ref not in held and who == ["(withdrawn in the manifest)"]:
            err.add("ledger", f"manifest: withdrawn {ref} is in no sidecar")
        elif ref not in held:
            err.add("ledger", f"ledger: kept id {who[0]!r} names {ref}, which no sidecar holds")
        elif len(who) > 1:
            err.add("ledger", f"ledger: {ref} is kept by {len(who)} rows (ids {who[:5]})")
    for ref in sorted(held - set(refs)):
        err.add("ledger", f"ledger: {ref} is in a sidecar but has no kept ledger row")


def _kept_refs(kept: pa.Table) -> pa.Array:
    return pc.fill_null(pc.binary_join_element_wise(kept["shard"], kept["key"], "/"), "").combine_chunks()


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def verify(out: str | Path, *, byte_checks_per_shard: int | None = None, max_errors_per_check: int = 100) -> VerifyReport:
    """Check the output at `out` against the shard contract (see the module docstring).

    Member bytes are compared at the sidecar offsets for every sample by default; with
    `byte_checks_per_shard=N`, for N evenly spaced samples per shard (first and last included),
    a deterministic choice. Offsets and sizes themselves are checked for every member regardless,
    from the tar headers. Never raises on bad data: every finding is an entry in `errors`, at most
    `max_errors_per_check` per kind of check (then a line saying how many more).
    """
    out = location(out)
    err = _Errors(max_errors_per_check)
    checked: Counter[str] = Counter()
    try:
        manifest = Manifest.read(out)
    except ManifestError as exc:  # a structure that is not the contract's: nothing in it is trusted
        return VerifyReport(ok=False, errors=[f"manifest: {exc.problem}"], checked={})
    except (OSError, ValueError) as exc:
        return VerifyReport(ok=False, errors=[f"manifest: {exc}"], checked={})
    shards = _manifest_shards(manifest, err)
    key_hashes: dict[str, list[np.ndarray]] = {}
    refs: list[np.ndarray] = []
    for kind, s in shards:
        checked["shards"] += 1
        ok_tar = _check_file(out, s.name, s.bytes, s.sha256, err)
        ok_side = _check_file(out, s.sidecar, None, s.sidecar_sha256, err)
        if ok_tar and ok_side and (found := _check_tar(out, kind, s, err, checked, byte_checks_per_shard)):
            key_hashes.setdefault(kind, []).append(found[0])
            refs.append(found[1])
    for kind, hashes in key_hashes.items():
        suspects = np.array(sorted(_repeated(hashes)), np.uint64)
        if len(suspects):
            where: dict[str, list[str]] = {}
            for k, name, keys in _sidecar_keys(out, [(k, s) for k, s in shards if k == kind]):
                for key in keys.filter(pa.array(np.isin(_hash(keys), suspects))).to_pylist():
                    where.setdefault(key, []).append(name)
            for key, names in sorted(where.items()):
                if len(set(names)) > 1:  # repeats within one shard are reported per shard
                    err.add("keys", f"{KIND_DIRS[kind]}: key {key!r} appears in {', '.join(sorted(set(names)))}")
    _check_ledger(out, manifest, shards, refs, err, checked)
    _check_layout(out, manifest, shards, err)
    errors = err.finish()
    return VerifyReport(ok=not errors, errors=errors, checked=dict(checked))
