"""The shard reader: which samples exist, which slot reads which, and one sample's bytes.

Curated outputs index every tar member in the parquet sidecar beside the tar (`members`: name,
data offset, size; see `curate/contract.py`), so the reader never scans a tar:

- `list_samples` turns the sidecars of one kind into `SampleRef`s (manifest shard order, then key
  order), leaving out the keys the manifest withdrew.
- `assign` gives one slot (slot = rank * workers + worker) its share of one pass: a permutation of
  all refs seeded by (seed, epoch), identical on every rank, then every n_slots-th ref. Slots
  differ by at most one sample and together cover each sample exactly once an epoch. The
  permutation is global, so every rank (and worker) holds every ref of the kind: measured ~0.8 KB
  a pair ref (three members), ~0.2 KB more per further member, plus 8 bytes of permutation: about
  0.8 GB per million pairs per process. Beyond some tens of millions of samples a process, shard
  the listing (e.g. a permutation of shards, then of keys inside them) instead.
- `read_sample` reads one sample's members by offset (one read for the sample's contiguous span;
  on an fsspec URL one range request) and checks each member's ustar header, so a sidecar that
  disagrees with its tar, a damaged header or a truncated tar is a `CorruptSample`, never garbage.
- `SampleStream` walks a slot's assignment from a cursor, skipping (counting, logging) corrupt
  samples; its state is plain JSON: {"epoch", "cursor", "stats"}.

Security: tars are untrusted. Only image, text and JSON members are returned, as bytes; nothing
is decoded here and nothing is ever unpickled; tar names from a manifest must stay inside the
output (`contract.inside`).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow.parquet as pq

from curate.contract import (
    FORMAT_VERSION, KINDS, MANIFEST, inside, member_footprint, read_manifest, withdrawn_keys,
)

log = logging.getLogger(__name__)

TAR_BLOCK = 512
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# What `read_sample` returns: KEY.jpg, KEY.txt, KEY.json, KEY.<i>.<img ext> (doc images).
_RETURNED_EXT = re.compile(r"^(?:jpg|jpeg|png|webp|txt|json|\d+\.(?:jpg|jpeg|png|webp))$")


class CorruptSample(ValueError):
    """A sample whose bytes cannot be trusted: a member short or missing, a tar header that does
    not name the member the sidecar promises, a damaged header, a missing tar."""


@dataclass(frozen=True, slots=True)
class SampleRef:
    """Where one sample lives. JSON-able through `dataclasses.asdict`; `from_dict` reverses it
    (JSON turns the member tuples into lists)."""

    kind: str  # "pair" | "doc" | "text"
    out: str  # the curated output folder (or fsspec URL) it comes from
    shard: str  # tar name relative to out, e.g. "pairs/00000.tar"
    key: str
    members: tuple[tuple[str, int, int], ...]  # (member name, data offset, size), from the sidecar

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleRef":
        members = tuple((str(n), int(o), int(s)) for n, o, s in d["members"])
        return cls(kind=d["kind"], out=d["out"], shard=d["shard"], key=d["key"], members=members)


# ---------------------------------------------------------------------------------------------
# Locations: a local folder, or an fsspec URL ("s3://bucket/out", "file:///...")
# ---------------------------------------------------------------------------------------------


def _is_url(out: str) -> bool:
    return "://" in out


def _location(out: str, relative: str) -> str:
    """`out/relative`; `inside` refuses manifest names that would leave the output."""
    if not _is_url(out):
        return str(inside(out, relative))
    inside(".", relative)  # the same check, for its error
    return out.rstrip("/") + "/" + relative


def _manifest(out: str) -> dict[str, Any]:
    if not _is_url(out):
        return read_manifest(out)
    import fsspec

    url = _location(out, MANIFEST)
    try:
        with fsspec.open(url, "rb") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no manifest; is {out} a finished curation output?") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{url}: format_version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    return manifest


def _read_sidecar(location: str, columns: list[str]):
    if not _is_url(location):
        return pq.read_table(location, columns=columns)
    import fsspec

    with fsspec.open(location, "rb") as f:
        return pq.read_table(f, columns=columns)


def _read_range(location: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file; fewer when the file is shorter (the caller checks)."""
    if not _is_url(location):
        with open(location, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    import fsspec

    fs, path = fsspec.core.url_to_fs(location)
    size = fs.size(path)  # some backends refuse a range past the end instead of shortening it
    return fs.cat_file(path, start=min(start, size), end=min(end, size)) if start < size else b""


# ---------------------------------------------------------------------------------------------
# Listing and assignment
# ---------------------------------------------------------------------------------------------


def list_samples(outs: list[str], kind: str) -> list[SampleRef]:
    """Every sample of `kind` in these outputs, output by output, in manifest shard order then key
    order, from the sidecars' `key` and `members` columns only (no tar scan), without the keys
    the manifest withdrew."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    refs: list[SampleRef] = []
    for out in outs:
        out = str(out)
        manifest = _manifest(out)
        withdrawn = withdrawn_keys(manifest, kind)
        for shard in manifest.get("kinds", {}).get(kind, {}).get("shards", []):
            name = shard["name"]
            _location(out, name)  # refuse a tar name outside the output before trusting it
            table = _read_sidecar(_location(out, shard["sidecar"]), ["key", "members"])
            skip = withdrawn.get(name, set())
            rows = sorted(zip(table.column("key").to_pylist(), table.column("members").to_pylist()))
            for key, members in rows:
                if key in skip:
                    continue
                index = tuple((m["name"], int(m["offset"]), int(m["size"])) for m in members or [])
                refs.append(SampleRef(kind, out, name, key, index))
    return refs


def assign(refs: list[SampleRef], *, seed: int, epoch: int, slot: int, n_slots: int,
           shuffle: bool = True) -> list[SampleRef]:
    """This slot's samples for one pass (see the module docstring). The permutation depends only
    on (seed, epoch) and len(refs), so every rank computes the same one without talking."""
    if n_slots < 1 or not 0 <= slot < n_slots:
        raise ValueError(f"slot {slot} outside 0..{n_slots - 1}")
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(refs))
    else:
        order = np.arange(len(refs))
    return [refs[i] for i in order[slot::n_slots].tolist()]


# ---------------------------------------------------------------------------------------------
# Reading one sample
# ---------------------------------------------------------------------------------------------


def _octal(field: bytes) -> int | None:
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None


def _header_problem(header: bytes, name: str, size: int) -> str | None:
    """Why this 512-byte ustar header does not introduce member `name` of `size` bytes, or None."""
    if len(header) < TAR_BLOCK:
        return "tar header cut short"
    found = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            found = prefix + b"/" + found
    if found != name.encode():
        return f"tar header names {found.decode(errors='replace')!r}, not {name!r}"
    stored = _octal(header[148:156])
    computed = sum(header[:148]) + 8 * ord(" ") + sum(header[156:TAR_BLOCK])
    if stored != computed:
        return "tar header checksum mismatch"
    if header[156:157] not in (b"0", b"\0"):
        return f"tar member type {header[156:157]!r} is not a regular file"
    if _octal(header[124:136]) != size:
        return f"tar header size {_octal(header[124:136])}, sidecar says {size}"
    return None


def read_sample(ref: SampleRef) -> dict[str, bytes]:
    """The sample's image, text and JSON members by extension ("jpg", "txt", "json", "0.jpg",
    ...), checked against their tar headers. Other members are not read. Raises CorruptSample
    (never returns partial data); other I/O errors (a disk or network failing) propagate."""
    prefix = ref.key + "."
    wanted: list[tuple[str, str, int, int]] = []
    for name, offset, size in ref.members:
        if not name.startswith(prefix) or offset < TAR_BLOCK or size < 0:
            raise CorruptSample(f"sidecar member {name!r} at {offset} is not a member of key {ref.key}")
        ext = name[len(prefix):]
        if _RETURNED_EXT.match(ext):
            wanted.append((name, ext, offset, size))
    if not wanted:
        raise CorruptSample(f"key {ref.key} has no image, text or json member")

    location = _location(ref.out, ref.shard)
    start = min(o for _, _, o, _ in wanted) - TAR_BLOCK
    end = max(o + s for _, _, o, s in wanted)
    try:
        # A sample's members are adjacent in the tar: one read covers them (one request remotely);
        # a sidecar claiming members far apart gets one read per member instead.
        if end - start <= sum(member_footprint(s) for _, _, s in ref.members):
            span = _read_range(location, start, end)
            pieces = {n: span[o - TAR_BLOCK - start:o + s - start] for n, _, o, s in wanted}
        else:
            pieces = {n: _read_range(location, o - TAR_BLOCK, o + s) for n, _, o, s in wanted}
    except FileNotFoundError:
        raise CorruptSample(f"shard {ref.shard} is missing") from None

    data: dict[str, bytes] = {}
    for name, ext, _, size in wanted:
        piece = pieces[name]
        if len(piece) < TAR_BLOCK + size:
            raise CorruptSample(f"member {name} cut short: {max(len(piece) - TAR_BLOCK, 0)} of {size} bytes")
        problem = _header_problem(piece[:TAR_BLOCK], name, size)
        if problem:
            raise CorruptSample(f"member {name}: {problem}")
        data[ext] = piece[TAR_BLOCK:]
    return data


# ---------------------------------------------------------------------------------------------
# One slot's stream of samples, resumable
# ---------------------------------------------------------------------------------------------


class Sample(NamedTuple):
    ref: SampleRef
    data: dict[str, bytes]  # as `read_sample` returns it


class SampleStream:
    """An iterator over one slot's samples (`assign`), epoch after epoch when `repeat`, else one
    pass. Corrupt samples are skipped, counted in `stats["corrupt"]` and logged with their shard
    and key; `stats["read"]` counts the samples yielded.

    `state_dict()` after any `next()` and `load_state_dict()` on a stream built with the same
    refs, seed, slot and n_slots continue with exactly the samples that would have come next.
    """

    def __init__(self, refs: list[SampleRef], *, seed: int, slot: int, n_slots: int, shuffle: bool = True,
                 repeat: bool = False, epoch: int = 0):
        if n_slots < 1 or not 0 <= slot < n_slots:
            raise ValueError(f"slot {slot} outside 0..{n_slots - 1}")
        self.refs, self.seed, self.slot, self.n_slots = refs, seed, slot, n_slots
        self.shuffle, self.repeat = shuffle, repeat
        self.epoch, self.cursor = epoch, 0
        self.stats: Counter[str] = Counter({"read": 0, "corrupt": 0})
        self._order: tuple[int, list[SampleRef]] | None = None

    @property
    def per_epoch(self) -> int:
        """Samples this slot is assigned per pass (corrupt ones included)."""
        return len(self._epoch_order())

    def _epoch_order(self) -> list[SampleRef]:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, assign(self.refs, seed=self.seed, epoch=self.epoch, slot=self.slot,
                                              n_slots=self.n_slots, shuffle=self.shuffle))
        return self._order[1]

    def __iter__(self) -> "SampleStream":
        return self

    def __next__(self) -> Sample:
        tried = 0
        while True:
            order = self._epoch_order()
            while self.cursor < len(order):
                ref = order[self.cursor]
                self.cursor += 1
                tried += 1
                try:
                    data = read_sample(ref)
                except CorruptSample as exc:
                    self.stats["corrupt"] += 1
                    log.warning("skipping corrupt %s sample %s key %s in %s: %s",
                                ref.kind, ref.shard, ref.key, ref.out, exc)
                    continue
                self.stats["read"] += 1
                return Sample(ref, data)
            if not self.repeat:
                raise StopIteration
            if tried >= len(order):  # a whole pass without one readable sample: never spin
                log.error("slot %d/%d: no readable sample in a whole pass (%d assigned); stopping",
                          self.slot, self.n_slots, len(order))
                raise StopIteration
            self.epoch += 1
            self.cursor = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        self.epoch, self.cursor = epoch, 0
        if not 0 <= cursor <= self.per_epoch:
            raise ValueError(f"cursor {cursor} outside this slot's {self.per_epoch} samples a pass: "
                             "restored with other refs or another slot layout?")
        self.cursor = cursor
        self.stats = Counter({"read": 0, "corrupt": 0, **state.get("stats", {})})
