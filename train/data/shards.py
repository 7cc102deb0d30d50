"""The shard reader: which samples exist, which slot reads which, and one sample's bytes.

Curated outputs index every tar member in the parquet sidecar beside the tar (`members`: name,
data offset, size; see `curate/contract.py`), so the reader never scans a tar.

What training uses (the index that scales, "By shard" below):

- `list_shards` reads the manifests: one `ShardInfo` (name, sidecar, count) per shard, and the
  withdrawn keys. An output listed twice is refused; a manifest that cannot be read fails with its
  path; a tar or sidecar the manifest lists but the output lacks fails with its path, found by one
  listing per folder (never one request per shard).
- `shard_plan` gives one slot (slot = rank * workers + worker) its work items for one pass, from
  a permutation of all shards seeded by (seed, epoch), identical on every rank; with fewer shards
  than slots, slots share a shard by key stride.
- `ShardStream` walks a slot's items a few shards at a time, reading a shard's sidecar only when
  it opens it, through a bounded shuffle buffer, skipping and counting unreadable samples; its
  state is small and positional, and `reshard` continues a pass that another layout of slots
  began. A process's memory and start-up depend on the number of shards, not of samples
  (tools/bench/loader_index.py).

Whole listings, for tools and tests on small outputs:

- `list_samples` turns the sidecars of one kind into `SampleRef`s (manifest shard order, then key
  order), leaving out the keys the manifest withdrew: about 0.8 KB a pair ref, so not for a
  training corpus.
- `assign` / `SampleStream`: one slot's share of such a listing, by sample (the former training
  path, kept for the tools that read a whole small output).

Reading:

- Every read (manifest, sidecar, byte range, folder listing) goes through the storage seam
  (curate/storage.py, by way of curate.contract): on an fsspec URL it is retried on a transient
  store error (a connection reset, a timeout, a 5xx) with bounded exponential backoff, counted in
  `RETRIES` (a stream's `stats["retried"]`, never a skip) and logged rate-limited. When the tries
  run out it raises `StoreUnavailable` naming the URL: a store that stays down stops the run; it
  is not a bad sample. A missing object is not transient.
- `read_sample` reads one sample's members by offset (one read for the sample's contiguous span;
  on an fsspec URL one range request) and checks each member's ustar header, so a sidecar that
  disagrees with its tar, a damaged header or a truncated tar is a `CorruptSample`, never garbage.

Security: tars are untrusted. Only image, text and JSON members are returned, as bytes; nothing
is decoded here and nothing is ever unpickled; tar names from a manifest must stay inside the
output (`contract.inside`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from curate.contract import (
    KINDS, RETRIES, TAR_BLOCK, Manifest, RateLimitedLog, StoreUnavailable, exists, is_url, join, location,
    manifest_path, member_footprint, missing_files, read_range, read_table,
)

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# What `read_sample` returns: KEY.jpg, KEY.txt, KEY.json, KEY.<i>.<img ext> (doc images).
_RETURNED_EXT = re.compile(r"^(?:jpg|jpeg|png|webp|txt|json|\d+\.(?:jpg|jpeg|png|webp))$")

MISSING_NAMED = 5  # missing shard files named in list_shards' error (then how many more)


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
        manifest = Manifest.read(out)
        withdrawn = manifest.withdrawn_keys(kind)
        for shard in manifest.shards(kind):
            name = shard.name
            join(out, name)  # refuse a tar name outside the output before trusting it
            table = read_table(join(out, shard.sidecar), ["key", "members"], what="sidecar")
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

    tar = join(ref.out, ref.shard)
    start = min(o for _, _, o, _ in wanted) - TAR_BLOCK
    end = max(o + s for _, _, o, s in wanted)
    try:
        # A sample's members are adjacent in the tar: one read covers them (one request remotely);
        # a sidecar claiming members far apart gets one read per member instead.
        if end - start <= sum(member_footprint(s) for _, _, s in ref.members):
            span = read_range(tar, start, end)
            pieces = {n: span[o - TAR_BLOCK - start:o + s - start] for n, _, o, s in wanted}
        else:
            pieces = {n: read_range(tar, o - TAR_BLOCK, o + s) for n, _, o, s in wanted}
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


# ---------------------------------------------------------------------------------------------
# By shard: the index that scales (what the mixture uses)
# ---------------------------------------------------------------------------------------------
#
# A source's shards come from the manifests alone (name, sidecar, count): nothing per sample is
# held until a slot opens a shard. A work item is (shard index, stride, start): the shard's rows
# (its sidecar sorted by key, withdrawn keys included so positions never move) start,
# start + stride, ... The plan of (seed, epoch) for slot s of n: a permutation of all shards
# seeded by (seed, epoch), the same on every rank; with at least n shards slot s takes every n-th
# shard whole (stride 1); with fewer, the k slots that share shard s mod S take its rows by key
# stride (slot s: rows i with i mod k == s // S), so every slot draws from every source.


SIDECAR_CACHE = 8  # sidecars a stream keeps beyond those in use
EMPTY_PASSES = 3  # passes in a row without one readable sample, then a stream ends (repeat or not)


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """One tar of a source, from its output's manifest: `count` samples (withdrawn included)."""

    kind: str
    out: str
    name: str  # relative to out, e.g. "pairs/00000.tar"
    sidecar: str
    count: int


