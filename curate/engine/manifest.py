"""The one writer of `out/manifest.json`, the commit point of a run and of each retry round.

`write_manifest(job, packs, globals_)` builds the manifest from a round's pack markers and its
global stages' markers and writes it last (with the pairs' `sizes.json` beside their shards).
The run builds it from nothing; a retry round passes the committed manifest as `earlier` and
the same code amends it: the round's shards added, its withdrawn samples listed, the ledger files
of the partitions it rewrote replaced, its count deltas added, its global stages' entries
replaced, and one `retries` entry appended (with the round's own `stages`). What the round did
not touch stays as it was. `stages` (each stage's seconds and rows, and what it counted: `stage_times`) is summed from
the segment tasks' done markers and the global passes' markers. The
keys are the shard contract's (`curate.contract` reads them; train and tools read them there).
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from curate.contract import FORMAT_VERSION, KIND_DIRS, MANIFEST, SIZES_JSON, sizes_json
from curate.engine.steps import Job
from curate.stages.base import build_stage

__all__ = ["LEDGER_NAME", "TIMES", "code_version", "ledger_by_partition", "stage_times", "write_manifest"]

# what the manifest's `stages` records of each stage (module docstring)
TIMES = ("wall_s", "cpu_s", "rows_in", "rows_out")
# a ledger file the manifest names: ledger/<partition>.parquet, or .r<round>.parquet from a retry
LEDGER_NAME = re.compile(r"^ledger/(\d{5})(?:\.r(\d+))?\.parquet$")
# what a global stage's marker holds that its manifest entry does not (its time goes to `stages`)
MARKER_ONLY = ("recipe_hash", "fingerprint", "step", "changed", *TIMES)
# what each retry round's pack markers count, summed in the round's `retries` entry
RETRY_COUNTS = ("retried", "recovered", "failed_again", "dropped", "changed")


def code_version() -> str:
    """The package version and, in a git checkout, the commit: `0.1.0+g<sha>`."""
    try:
        v = version("mm1-pipeline")
    except PackageNotFoundError:
        v = "0+unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+g{sha}" if sha else v


def ledger_by_partition(manifest: dict[str, Any]) -> dict[int, str]:
    """Partition index -> the ledger file the manifest names for it; ValueError on a name that
    is not `ledger/<partition>[.r<round>].parquet`."""
    out: dict[int, str] = {}
    for name in manifest["ledger"]:
        m = LEDGER_NAME.match(name)
        if m is None:
            raise ValueError(f"manifest names ledger file {name!r}: not ledger/<partition>[.r<round>].parquet")
        out[int(m.group(1))] = name
    return out


def pack_delta(pack: dict[str, Any]) -> Counter[str]:
    """What a pack marker changes in the manifest's totals: `inputs`, `kept`, `dropped` and
    `drop:<stage>/<reason>`. A run's pack counts its whole partition; a retry round's records
    its delta itself."""
    if "delta" in pack:
        return Counter(pack["delta"])
    delta = Counter({k: pack[k] for k in ("inputs", "kept", "dropped")})
    delta.update({f"drop:{k}": v for k, v in pack["drops"].items()})
    return delta


def stage_times(job: Job, globals_: list[dict[str, Any]], every_stage: bool) -> dict[str, dict[str, Any]]:
    """The `stages` entry of `job`'s round: each row stage's times and rows summed over the
    segment markers its partitions committed in this round, each global stage's from its pass's
    marker in `globals_`. `every_stage`: list the stages no partition ran too (at zero)."""
    out: dict[str, dict[str, Any]] = {}
    passes = {g["stage"]: g for g in globals_ if "wall_s" in g}
    order = 0
    for seg, segment in enumerate(job.segments):
        markers = [m for m in job.storage.read_markers(
            [job.marker(f"seg{seg}", p) for p in range(len(job.partitions))]) if m]
        configs = [(cfg, "rows") for cfg in segment.row_stages]
        if segment.global_stage is not None:
            configs.append((segment.global_stage, "global"))
        for cfg, kind in configs:
            stage = build_stage(cfg)
            name = stage.name
            measured = [passes[name]] if name in passes else [m["stages"][name] for m in markers
                                                              if name in m.get("stages", {})]
            if measured or every_stage:
                out[name] = {"order": order, "pass": kind, **{k: sum(t[k] for t in measured) for k in TIMES}}
                out[name].update({k: round(out[name][k], 6) for k in ("wall_s", "cpu_s")})
                counts = sum((Counter(t.get("counts", {})) for t in measured), Counter())
                if counts:  # what the stage counted (Stage.count): faces blurred, addresses replaced
                    out[name]["counts"] = dict(sorted(counts.items()))
                out[name].update(stage.merge_summaries(measured))  # its partitions' facts (download: `domains`)
            order += 1
    return out


def write_manifest(job: Job, packs: list[dict[str, Any]], globals_: list[dict[str, Any]],
                   earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the manifest of `job`'s round from its pack markers (one per partition it packed)
    and its global stages' markers, write it, and return it. `earlier`: the committed manifest
    a retry round amends (None for the run itself)."""
    storage = job.storage
    if earlier is None:
        m: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "name": job.recipe.name,
            "code_version": code_version(),
            "recipe": job.recipe.model_dump(mode="json"),
            "recipe_hash": job.recipe_hash,
            "input_fingerprint": job.input_fingerprint(),
            "kinds": {kind: {"shards": [], "count": 0, "bytes": 0} for kind in sorted(set(job.kinds))},
            "ledger": [],
            "counts": {"partitions": len(job.partitions), "inputs": 0, "kept": 0, "dropped": 0},
            "drops": {},  # "stage/reason" -> count
            "global": {},
            "stages": stage_times(job, globals_, every_stage=True),
        }
    else:
        m = dict(earlier)
    new_shards: Counter[str] = Counter()
    kinds = {k: dict(v) for k, v in m["kinds"].items()}
    for kind, entry in kinds.items():
        added = sorted((s for pk in packs if pk["kind"] == kind for s in pk["shards"]), key=lambda s: s["shard"])
        new_shards[kind] = len(added)
        entry["shards"] = [*entry["shards"], *added]
        if earlier is not None:  # only a retry round withdraws shipped samples
            gone = [w for pk in packs if pk["kind"] == kind for w in pk["withdrawn"]]
            entry["withdrawn"] = sorted([*entry.get("withdrawn", []), *gone], key=lambda w: (w["shard"], w["key"]))
        entry["count"] = sum(s["count"] for s in entry["shards"]) - len(entry.get("withdrawn", []))
        entry["bytes"] = sum(s["bytes"] for s in entry["shards"])
        if kind == "pair" and (added or earlier is None):
            storage.write_json(job.out / KIND_DIRS[kind] / SIZES_JSON, sizes_json(entry["shards"]))
    m["kinds"] = kinds
    names = ledger_by_partition(m)
    names.update({pk["partition"]: pk["ledger"] for pk in packs})
    m["ledger"] = sorted(names.values())
    delta: Counter[str] = Counter()
    for pk in packs:
        delta.update(pack_delta(pk))
    m["counts"] = {k: v + delta[k] if k in ("inputs", "kept", "dropped") else v for k, v in m["counts"].items()}
    drops = Counter(m["drops"])
    drops.update({k[len("drop:"):]: v for k, v in delta.items() if k.startswith("drop:")})
    m["drops"] = {k: v for k, v in sorted(drops.items()) if v}
    m["global"] = {**m.get("global", {}),
                   **{g["stage"]: {k: v for k, v in g.items() if k not in MARKER_ONLY} for g in globals_}}
    if earlier is not None:
        m["retries"] = [*m.get("retries", []), _retry_entry(job, packs, globals_, new_shards)]
    storage.write_json(job.out / MANIFEST, m)
    return m


def _retry_entry(job: Job, packs: list[dict[str, Any]], globals_: list[dict[str, Any]],
                 new_shards: Counter[str]) -> dict[str, Any]:
    """The `retries` entry of a round: what it retried and recovered, what it withdrew."""
    totals: Counter[str] = Counter()
    for pk in packs:
        totals.update({k: pk[k] for k in RETRY_COUNTS})
    return {
        "round": job.round,
        "code_version": code_version(),
        **{k: totals[k] for k in RETRY_COUNTS},
        "withdrawn": sum(len(pk["withdrawn"]) for pk in packs),
        "new_shards": dict(sorted((k, v) for k, v in new_shards.items() if v)),
        "partitions": sorted(pk["partition"] for pk in packs),
        "global": {g["stage"]: {"dropped": g["dropped"], "changed": g["changed"]} for g in globals_},
        "stages": stage_times(job, globals_, every_stage=False),
    }
