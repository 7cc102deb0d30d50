"""The manifest of a curated output (OUT/manifest.json) as a type: what a reader may rely on.

The engine writes it as JSON (curate/engine/; a `--retry-failed` round amends it):

    format_version, name, code_version, recipe, recipe_hash, input_fingerprint,
    kinds:   {kind: {shards: [ShardEntry], count, bytes, withdrawn: [WithdrawnEntry] (after a retry round)}}
    ledger:  [ledger/NNNNN.parquet ...]
    counts:  {partitions, inputs, kept, dropped}
    drops:   {"stage/reason": n}
    global:  {stage: {segment, state, summary, ...}}
    stages:  {stage: {order, pass, wall_s, cpu_s, rows_in, rows_out}} (outputs written since it exists)
    retries: [{round, ..., stages}] (after a retry round)

`stages` is each stage's time and rows in the run (curate/engine/timing.py): `order` its place in
the recipe's stage list, `pass` "rows" (summed over the partitions' segment tasks: wall and CPU
seconds inside the workers) or "global" (the pass timed from the driver, CPU of the workers
meanwhile), `rows_in` the live rows that reached it, `rows_out` those it kept whole. A resumed
run sums what each partition's committed task measured, whichever attempt ran it; a retry round
records its own in its `retries` entry. Timings differ between runs of the same recipe.

`Manifest.read(out)` reads it from a local folder or a URL (through curate/storage.py).
`Manifest.from_dict` checks the structure a reader walks (objects and lists; a `ManifestError`
names the key) and keeps leaf values as written, unconverted: `mm1 verify` is what checks them.
`to_dict` gives back the dict it was read from (a key absent stays absent: the engine writes no
nulls in these places; keys this type does not know are kept in `extra`). The stage-specific
parts (`recipe`, `global`, `stages`, `retries`) stay plain JSON. Train and tools reach this module through
curate/contract.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from curate.storage import join, location, read_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A manifest whose structure is not the contract's: `problem` names the key, `path` the file
    (when it was read from one)."""

    def __init__(self, problem: str, path: Any = None):
        super().__init__(f"{path}: {problem}" if path is not None else problem)
        self.problem, self.path = problem, path


def _known(cls: Any, d: Mapping[str, Any]) -> dict[str, Any]:
    """from_dict's arguments: the known fields as written (None when absent), the rest as `extra`."""
    return {**{k: d.get(k) for k in cls.FIELDS}, "extra": {k: v for k, v in d.items() if k not in cls.FIELDS}}


def _present(entry: Any) -> dict[str, Any]:
    """to_dict of a flat entry: its known fields in the writer's order, less the absent ones, then `extra`."""
    return {**{k: v for k in entry.FIELDS if (v := getattr(entry, k)) is not None}, **entry.extra}


@dataclass(frozen=True)
class ShardEntry:
    """One tar and its sidecar, as the pack step recorded them (curate/engine/pack.py). Values as
    written (None when absent): `mm1 verify` checks them."""

    name: str  # the tar, relative to the output: "pairs/00000.tar"
    sidecar: str  # "pairs/00000.parquet"
    kind: str
    shard: int  # the shard's number within its kind: the stem of both names
    count: int  # samples in the tar, withdrawn ones included
    bytes: int  # the tar's size
    sha256: str
    sidecar_sha256: str
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS: ClassVar[tuple[str, ...]] = ("name", "sidecar", "kind", "shard", "count", "bytes", "sha256",
                                         "sidecar_sha256")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardEntry:
        return cls(**_known(cls, d))

    def to_dict(self) -> dict[str, Any]:
        return _present(self)


@dataclass(frozen=True)
class WithdrawnEntry:
    """A sample still in a shipped tar but no longer in the output: a retry round recovered a
    sample that makes it a duplicate, and finished tars are never rewritten (curate/engine/retry.py)."""

    id: str
    shard: str  # the tar's name, as in ShardEntry.name
    key: str
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS: ClassVar[tuple[str, ...]] = ("id", "shard", "key")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WithdrawnEntry:
        return cls(**_known(cls, d))

    def to_dict(self) -> dict[str, Any]:
        return _present(self)