def list_shards(outs: list[str] | tuple[str, ...], kind: str,
                check_files: bool = True) -> tuple[list[ShardInfo], dict[str, dict[str, set[str]]]]:
    """The shards of `kind` in these outputs (manifest order, output by output) and, per output,
    the withdrawn keys by tar name. Reads the manifests, and lists the shard folders to check that
    every tar and sidecar a manifest lists exists (`missing_files`: one listing per folder). The same
    output listed twice is a ValueError (its samples would be read twice an epoch); a manifest
    that cannot be read fails here with its path; missing shard files are a FileNotFoundError
    naming the first MISSING_NAMED of them and how many there are; a store that stays down is
    StoreUnavailable. `check_files=False` skips the listing (the manifests alone)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    seen: set[str] = set()
    shards: list[ShardInfo] = []
    withdrawn: dict[str, dict[str, set[str]]] = {}
    for out in outs:
        out = str(out)
        canonical = out.rstrip("/") if is_url(out) else os.path.realpath(location(out))
        if canonical in seen:
            raise ValueError(f"output {out} is listed twice: its samples would be read twice an epoch")
        seen.add(canonical)
        try:
            manifest = Manifest.read(out)
        except (FileNotFoundError, StoreUnavailable):
            raise  # names the path already
        except ValueError as exc:
            if not isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
                raise  # format_version, a structure that is not the contract's: names the path already
            raise ValueError(f"{manifest_path(out)}: manifest cannot be read: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a permission error, a broken encoding: name the file
            raise ValueError(f"{manifest_path(out)}: manifest cannot be read: {exc}") from None
        withdrawn[out] = manifest.withdrawn_keys(kind)
        listed = []
        for shard in manifest.shards(kind):
            join(out, shard.name)  # refuse a tar name outside the output before trusting it
            join(out, shard.sidecar)
            listed.append(ShardInfo(kind, out, shard.name, shard.sidecar, int(shard.count)))
        files = [f for s in listed for f in (s.name, s.sidecar)]
        missing = missing_files(out, files) if check_files else []
        if missing:
            named = ", ".join(join(out, m) for m in missing[:MISSING_NAMED])
            more = f" and {len(missing) - MISSING_NAMED} more" if len(missing) > MISSING_NAMED else ""
            raise FileNotFoundError(f"{out}: {len(missing)} of the {len(files)} {kind} shard files (tars, sidecars) "
                                    f"its manifest lists are missing: {named}{more}; an unfinished copy?")
        shards += listed
    return shards, withdrawn


def shard_plan(n_shards: int, *, seed: int, epoch: int, slot: int, n_slots: int,
               shuffle: bool = True) -> list[tuple[int, int, int]]:
    """Slot `slot`'s work items (shard index, stride, start) for one pass (see above); a pure
    function of its arguments, so every rank computes every slot's plan without talking."""
    if n_slots < 1 or not 0 <= slot < n_slots:
        raise ValueError(f"slot {slot} outside 0..{n_slots - 1}")
    if n_shards == 0:
        return []
    order = (np.random.default_rng([seed, epoch]).permutation(n_shards) if shuffle
             else np.arange(n_shards)).tolist()
    if n_shards >= n_slots:
        return [(order[i], 1, 0) for i in range(slot, n_shards, n_slots)]
    group = slot % n_shards
    stride = len(range(group, n_slots, n_shards))
    return [(order[group], stride, slot // n_shards)]


def _reason(exc: CorruptSample) -> str:
    text = str(exc)
    if "cut short" in text:
        return "truncated"
    if "missing" in text:
        return "missing_shard"
    return "sidecar_mismatch"


class ShardStream:
    """One slot's samples of one source, by shard (module docstring, "By shard").

    Up to `open_shards` work items are open at once and feed, round robin, a shuffle buffer of
    `shuffle_buffer` positions (shard, row); a sample is drawn from the buffer at a position
    chosen by a hash of (seed, slot, epoch, draw), so no generator state is kept. A shard's
    sidecar is read when an item of it opens and forgotten when nothing refers to it any more:
    memory and start-up depend on the number of shards, not of samples. Withdrawn keys never enter
    the buffer. A sample that cannot be read (`CorruptSample`) is skipped and counted in
    `stats["skipped/<reason>"]` (logged with shard and key, rate-limited); a missing sidecar or
    tar is fatal (FileNotFoundError naming the path; `list_shards` finds them first, this is the
    second line): that is a broken output, not a bad sample. Transient store errors retried while
    this stream read are counted in `stats["retried"]` (from `RETRIES`); a store that stays down
    raises StoreUnavailable.

    `state_dict()` is small and positional: {"epoch", "plan" (None: this slot's `shard_plan`,
    else the explicit items of a resharded pass), "next", "open": [[item, row]...], "rr", "buffer":
    [[shard, row]...], "draws", "stats"}; `load_state_dict` on a stream of the same (seed, slot,
    n_slots) continues exactly. `reshard` turns the states of every slot of another layout into
    this slot's continuation of the pass.
    """

    def __init__(self, shards: list[ShardInfo], withdrawn: dict[str, dict[str, set[str]]] | None = None, *,
                 seed: int, slot: int, n_slots: int, shuffle: bool = True, repeat: bool = False,
                 epoch: int = 0, open_shards: int = 2, shuffle_buffer: int = 64, logger: RateLimitedLog | None = None):
        if n_slots < 1 or not 0 <= slot < n_slots:
            raise ValueError(f"slot {slot} outside 0..{n_slots - 1}")
        if open_shards < 1 or shuffle_buffer < 1:
            raise ValueError(f"open_shards {open_shards} and shuffle_buffer {shuffle_buffer} must be >= 1")
        self.shards, self.withdrawn = shards, withdrawn or {}
        self.seed, self.slot, self.n_slots, self.shuffle, self.repeat = seed, slot, n_slots, shuffle, repeat
        self.open_shards, self.shuffle_buffer = open_shards, shuffle_buffer
        self.log = logger or RateLimitedLog(log)
        self.stats: Counter[str] = Counter({"read": 0})
        self._tables: OrderedDict[int, list[tuple[str, Any]]] = OrderedDict()
        self.last: tuple[int, int] = (-1, -1)  # (shard, row) of the sample last returned
        self._empty_passes = 0
        self._start_epoch(epoch, None)

    # plan ---------------------------------------------------------------------------------------

    def _start_epoch(self, epoch: int, plan: list[tuple[int, int, int]] | None) -> None:
        self.epoch, self.plan, self.next = epoch, plan, 0
        self.open: list[list[int]] = []  # [item index, next row]
        self.buffer: list[tuple[int, int]] = []
        self.rr, self.draws, self._epoch_read = 0, 0, 0
        self._items = plan if plan is not None else shard_plan(
            len(self.shards), seed=self.seed, epoch=epoch, slot=self.slot, n_slots=self.n_slots, shuffle=self.shuffle)

    # sidecars -----------------------------------------------------------------------------------

    def _table(self, j: int) -> list[tuple[str, Any]]:
        """Shard j's rows (key, members) sorted by key; read when first needed."""
        table = self._tables.get(j)
        if table is not None:
            self._tables.move_to_end(j)
        else:
            shard = self.shards[j]
            sidecar = join(shard.out, shard.sidecar)
            try:
                t = read_table(sidecar, ["key", "members"], what="sidecar")
            except FileNotFoundError:
                raise FileNotFoundError(f"{sidecar}: sidecar of {shard.name} is missing") from None
            tar = join(shard.out, shard.name)
            if not is_url(shard.out) and not exists(tar):
                raise FileNotFoundError(f"{tar}: shard listed in the manifest is missing")
            table = sorted(zip(t.column("key").to_pylist(), t.column("members").to_pylist()))
            if len(table) != shard.count:
                log.warning("%s: sidecar has %d rows, manifest says %d", sidecar, len(table), shard.count)
            self._tables[j] = table
        return table

    def _forget_unused(self) -> None:
        """Keep the sidecars in use, and up to `SIDECAR_CACHE` recently used others (small
        shards come round again each pass)."""
        if len(self._tables) <= SIDECAR_CACHE:
            return
        used = {self._items[i][0] for i, _ in self.open} | {j for j, _ in self.buffer}
        for j in [j for j in self._tables if j not in used][:len(self._tables) - SIDECAR_CACHE]:
            del self._tables[j]

    def ref_at(self, j: int, row: int) -> SampleRef:
        """The SampleRef of row `row` of shard `j` (reads its sidecar if needed)."""
        shard = self.shards[j]
        key, members = self._table(j)[row]
        index = tuple((m["name"], int(m["offset"]), int(m["size"])) for m in members or [])
        return SampleRef(shard.kind, shard.out, shard.name, key, index)

    # reading ------------------------------------------------------------------------------------

    def _fill(self) -> None:
        while len(self.buffer) < self.shuffle_buffer:
            while len(self.open) < self.open_shards and self.next < len(self._items):
                _, _, start = self._items[self.next]
                self.open.append([self.next, start])
                self.next += 1
            if not self.open:
                return
            k = self.rr % len(self.open)
            item, row = self.open[k]
            j, stride, _ = self._items[item]
            table = self._table(j)
            if row >= len(table):
                del self.open[k]
                continue
            self.open[k][1] = row + stride
            self.rr += 1
            shard = self.shards[j]
            if table[row][0] in self.withdrawn.get(shard.out, {}).get(shard.name, ()):
                continue
            self.buffer.append((j, row))

    def _pick(self) -> int:
        digest = hashlib.blake2b(f"{self.seed}:{self.slot}:{self.epoch}:{self.draws}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % len(self.buffer)

    def __iter__(self) -> "ShardStream":
        return self

    def __next__(self) -> Sample:
        before = RETRIES.total()
        try:
            return self._next()
        finally:
            retried = RETRIES.total() - before  # this process reads one stream at a time
            if retried:
                self.stats["retried"] += retried

    def _next(self) -> Sample:
        while True:
            self._fill()
            if not self.buffer:  # this slot's pass is over
                if not self.repeat:
                    raise StopIteration
                self._empty_passes = self._empty_passes + 1 if self._epoch_read == 0 else 0
                if self._empty_passes >= EMPTY_PASSES:  # never spin on passes of nothing readable
                    log.error("slot %d/%d: no readable sample in %d passes (to epoch %d); stopping",
                              self.slot, self.n_slots, EMPTY_PASSES, self.epoch)
                    raise StopIteration
                self._start_epoch(self.epoch + 1, None)
                continue
            i = self._pick()
            self.draws += 1
            self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
            j, row = self.buffer.pop()
            ref = self.ref_at(j, row)
            self._forget_unused()
            try:
                data = read_sample(ref)
            except CorruptSample as exc:
                reason = _reason(exc)
                self.stats[f"skipped/{reason}"] += 1
                self.log(reason, "skipping %s sample %s key %s in %s: %s", ref.kind, ref.shard, ref.key, ref.out, exc)
                continue
            self.stats["read"] += 1
            self._epoch_read += 1
            self.last = (j, row)
            return Sample(ref, data)

    # state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "plan": None if self.plan is None else [list(p) for p in self.plan],
                "next": self.next, "open": [list(o) for o in self.open], "rr": self.rr,
                "buffer": [list(b) for b in self.buffer], "draws": self.draws, "epoch_read": self._epoch_read,
                "empty_passes": self._empty_passes, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        plan = state.get("plan")
        self._start_epoch(int(state["epoch"]), None if plan is None else [tuple(int(x) for x in p) for p in plan])
        self.next, self.rr, self.draws = int(state["next"]), int(state["rr"]), int(state["draws"])
        self._epoch_read = int(state.get("epoch_read", 0))
        self._empty_passes = int(state.get("empty_passes", 0))
        self.open = [[int(i), int(r)] for i, r in state["open"]]
        self.buffer = [(int(j), int(r)) for j, r in state["buffer"]]
        if self.next > len(self._items) or any(not 0 <= i < self.next for i, _ in self.open) or any(
                not 0 <= j < len(self.shards) for j, _ in self.buffer):
            raise ValueError(f"stream state {state['next']}/{len(self._items)} items does not fit slot "
                             f"{self.slot}/{self.n_slots} of these shards: restored with another layout?")
        self.stats = Counter({"read": 0, **state.get("stats", {})})

    def remaining(self, state: dict[str, Any], slot: int, n_slots: int) -> list[tuple[int, int, int]]:
        """The work items slot `slot` of `n_slots` had not finished in `state`'s pass: its open items
        from their cursors, then its items not yet started."""
        plan = state.get("plan")
        items = ([tuple(int(x) for x in p) for p in plan] if plan is not None else
                 shard_plan(len(self.shards), seed=self.seed, epoch=int(state["epoch"]), slot=slot,
                            n_slots=n_slots, shuffle=self.shuffle))
        out = [(items[i][0], items[i][1], int(row)) for i, row in state["open"]]
        return out + list(items[int(state["next"]):])

    def reshard(self, states: list[dict[str, Any]]) -> dict[str, int]:
        """Continue the pass that `states` (every slot of another layout, in slot order) were in.

        The oldest epoch in flight is continued: the items those slots had not finished are
        gathered (in shard order), split by stride while there are fewer than this layout's slots,
        and dealt round robin; this slot takes its share as an explicit plan. No sample of that
        pass is read twice or skipped, except the positions that sat in shuffle buffers (returned
        as `dropped`). A slot already into the next pass had read `replayed` draws of it, which the
        new layout reads again. Returns {"dropped": n, "replayed": n}."""
        n_old = len(states)
        epoch = min(int(s["epoch"]) for s in states)
        items: list[tuple[int, int, int]] = []
        dropped = replayed = 0
        for old_slot, s in enumerate(states):
            dropped += len(s["buffer"])
            if int(s["epoch"]) != epoch:
                replayed += int(s["draws"])
                continue
            items.extend(self.remaining(s, old_slot, n_old))
        items = [it for it in items if it[2] < self.shards[it[0]].count]
        items.sort()

        def left(it: tuple[int, int, int]) -> int:
            return len(range(it[2], self.shards[it[0]].count, it[1]))

        while 0 < len(items) < self.n_slots:
            big = max(range(len(items)), key=lambda i: (left(items[i]), -i))
            j, stride, start = items[big]
            if left(items[big]) < 2:
                break
            items[big:big + 1] = [(j, 2 * stride, start), (j, 2 * stride, start + stride)]
        stats = Counter({"read": 0})
        if self.slot == 0:  # the old slots' counters, once per layout
            for s in states:
                stats.update(s.get("stats", {}))
        self._start_epoch(epoch, items[self.slot::self.n_slots])
        self.stats = stats
        return {"dropped": dropped, "replayed": replayed}
