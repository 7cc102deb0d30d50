"""Training checkpoints: torch.distributed.checkpoint (DCP) for model and optimizer, JSON for the
rest, committed atomically, and read back without ever unpickling untrusted bytes.

On disk, under `run_dir`::

    step-00001000/              a complete checkpoint (trusted only with its COMPLETE marker)
        .metadata               DCP's index (a pickle in torch: read with a restricted unpickler)
        __{r}_0.distcp          DCP's tensor files (read with torch.load(weights_only=True))
        state.json              step, world size, the LR scheduler's state, and the model's
                                description (train/export.py `describe`: config and preprocessing,
                                so the folder alone can be exported) (rank 0)
        extra-rank{r}.json      rank r's `extra` (its loader state) and its RNG states
        COMPLETE                JSON: step, time, world size, every file's size; written LAST
    step-00002000.tmp-<hex>/    a save in flight, or one killed midway: ignored, removed later

Why this shape: a save that dies at any point leaves either nothing new or a `.tmp-` folder, never
a folder that looks finished; `latest_checkpoint` trusts only folders whose marker was written
after the rename. Model and optimizer go through `get_state_dict`/`set_state_dict`, so the same
code saves a plain module in one process and an FSDP2-sharded one over many ranks (DCP reshards
the tensors). Per-rank things (loader position, RNG) are per-rank JSON files, because DCP would
treat equal keys on different ranks as one replicated value.

Safety (DESIGN.md, "Security": checkpoints are untrusted input): DCP itself unpickles `.metadata`
with plain `pickle.load` and the non-tensor entries (optimizer hyperparameters) with
`torch.load(weights_only=False)`. Loading here replaces both: `.metadata` goes through an
unpickler that resolves only DCP's metadata classes, torch.Size and torch dtypes/layouts, and byte
entries are loaded with `weights_only=True`. Any file in the folder that is not one of the names
above (a `*.pt`, a `*.pkl`), and any JSON file that holds something else (pickle bytes), is
refused before anything is read. The COMPLETE marker records file sizes, not hashes: hashing
hundreds of GB on one rank at every save costs more than the truncation check is worth.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

# a single-process run saves and loads without a process group on purpose: DCP warns on each checkpoint
warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent is to \w+ in a single process")

MARKER = "COMPLETE"
STATE = "state.json"
_FINAL = re.compile(r"^step-(\d{8})$")
_TMP = re.compile(r"^step-\d{8}\.tmp-[0-9a-f]+$")
_ALLOWED = re.compile(r"^(\.metadata|__\d+_\d+\.distcp|state\.json|extra-rank\d+\.json|COMPLETE)$")


class CheckpointError(RuntimeError):
    """A checkpoint folder that is incomplete, inconsistent or holds something it must not."""


# ---------------------------------------------------------------- distributed helpers


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    """Where collectives' tensors live: NCCL wants the current CUDA device, gloo the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def _all_ok(ok: bool) -> bool:
    """True when every rank says ok, so that all ranks raise together instead of some hanging."""
    if _rank_world()[1] == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=_device())
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def _agreed_token() -> str:
    """A random suffix drawn on rank 0 and shared, so every rank writes into the same tmp folder.
    Drawn from os.urandom, never from the RNGs the checkpoint is saving."""
    value = int.from_bytes(os.urandom(7), "little")
    if _rank_world()[1] > 1:
        t = torch.tensor([value], dtype=torch.int64, device=_device())
        dist.broadcast(t, src=0)
        value = int(t.item())
    return f"{value:014x}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- RNG as JSON


def _tensor_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _b64_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as JSON-able data: Python's `random`, NumPy's global generator,
    torch's CPU generator and, when CUDA is present, every CUDA device's (uint8 states as base64)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {**np_state, "state": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                        for k, v in np_state["state"].items()}},
        "torch": _tensor_b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_tensor_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what `capture_rng` returned (CUDA states only where CUDA is present)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {k: (np.asarray(v, dtype=np.uint32) if isinstance(v, list) else v)
                         for k, v in np_state["state"].items()}
    np.random.set_state(np_state)
    torch.set_rng_state(_b64_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_b64_tensor(s) for s in state["cuda"]])


# ---------------------------------------------------------------- safe reading