@dataclass(frozen=True)
class KindEntry:
    """The shards of one kind. `count` is the kind's samples: the shards' counts less `withdrawn`
    (None: the key is absent, no retry round withdrew any)."""

    shards: tuple[ShardEntry, ...]
    count: int
    bytes: int
    withdrawn: tuple[WithdrawnEntry, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS: ClassVar[tuple[str, ...]] = ("shards", "count", "bytes", "withdrawn")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KindEntry:
        args = _known(cls, d)
        args["shards"] = tuple(ShardEntry.from_dict(s) for s in d.get("shards", []))
        if args["withdrawn"] is not None:
            args["withdrawn"] = tuple(WithdrawnEntry.from_dict(w) for w in args["withdrawn"])
        return cls(**args)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shards": [s.to_dict() for s in self.shards]}
        out.update((k, v) for k in ("count", "bytes") if (v := getattr(self, k)) is not None)
        if self.withdrawn is not None:
            out["withdrawn"] = [w.to_dict() for w in self.withdrawn]
        return {**out, **self.extra}

    def withdrawn_keys(self) -> dict[str, set[str]]:
        """Tar name -> keys of its samples that are no longer in the output. Readers of the shards
        (train/, stats, report) skip these keys; stock webdataset readers do not see them."""
        out: dict[str, set[str]] = {}
        for w in self.withdrawn or ():
            out.setdefault(w.shard, set()).add(w.key)
        return out


@dataclass(frozen=True)
class Manifest:
    """A curated output's manifest (module docstring). Absent keys read as None."""

    kinds: dict[str, KindEntry]
    ledger: tuple[str, ...]  # ledger files, relative to the output
    counts: dict[str, int]  # partitions, inputs, kept, dropped
    drops: dict[str, int]  # "stage/reason" -> rows
    format_version: int | None = FORMAT_VERSION
    name: str | None = None
    code_version: str | None = None
    recipe: dict[str, Any] | None = None  # the recipe as run (JSON)
    recipe_hash: str | None = None
    input_fingerprint: str | None = None
    global_stages: dict[str, dict[str, Any]] | None = None  # JSON key "global": stage -> its pass's record
    stages: dict[str, dict[str, Any]] | None = None  # stage -> its time and rows in the run
    retries: list[dict[str, Any]] | None = None  # one record per committed retry round
    extra: dict[str, Any] = field(default_factory=dict)

    HEAD: ClassVar[tuple[str, ...]] = ("format_version", "name", "code_version", "recipe", "recipe_hash",
                                       "input_fingerprint")
    FIELDS: ClassVar[tuple[str, ...]] = (*HEAD, "kinds", "ledger", "counts", "drops", "global", "stages",
                                         "retries")

    @classmethod
    def read(cls, out: Any) -> Manifest:
        """The manifest of the output at `out` (a local folder or a URL): FileNotFoundError when
        there is none, ValueError for another format_version, ManifestError naming the file and
        the key for a structure that is not the contract's."""
        manifest = read_manifest(out)
        try:
            return cls.from_dict(manifest)
        except ManifestError as exc:
            raise ManifestError(exc.problem, manifest_path(out)) from None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        if problem := _structure_problem(d):
            raise ManifestError(problem)
        return cls(
            kinds={kind: KindEntry.from_dict(e) for kind, e in d["kinds"].items()},
            ledger=tuple(d["ledger"]),
            counts=dict(d["counts"]),
            drops=dict(d["drops"]),
            **{k: d.get(k) for k in cls.HEAD},
            global_stages=d.get("global"),
            stages=d.get("stages"),
            retries=d.get("retries"),
            extra={k: v for k, v in d.items() if k not in cls.FIELDS},
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k in self.HEAD if (v := getattr(self, k)) is not None}
        out.update(kinds={kind: e.to_dict() for kind, e in self.kinds.items()}, ledger=list(self.ledger),
                   counts=dict(self.counts), drops=dict(self.drops))
        if self.global_stages is not None:
            out["global"] = self.global_stages
        if self.stages is not None:
            out["stages"] = self.stages
        if self.retries is not None:
            out["retries"] = self.retries
        return {**out, **self.extra}

    def shards(self, kind: str) -> tuple[ShardEntry, ...]:
        """The shards of `kind` in manifest order (none when the output has no such kind)."""
        entry = self.kinds.get(kind)
        return entry.shards if entry is not None else ()

    def withdrawn_keys(self, kind: str) -> dict[str, set[str]]:
        """Tar name -> withdrawn keys of `kind` (KindEntry.withdrawn_keys)."""
        entry = self.kinds.get(kind)
        return entry.withdrawn_keys() if entry is not None else {}


def _structure_problem(d: Any) -> str | None:
    """The first part of a manifest dict that a reader could not walk, or None."""
    if not isinstance(d, Mapping):
        return "the manifest must be a JSON object"
    kinds = d.get("kinds")
    if not isinstance(kinds, Mapping) or not all(
        isinstance(e, Mapping) and isinstance(e.get("shards", []), list)
        and all(isinstance(s, Mapping) for s in e.get("shards", [])) for e in kinds.values()
    ):
        return "`kinds` must map each kind to {shards: [objects], count, bytes}"
    for kind, e in kinds.items():
        w = e.get("withdrawn")
        if w is not None and (not isinstance(w, list) or not all(isinstance(x, Mapping) for x in w)):
            return f"`kinds.{kind}.withdrawn` must be a list of {{shard, key, id}} objects"
    if not isinstance(d.get("ledger"), list) or not all(isinstance(x, str) for x in d["ledger"]):
        return "`ledger` must be a list of relative paths"
    for name in ("counts", "drops"):
        value = d.get(name)
        if not isinstance(value, Mapping) or not all(isinstance(v, int) for v in value.values()):
            return f"`{name}` must map names to integers"
    for name in ("recipe", "global", "stages"):
        if d.get(name) is not None and not isinstance(d[name], Mapping):
            return f"`{name}` must be an object"
    if d.get("retries") is not None and not isinstance(d["retries"], list):
        return "`retries` must be a list"
    return None


def manifest_path(out: Any) -> Any:
    """Where the manifest of `out` is: a string for a string (as `storage.join` spells it), else a
    path object."""
    return join(out, MANIFEST) if isinstance(out, str) else location(out) / MANIFEST


def read_manifest(out: Any) -> dict[str, Any]:
    """The manifest as its JSON dict, format_version checked (the engine amends it as a dict;
    readers want `Manifest.read`)."""
    path = manifest_path(out)
    try:
        manifest = read_json(path, what="manifest")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest; is {out} a finished curation output?") from None
    if not isinstance(manifest, dict):
        raise ManifestError("the manifest must be a JSON object", path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    return manifest


def withdrawn_keys(manifest: Manifest | Mapping[str, Any], kind: str) -> dict[str, set[str]]:
    """Tar name -> withdrawn keys of `kind`, from a Manifest or its dict (KindEntry.withdrawn_keys)."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_dict(manifest)
    return manifest.withdrawn_keys(kind)


def sizes_json(shards: Iterable[ShardEntry | Mapping[str, Any]]) -> dict[str, int]:
    """open_clip's `sizes.json`: tar basename -> sample count."""
    entries = [s if isinstance(s, ShardEntry) else ShardEntry.from_dict(s) for s in shards]
    return {Path(s.name).name: int(s.count) for s in entries}
