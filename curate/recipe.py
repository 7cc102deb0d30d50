"""Recipes: YAML validated by pydantic. A bad recipe fails at load, naming the file, the key path
and what was expected, never mid-run.

The recipe hash covers what determines the output (sources, stages and their parameters, the
output layout, the tokenizer) and not how it is executed (cluster address, worker counts,
batch size, resource annotations): a run may resume on a bigger cluster.

`load_recipe` also checks that every local input the recipe names exists (`missing_inputs`),
relative to the working directory, so a wrong path fails at once rather than minutes into a run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import curate.sources  # noqa: F401  (registers the sources)
import curate.stages  # noqa: F401  (registers the stages)
from curate.contract import MAX_SAMPLES_PER_SHARD, record_schema
from curate.storage import check_url, is_url
from curate.recipe_io import RecipeError, read_recipe_yaml, validate_recipe
from curate.sources.base import SOURCES
from curate.stages.base import STAGES, GlobalStage, Stage
from curate.tokens import check_tokenizer_path
from curate.units import parse_bytes

__all__ = ["ClusterConfig", "ExecutionConfig", "OutputConfig", "Recipe", "RecipeError", "TokenizerConfig",
           "load_recipe", "missing_inputs", "parse_recipe"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OutputConfig(_Strict):
    # a local folder, or an fsspec URL of an object store (s3://bucket/run, gs://bucket/run):
    # credentials and endpoint come from the store's usual environment (AWS_*, GOOGLE_*)
    path: str
    # each kind's kept samples, over all partitions in order, are cut into shards of at most
    # these many samples and bytes: every shard is full but a kind's last (and a retry round's)
    shard_max_samples: int = Field(10_000, ge=1, le=MAX_SAMPLES_PER_SHARD)
    shard_max_bytes: int = Field(1_000_000_000, ge=1024)

    @field_validator("path")
    @classmethod
    def _location(cls, v: str) -> str:
        if is_url(v):
            check_url(v)
        return v

    @field_validator("shard_max_bytes", mode="before")
    @classmethod
    def _bytes(cls, v: Any) -> int:
        return parse_bytes(v)


class ClusterConfig(_Strict):
    """Where to run. Execution only: not part of the recipe hash."""

    address: str | None = None  # a running scheduler, e.g. tcp://10.0.0.5:8786; `env`: see load_recipe
    connect_timeout_s: float = Field(10, gt=0)  # how long to try to reach `address` before giving up
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = "4GiB"  # per worker, LocalCluster only
    dashboard: bool = True

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _byte_size(cls, v: Any) -> str:
        parse_bytes(v)  # the message says what a byte size looks like
        return str(v)


class ExecutionConfig(_Strict):
    """How to run. Execution only: not part of the recipe hash."""

    batch_size: int = Field(128, ge=1)  # rows per Arrow batch: bounds a task's memory
    keep_intermediate: bool = False  # keep per-partition intermediate parquet after success
    task_retries: int = Field(2, ge=0)  # dask retries of a task whose worker died


class TokenizerConfig(_Strict):
    """The tokenizer of the token counts in the sidecars (curate/tokens.py): a tokenizer.json,
    a folder holding one, or a hub name."""

    path: str
    id: str | None = None  # recorded beside each count; defaults to "<name>@<sha256 prefix>"

    @field_validator("path")
    @classmethod
    def _exists(cls, value: str) -> str:
        return check_tokenizer_path(value)


def _union(registry: dict[str, type]) -> Any:
    configs = tuple(cls.Config for cls in registry.values())
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Field(discriminator="kind")]  # type: ignore[valid-type]


SourceUnion = _union(SOURCES)
StageUnion = _union(STAGES)


class Recipe(_Strict):
    name: str
    sources: list[SourceUnion] = Field(min_length=1)  # type: ignore[valid-type]
    stages: list[StageUnion] = Field(default_factory=list)  # type: ignore[valid-type]
    tokenizer: TokenizerConfig | None = None
    output: OutputConfig
    cluster: ClusterConfig = ClusterConfig()
    execution: ExecutionConfig = ExecutionConfig()

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {dupes}")
        for n in names:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", n):
                raise ValueError(f"source name {n!r}: use letters, digits, '_', '-', '.' only")
        kinds = {SOURCES[s.kind].record_kind for s in self.sources}
        stage_kinds = {s.kind for s in self.stages}
        for i, src in enumerate(self.sources):
            missing = [k for k in SOURCES[src.kind].requires_stages if k not in stage_kinds]
            if missing:
                raise ValueError(f"sources.{i} ({src.kind} {src.name!r}) needs the stage(s) {missing} "
                                 "(its records are raw pages until a stage extracts them)")
        stage_names = [s.name or STAGES[s.kind].name for s in self.stages]
        if len(set(stage_names)) != len(stage_names):
            raise ValueError(f"each stage may appear once (give a repeated kind a `name`), got {stage_names}")
        for i, s in enumerate(self.stages):
            if not kinds & set(STAGES[s.kind].kinds):
                raise ValueError(
                    f"stages.{i} ({s.kind}) applies to {STAGES[s.kind].kinds}, "
                    f"but the sources produce {sorted(kinds)}"
                )
        # every column a stage reads exists by then: in the records, or added by an earlier stage
        available = {name for kind in kinds for name in record_schema(kind).names}
        earlier: list[Stage] = []
        for i, s in enumerate(self.stages):
            stage = STAGES[s.kind](s)
            try:
                stage.check_recipe(earlier)
            except ValueError as exc:
                raise ValueError(f"stages.{i} ({stage.name}): {exc}") from None
            earlier.append(stage)
            missing = [c for c in stage.input_columns if c not in available]
            if missing:
                raise ValueError(
                    f"stages.{i} ({stage.name}) reads {missing}, which neither the records nor an earlier "
                    f"stage provide (columns so far: {sorted(available)})"
                )
            available |= set(stage.output_columns)
        return self

    def stage_classes(self) -> list[type]:
        return [STAGES[s.kind] for s in self.stages]

    def has_global_stage(self) -> bool:
        return any(issubclass(c, GlobalStage) for c in self.stage_classes())

    def determining(self) -> dict[str, Any]:
        """What determines the output: the part of the recipe the hash covers."""
        data = self.model_dump(mode="json", exclude={"cluster", "execution"})
        data["output"].pop("path")
        for source in data["sources"]:
            if source.get("limit") is None:  # no dry-run limit: hashes as before the field existed
                source.pop("limit", None)
        for cfg, stage in zip(self.stages, data["stages"]):
            stage.pop("resources", None)
            if stage.get("name") is None:  # unnamed: hashes as before the field existed
                stage.pop("name", None)
            _drop_execution_only(cfg, stage)
        return data

    def limited(self, n: int) -> "Recipe":
        """A dry run of this recipe: the first `n` inputs of each source (their `limit`), written
        to its own output, `OUTPUT.limit-N`, so a real run's output is never mixed with it."""
        sources = [s.model_copy(update={"limit": n}) for s in self.sources]
        output = self.output.model_copy(update={"path": f"{self.output.path.rstrip('/')}.limit-{n}"})
        return self.model_copy(update={"sources": sources, "output": output})

    def hash(self) -> str:
        blob = json.dumps(self.determining(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _drop_execution_only(cfg: BaseModel, dumped: dict[str, Any]) -> None:
    """Remove the fields marked execution_only (a downloader's threads, a model's device) from
    `dumped`, in nested configs too (a recaptioning stage's models), and those marked added_later
    while they hold their default (a recipe written before the field existed hashes as it did)."""
    for name, field in type(cfg).model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get("execution_only"):
            dumped.pop(name, None)
        elif isinstance(extra, dict) and extra.get("added_later") and getattr(cfg, name) == field.default:
            dumped.pop(name, None)
        elif isinstance(getattr(cfg, name), BaseModel) and isinstance(dumped.get(name), dict):
            _drop_execution_only(getattr(cfg, name), dumped[name])


def parse_recipe(data: Any, origin: str = "<recipe>") -> Recipe:
    """`data` (a mapping, as YAML reads it) validated; RecipeError naming `origin` and each key."""
    return validate_recipe(Recipe, data, origin)


# `cluster.address: env`: the scheduler's address comes from the first of these that is set
# (or from `mm1 curate --address`, an override set before this is read)
ADDRESS_FROM_ENV = "env"
SCHEDULER_ENV = ("MM1_SCHEDULER", "DASK_SCHEDULER_ADDRESS")


def missing_inputs(recipe: Recipe) -> list[tuple[str, str]]:
    """(key, absolute path tried) of each local input the recipe names that does not exist: a
    source's `path` (each file, folder or glob of it; a glob must match something), an
    image_folder's mapping file (relative to its folder) and a recaptioning model given as a local
    path. Relative paths are relative to the working directory; URLs (s3://...) are not checked."""
    missing = []
    for i, src in enumerate(recipe.sources):
        paths = [src.path] if isinstance(src.path, str) else list(src.path)
        for j, p in enumerate(paths):
            key = f"sources.{i}.path" + (f".{j}" if not isinstance(src.path, str) else "")
            if not is_url(p) and not (glob.glob(p, recursive=True) if glob.has_magic(p) else os.path.exists(p)):
                missing.append((key, os.path.abspath(p)))
        captions = getattr(src, "captions", "sidecar")
        if src.kind == "image_folder" and captions != "sidecar" and not is_url(src.path) and not is_url(captions):
            mapping = os.path.join(src.path, captions)
            if not os.path.isfile(mapping):
                missing.append((f"sources.{i}.captions", os.path.abspath(mapping)))
    for i, stage in enumerate(recipe.stages):
        for role in ("captioner", "fusion"):
            model = getattr(getattr(stage, role, None), "model", None)
            if isinstance(model, str) and model.startswith(("/", "./", "../")) and not os.path.exists(model):
                missing.append((f"stages.{i}.{role}.model", os.path.abspath(model)))
    return missing


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None, check_inputs: bool = True) -> Recipe:
    """Read a YAML recipe (safe_load), apply dotted-key overrides, validate (curate/recipe_io.py).
    `cluster.address: env` (the shipped cluster recipes') takes the scheduler's address from the
    first of `SCHEDULER_ENV` that is set. With `check_inputs` (off only to read a recipe written for
    another machine), a local input that does not exist (`missing_inputs`) is a RecipeError naming
    each key and the absolute path tried, and so is `address: env` with none of them set."""
    data = read_recipe_yaml(path, overrides)
    cluster = data.get("cluster") if isinstance(data, dict) else None
    if isinstance(cluster, dict) and cluster.get("address") == ADDRESS_FROM_ENV:
        found = next((os.environ[v] for v in SCHEDULER_ENV if os.environ.get(v)), None)
        if found is None and check_inputs:
            raise RecipeError(f"{path}: cluster.address is {ADDRESS_FROM_ENV!r}, but neither "
                              f"{' nor '.join(SCHEDULER_ENV)} is set: give the Dask scheduler's address "
                              "with --address tcp://HOST:8786 or in one of them, or drop cluster.address "
                              "to run on a local cluster")
        cluster["address"] = found or cluster["address"]
    recipe = parse_recipe(data, str(path))
    if check_inputs and (missing := missing_inputs(recipe)):
        lines = "\n".join(f"  {key}: {tried}" for key, tried in missing)
        raise RecipeError(f"{path}: input paths that do not exist (relative paths are relative to the working "
                          f"directory, {os.getcwd()}):\n{lines}\nfix them in the recipe, with --override KEY=PATH, "
                          "or run from the folder the recipe expects")
    return recipe