def _allowed_torch_global(name: str) -> Any:
    obj = getattr(torch, name, None)
    if name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
        return obj
    return None


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the classes DCP's `.metadata` is made of; anything else (os.system,
    builtins.eval, a class with a hostile __reduce__) is refused before it can be called."""

    _DCP = ("torch.distributed.checkpoint.metadata",)
    _EXTRA = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
              ("torch.serialization", "_get_layout"),  # a lookup of a layout by its name
              ("collections", "OrderedDict"),
              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}  # storage_meta.checkpoint_id

    def find_class(self, module: str, name: str) -> Any:
        if module in self._DCP:
            obj = getattr(dcp_metadata, name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif module == "torch":
            obj = _allowed_torch_global(name)
            if obj is not None:
                return obj
        elif (module, name) in self._EXTRA:
            return super().find_class(module, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}: refused (not a DCP type)")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose `.metadata` goes through `_MetadataUnpickler` instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank is not None:  # per-rank metadata (newer torch asks for it by keyword)
            path = self._get_metadata_path(rank)
        elif hasattr(self, "_get_metadata_path"):
            path = self._get_metadata_path()
        else:  # older layouts: one .metadata
            path = self.fs.concat_path(self.path, ".metadata")
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except CheckpointError:
                raise
            except Exception as e:  # truncated or garbled bytes
                raise CheckpointError(f"unreadable checkpoint metadata in {self.path}: {e}") from e
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"checkpoint metadata in {self.path} is a {type(metadata).__name__}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor entries are read with `weights_only=True`. The validated
    object is re-serialised for the base class, whose own `torch.load(weights_only=False)` then
    sees only bytes we produced from plain data."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn} refused: {e}") from e
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def _read_json(path: Path) -> Any:
    """A JSON file from a checkpoint, refusing anything else (pickle bytes begin with 0x80)."""
    data = path.read_bytes()
    if data[:1] == b"\x80":
        raise CheckpointError(f"{path.name} holds a pickle, not JSON: refused")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path.name} is not JSON: refused ({e})") from e


def check_checkpoint(path: Path) -> dict[str, Any]:
    """The COMPLETE marker of a checkpoint whose files are all expected names of expected sizes."""
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path.name} has no {MARKER} marker: an unfinished save")
    marker = _read_json(path / MARKER)
    for f in path.iterdir():
        if not f.is_file() or not _ALLOWED.match(f.name):
            raise CheckpointError(f"unexpected {f.name!r} in checkpoint {path.name}: refused "
                                  "(only DCP files and JSON belong there; nothing else is loaded)")
    for f in path.glob("*.json"):  # small files: check them all before anything else is read
        _read_json(f)
    for name, size in marker["files"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            raise CheckpointError(f"{name} in {path.name} is missing or not the size the marker records")
    SafeFileSystemReader(str(path)).read_metadata()  # here, so a refusal is not wrapped by DCP
    return marker


# ---------------------------------------------------------------- save / find / load


def _complete(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if run_dir.is_dir():
        for d in run_dir.iterdir():
            m = _FINAL.match(d.name)
            if m and d.is_dir() and (d / MARKER).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint under `run_dir` that has its COMPLETE marker, or None."""
    found = _complete(Path(run_dir))
    return found[-1][1] if found else None


def _commit(tmp: Path, final: Path, step: int, world: int) -> None:
    """Rank 0, after every rank has written: rename, then write the marker last."""
    if final.exists():  # an earlier save of this step (complete or not) is replaced whole
        stale = final.with_name(f"{final.name}.tmp-{os.urandom(7).hex()}")
        final.rename(stale)
        shutil.rmtree(stale)
    tmp.rename(final)
    files = {f.name: f.stat().st_size for f in sorted(final.iterdir())}
    marker = {"step": step, "time": time.time(), "world_size": world, "files": files}
    part = final / f"{MARKER}.part"
    with open(part, "w") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())
    part.rename(final / MARKER)
    _fsync_dir(final)
    _fsync_dir(final.parent)


