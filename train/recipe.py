"""Training recipes: YAML validated by pydantic, like curation recipes (`curate/recipe.py`). A bad
recipe fails at load, naming the file, the key path and what was expected, never mid-run.

One recipe says everything a run needs: the model size, the data (curated outputs, tokenizer,
mixture), the optimiser and MM1's schedule, the step budget, precision, which parallelism to
apply, checkpointing, validation and logging. Relative paths are taken from the working directory
(the demo's `demo_out/` is where `mm1 demo` writes by default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# the YAML reading, overrides and error format shared with curation recipes
from curate.contract import RecipeError, parse_override, read_recipe_yaml, validate_recipe
from train.data.mixture import KINDS
from train.model.registry import REGISTRY, get_config

__all__ = ["CheckpointSection", "DataSection", "LogSection", "ModelSection", "OptimSection", "ParallelSection",
           "RecipeError", "TrainRecipe", "ValidationSection", "load_train_recipe", "parse_override",
           "parse_train_recipe"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    name: str = "tiny"  # a size in train/model/registry.py
    decoder_checkpoint: str | None = None  # a local Hugging Face causal-LM folder for the decoder
    vision_checkpoint: str | None = None  # an open_clip tag or a local open_clip checkpoint; None: the size's
    freeze_vision: bool | None = None  # None: the size's own setting (MM1 trains the tower in pretraining)

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in REGISTRY:
            raise ValueError(f"unknown model size {value!r}; known: {sorted(REGISTRY)}")
        return value


class DataSection(_Strict):
    outs: list[str] = Field(min_length=1)  # curated outputs
    tokenizer: str  # a tokenizer.json, or a folder holding one
    seq_len: int = Field(4096, ge=8)
    weights: dict[str, float] = Field(default_factory=lambda: {"pair": 0.45, "doc": 0.45, "text": 0.10})
    caption_ratio: float = Field(1.0, ge=0.0, le=1.0)  # pairs: probability of the alt-text
    n_image_tokens: int | None = Field(None, ge=1)  # None: the model connector's n_tokens
    max_images: int = Field(16, ge=0)
    # the weights are shares of the non-padding tokens (text and image placeholders) a loader
    # slot emits; "mixed": a sequence may hold samples of several kinds (the room pairs leave is
    # filled); "per_kind": each sequence holds one source's samples
    packing: Literal["mixed", "per_kind"] = "mixed"
    buffer_size: int = Field(32, ge=1)  # items a packer chooses from
    workers: int = Field(2, ge=0)  # DataLoader worker processes per rank
    batch_size: int = Field(1, ge=1)  # sequences per micro-batch per rank
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    # bad samples (undecodable images, broken members, bad JSON) are skipped and counted; a loader
    # slot that has skipped more than this share of the samples it tried (after 1,000) stops the run
    max_skipped_fraction: float | None = Field(0.01, ge=0.0, le=1.0)

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        for name, w in value.items():
            if name.partition(":")[0] not in KINDS:
                raise ValueError(f"weight {name!r}: expected one of {KINDS} or '<kind>:<output>'")
            if w < 0:
                raise ValueError(f"weight {name!r} is negative ({w})")
        if not any(w > 0 for w in value.values()):
            raise ValueError("at least one weight must be positive")
        return value


class OptimSection(_Strict):
    # "mm1": exp(-0.4214 ln N - 0.5535), N = the parameters every token trains (all of a dense
    # model; an MoE's without the experts a token skips: its active count)
    lr: float | Literal["mm1"] = "mm1"
    warmup: int = Field(2000, ge=0)  # MM1: 2000 steps of linear warmup
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # cosine to this fraction of the peak (MM1: 10%)
    # torch's AdamW multiplies the decay by the learning rate: weight_decay=0.1 is MM1's
    # decoupled lambda = 0.1 * eta (DESIGN.md)
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0)  # max global grad norm; None: no clipping
    vision_lr_mult: float = Field(1.0, ge=0.0)  # the tower's learning rate: this x the peak
    connector_lr_mult: float = Field(1.0, ge=0.0)  # the connector's learning rate: this x the peak

    @field_validator("lr")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        if isinstance(value, float) and value <= 0:
            raise ValueError(f"lr must be positive or 'mm1', got {value}")
        return value


class ParallelSection(_Strict):
    """The device mesh (train/mesh.py) and what is applied per block (train/parallelize.py).
    dp_replicate x dp_shard = the world size (-1 on one of them: what the world leaves); dense
    parameters are sharded over dp_shard and replicated over dp_replicate (HSDP); `ep` ranks of a
    dp_shard group share the experts of an MoE size. Sizes are checked against the world and the
    model when the run starts (`ParallelDims.resolve`)."""

    dp_replicate: int = 1
    dp_shard: int = -1  # the default: FSDP over every rank (one process: nothing to shard)
    ep: int = Field(1, ge=1)
    activation_checkpointing: Literal["none", "full", "selective"] = "none"  # recompute blocks in backward
    ac_every: int = Field(2, ge=1)  # selective: every ac_every-th block (of the decoder and the tower)
    compile: bool = False  # torch.compile each decoder and tower block

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "fsdp" in data:
            raise ValueError("parallel.fsdp was replaced by the mesh keys: fsdp: true is dp_shard: -1 (the default), "
                             "fsdp: false is dp_replicate: -1 with dp_shard: 1")
        if isinstance(data, dict) and isinstance(data.get("activation_checkpointing"), bool):
            data = {**data, "activation_checkpointing": "full" if data["activation_checkpointing"] else "none"}
        return data

    @field_validator("dp_replicate", "dp_shard")
    @classmethod
    def _size(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"expected a positive size or -1, got {value}")
        return value


class CheckpointSection(_Strict):
    every: int = Field(1000, ge=1)  # steps between checkpoints (the last step is always saved)
    keep: int = Field(3, ge=1)  # newest checkpoints kept


class ValidationSection(_Strict):
    outs: list[str] = Field(default_factory=list)  # curated outputs held out; empty: no validation
    every: int = Field(1000, ge=1)
    batches: int = Field(10, ge=1)  # per rank


class LogSection(_Strict):
    every: int = Field(10, ge=1)
    jsonl: str = "metrics.jsonl"  # in the run directory; other ranks write metrics.rank<R>.jsonl
    # rank 0 also writes the metrics as TensorBoard scalars into run_dir/tensorboard when the
    # tensorboard package is installed (the `tensorboard` extra); false: never
    tensorboard: bool = True

    @field_validator("jsonl")
    @classmethod
    def _relative(cls, value: str) -> str:
        if Path(value).is_absolute() or ".." in Path(value).parts or not value.endswith(".jsonl"):
            raise ValueError(f"a .jsonl file name inside the run directory, got {value!r}")
        return value


class TrainRecipe(_Strict):
    name: str
    model: ModelSection = ModelSection()
    data: DataSection
    optim: OptimSection = OptimSection()
    steps: int = Field(ge=1)  # optimizer steps
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16: autocast on CUDA; CPU always runs fp32
    parallel: ParallelSection = ParallelSection()
    checkpoint: CheckpointSection = CheckpointSection()
    validation: ValidationSection = ValidationSection()
    log: LogSection = LogSection()
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms(True): exact resume, slower
    max_bad_steps: int = Field(5, ge=1)  # consecutive non-finite steps before the run stops

    @model_validator(mode="after")
    def _check(self) -> "TrainRecipe":
        cfg = get_config(self.model.name)
        n_tokens = cfg.connector.n_tokens
        moe = cfg.decoder.moe
        if self.parallel.ep > 1 and moe is None:
            raise ValueError(f"parallel.ep is {self.parallel.ep}, but model {self.model.name!r} is dense: expected 1")
        if moe is not None and moe.n_experts % self.parallel.ep:
            raise ValueError(f"parallel.ep={self.parallel.ep} does not divide model {self.model.name!r}'s "
                             f"{moe.n_experts} experts")
        if self.data.n_image_tokens is not None and self.data.n_image_tokens != n_tokens:
            raise ValueError(f"data.n_image_tokens is {self.data.n_image_tokens}, but model {self.model.name!r}'s "
                             f"connector makes {n_tokens} tokens per image")
        return self

    @property
    def n_image_tokens(self) -> int:
        return self.data.n_image_tokens or get_config(self.model.name).connector.n_tokens


def parse_train_recipe(data: Any, origin: str = "<recipe>") -> TrainRecipe:
    """`data` (a mapping, as YAML reads it) validated; RecipeError naming `origin` and each key."""
    return validate_recipe(TrainRecipe, data, origin, what="training recipe")


def load_train_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainRecipe:
    """Read a YAML training recipe (safe_load), apply dotted-key overrides (`parse_override` reads
    them from the command line), validate (curate/recipe_io.py)."""
    return parse_train_recipe(read_recipe_yaml(path, overrides), str(path))