def _prune(run_dir: Path, keep: int) -> None:
    """Rank 0: drop complete checkpoints beyond the newest `keep`, every leftover tmp folder and
    every step folder without a marker (a save killed between rename and marker). No other save
    can be in flight: this runs after the commit, behind a barrier."""
    for _, d in _complete(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(d, ignore_errors=True)
    for d in run_dir.iterdir():
        unfinished = _FINAL.match(d.name) and not (d / MARKER).is_file()
        if d.is_dir() and (_TMP.match(d.name) or unfinished):
            shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any | None, extra: dict[str, Any], keep: int = 3,
                    description: dict[str, Any] | None = None) -> Path:
    """Save on every rank (a collective when a process group is up, else one process) and return
    `run_dir/step-{step:08d}`. `extra` is this rank's JSON-able state (its loader state under
    "loader"); this rank's RNG states are captured too. `description` (rank 0's is stored) is
    the JSON-able model description that `export_checkpoint` rebuilds the model from. Keeps the
    newest `keep` checkpoints."""
    run_dir = Path(run_dir)
    rank, world = _rank_world()
    rng = capture_rng()  # first: nothing below may draw from the generators being saved
    try:
        rank_json, err = json.dumps({"extra": extra, "rng": rng}), None
        state_json = json.dumps({"step": step, "world_size": world,
                                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                                 "model": description})
    except (TypeError, ValueError) as e:
        err = e
    if not _all_ok(err is None):
        raise CheckpointError(f"checkpoint state is not JSON-able on some rank (here: {err})")

    tmp = run_dir / f"step-{step:08d}.tmp-{_agreed_token()}"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / f"extra-rank{rank}.json").write_text(rank_json)
    if rank == 0:
        (tmp / STATE).write_text(state_json)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=FileSystemWriter(str(tmp)))
    _barrier()
    final = run_dir / f"step-{step:08d}"
    if rank == 0:
        _commit(tmp, final, step, world)
        _prune(run_dir, keep)
    _barrier()
    return final


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any | None) -> dict[str, Any]:
    """Load a complete checkpoint into `model`, `optimizer` and `scheduler` (in place), restore this
    rank's RNG states, and return this rank's `extra`. Every rank calls it. Raises CheckpointError
    for an unfinished folder, a foreign file, a pickle where JSON belongs or non-DCP classes in
    metadata.

    Any world size may load any checkpoint: DCP reshards model and optimizer tensors. Per-rank
    extras: every rank reads every saved rank's `extra-rank{r}.json` (a few KB each) and, when
    `extra` holds a dict under "loader", adds `extra["loader"]["ranks"]`: the list of all saved
    ranks' loader states, from which `train.data.loader.Loader` continues the epoch on another
    layout (another world size or worker count; on the same layout it uses its own state and
    continues exactly). A rank that existed at save time gets its own `extra` and RNG states. A
    new rank (rank >= the saved world size) gets rank 0's `extra` (the step and counters are the
    same on every rank) and no saved RNG state: Python's, NumPy's and torch's generators (CUDA
    included) are seeded from blake2b("{step}:{rank}"), so new ranks differ from each other and
    from the old ones, and a rerun of the same resume draws the same numbers."""
    path = Path(path)
    rank, world = _rank_world()
    marker = check_checkpoint(path)
    saved_world = int(marker["world_size"])
    state = _read_json(path / STATE)
    saved = [_read_json(path / f"extra-rank{r}.json") for r in range(saved_world)]
    mine = saved[rank] if rank < saved_world else saved[0]
    extra = mine["extra"]
    if isinstance(extra, dict) and isinstance(extra.get("loader"), dict):
        extra = {**extra, "loader": {**extra["loader"], "ranks": [s["extra"].get("loader") for s in saved]}}

    model_sd, optim_sd = get_state_dict(model, optimizer)
    to_load = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(to_load, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
    except dcp.CheckpointException as e:  # DCP gathers every rank's failure into one
        raise CheckpointError(f"loading {path.name} failed: {e}") from e
    set_state_dict(model, optimizer, model_state_dict=to_load["model"], optim_state_dict=to_load["optim"])
    if scheduler is not None:
        if state["scheduler"] is None:
            raise CheckpointError(f"{path.name} holds no scheduler state")
        scheduler.load_state_dict(state["scheduler"])
    if rank < saved_world:
        restore_rng(mine["rng"])
    else:
        seed_new_rank(int(state["step"]), rank)
    return extra


def seed_new_rank(step: int, rank: int) -> None:
    """A rank added on resume: its generators seeded from (step, rank) (see `load_checkpoint`)."""
    seed = int.from_bytes(hashlib.blake2b(f"{step}:{rank}".encode(), digest_size=8).digest(), "little") >> 1
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CUDA devices too


def read_state(path: Path) -> dict[str, Any]:
    """state.json of a complete checkpoint (checked first, as `load_checkpoint` does): step,
    world size, scheduler state and the model description (None when the saver gave none)."""
    path = Path(path)
    check_checkpoint(path)
    return _read_json(path / STATE)


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Fill `model` (a plain, unsharded module whose tensors are allocated, e.g. after
    `to_empty`) in place with the model tensors of a complete checkpoint, in this process alone
    (no collective, whatever process group is up), whatever world size and sharding saved them:
    DCP reassembles FSDP shards into whole tensors. Optimizer state is not read. A tensor the
    model has and the checkpoint lacks, or of another shape, is a CheckpointError; the safe
    reader and planner apply as in `load_checkpoint`."""
    path = Path(path)
    check_checkpoint(path)
    to_load = {"model": model.state_dict()}
    try:
        dcp.load(to_load, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(), no_dist=True)
    except (dcp.CheckpointException, RuntimeError, ValueError) as e:
        raise CheckpointError(f"reading the model of {path.name} failed: {e}") from e
