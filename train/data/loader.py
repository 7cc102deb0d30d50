"""The training loader: packed MM1 batches for one rank, from DataLoader worker processes, with a
state that restores the exact continuation.

Each (rank, worker) pair is a slot of the mixture (`train/data/mixture.py`); slot `rank *
workers + worker` reads its own share of every pass, so ranks and workers never overlap. A
worker yields whole batches (its own sequences, collated), and the DataLoader takes batches from
its workers round robin in order (`in_order`), so batch b comes from worker b mod W.

With `steps`, every rank yields exactly that many batches (the mixture repeats its passes, so
no rank runs dry first); without, a rank's loader ends when its slots' streams do.

Every batch carries its worker's mixture state as of after that batch (positional, a few KB:
`train/data/mixture.py`). The loader keeps, per worker, the state of the last batch handed to the
trainer: that is the checkpoint (`state_dict`). Restoring on the same layout (world size and
workers) starts each worker from its saved state and rotates the worker roles so that the first
batch comes from the worker whose turn it was: the batches that follow are the ones an
uninterrupted run would have produced, whatever the prefetching did. On another layout the state
must carry every saved rank's state (`state["ranks"]`, which `train.checkpoint.load_checkpoint`
adds): each new slot continues the epoch from all of them (`Mixture.resume`); buffered samples
are dropped and counted (`dropped_on_reshard`).

Bad samples never stop a run: they are skipped in the workers and counted. Each batch carries
`skipped` ({"<kind>/<reason>": n}, cumulative over this rank's workers) and `dropped_on_reshard`;
the trainer logs them with its step metrics (`Loader.stats()` gives the same at any time). Weights
that name a source without samples, an output listed twice or a manifest that cannot be read fail
here, before any worker starts.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from train.data.images import OPEN_CLIP_RESIZE, ImagePreprocessor
from train.data.mixture import KINDS, Mixture, MixtureConfig, source_shards


@dataclass(frozen=True)
class LoaderConfig:
    mixture: MixtureConfig
    batch_size: int = 1  # sequences per batch (per rank)
    steps: int | None = None  # batches per rank, then the loader ends (every rank the same)
    workers: int = 2  # DataLoader worker processes per rank (0: in the main process)
    image_size: int = 378
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    resize_mode: str = "squash"  # "squash" | "shortest_crop" (train/data/images.py): the tower's own
    interpolation: str = "bicubic"
    uint8: bool = False  # images as resized uint8 [N, 3, S, S], normalised on the device by the tower
    pin_memory: bool = False  # page-locked batches (CUDA: asynchronous copies to the device)

    @classmethod
    def for_tower(cls, mixture: MixtureConfig, preprocess_cfg: dict[str, Any], **kw: Any) -> "LoaderConfig":
        """The images as the tower wants them: its size, resize mode, interpolation, mean and std
        (an open_clip `preprocess_cfg`); shipped as uint8 and normalised on the device."""
        size = preprocess_cfg["size"]
        size = size[0] if isinstance(size, (tuple, list)) else size
        mode = OPEN_CLIP_RESIZE.get(preprocess_cfg.get("resize_mode", "shortest"))
        if mode is None:
            raise ValueError(f"the tower's resize_mode {preprocess_cfg['resize_mode']!r} is not supported by the "
                             f"loader (only {tuple(OPEN_CLIP_RESIZE)})")
        return cls(mixture, image_size=int(size), image_mean=tuple(preprocess_cfg["mean"]),
                   image_std=tuple(preprocess_cfg["std"]), resize_mode=mode,
                   interpolation=preprocess_cfg.get("interpolation", "bicubic"), uint8=True, **kw)


def _token_kinds(p: Any) -> list[int]:
    sizes = [KINDS.index(k) for k in p.kinds]
    out: list[int] = []
    for kind, (n_tokens, _) in zip(sizes, p.sizes):
        out += [kind] * n_tokens
    return out + [-1] * (len(p.tokens) - len(out))


def collate(packed: list[Any], preprocess: Any) -> dict[str, Any]:
    """Sequences -> tensors: tokens, doc_ids, positions, labels, token_mask [B, S]; images [N, 3, H, W] in
    placeholder order (row by row); the kinds; token counts per kind."""
    images = [preprocess(data) for p in packed for data in p.images]
    return {
        "tokens": torch.tensor([p.tokens for p in packed], dtype=torch.long),
        "doc_ids": torch.tensor([p.doc_ids for p in packed], dtype=torch.long),
        "positions": torch.tensor([p.positions for p in packed], dtype=torch.long),
        "labels": torch.tensor([p.labels for p in packed], dtype=torch.long),
        # True for real tokens; the padding run at each sequence's end is False (MoE never routes it)
        "token_mask": torch.tensor([[True] * (len(p.tokens) - p.n_pad) + [False] * p.n_pad for p in packed]),
        "images": torch.stack(images) if images else None,
        "kinds": [p.kind for p in packed],  # a row's kind, "mixed" when it holds several
        # each token's kind (its index in KINDS; -1 for padding), for per-kind losses
        "token_kinds": torch.tensor([_token_kinds(p) for p in packed], dtype=torch.int8),
        "text_tokens": sum(p.n_text_tokens for p in packed),
        "image_tokens": sum(p.n_image_tokens for p in packed),
        "pad_tokens": sum(p.n_pad for p in packed),
    }


class _Batches(IterableDataset):
    """What each DataLoader worker runs: its slot's mixture, batched."""

    def __init__(self, cfg: LoaderConfig, rank: int, world: int, states: dict[int, Any], rotation: int,
                 sources: dict[str, Any], old_slots: list[dict[str, Any] | None] | None = None,
                 old_layout: tuple[int, int] | None = None):
        self.cfg, self.rank, self.world, self.states, self.rotation = cfg, rank, world, states, rotation
        self.sources, self.old_slots, self.old_layout = sources, old_slots, old_layout

    def _old_states(self) -> list[dict[str, Any]]:
        """Every slot's saved state of the old layout; a worker that never yielded a batch is
        its mixture as constructed."""
        old_world, old_workers = self.old_layout
        out = []
        for slot, state in enumerate(self.old_slots):
            if state is None:
                state = Mixture(self.cfg.mixture, slot=slot, n_slots=old_world * old_workers,
                                sources=self.sources).state_dict()
            out.append(state)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        n_workers = max(1, self.cfg.workers)
        # a restored loader rotates roles: worker w plays the part of worker (w + rotation) % W
        role = ((info.id if info else 0) + self.rotation) % n_workers
        mixture = Mixture(self.cfg.mixture, slot=self.rank * n_workers + role, n_slots=self.world * n_workers,
                          sources=self.sources)
        if role in self.states:
            mixture.load_state_dict(self.states[role])
        elif self.old_slots is not None:
            mixture.resume(self._old_states())
        preprocess = ImagePreprocessor(self.cfg.image_size, self.cfg.image_mean, self.cfg.image_std,
                                       resize_mode=self.cfg.resize_mode, interpolation=self.cfg.interpolation,
                                       uint8=self.cfg.uint8)
        while True:
            packed = []
            for _ in range(self.cfg.batch_size):
                nxt = next(mixture, None)
                if nxt is None:
                    break
                packed.append(nxt)
            if not packed:
                return
            batch = collate(packed, preprocess)
            batch["worker"] = role
            batch["state"] = mixture.state_dict()
            batch["skipped"] = mixture.skipped()
            batch["dropped_on_reshard"] = int(mixture.stats.get("dropped_on_reshard", 0))
            batch["retried"] = sum(int(st.stats.get("retried", 0)) for st in mixture.streams.values())
            yield batch


class Loader:
    """Batches for one rank; `state_dict()` after any batch, `Loader(..., state=...)` to resume
    (the same layout: exactly; another: `state["ranks"]` needed, see the module docstring)."""

    def __init__(self, cfg: LoaderConfig, rank: int = 0, world: int = 1, state: dict[str, Any] | None = None):
        self.cfg, self.rank, self.world = cfg, rank, world
        n_workers = max(1, cfg.workers)
        state = state or {}
        sources = source_shards(cfg.mixture)  # bad weights or outputs fail here, not in a worker
        self.batches = int(state.get("batches", 0))
        self.worker_states: dict[int, Any] = {}
        self.worker_stats: dict[int, tuple[dict[str, int], int, int]] = {}
        old_slots, old_layout, rotation = None, None, self.batches % n_workers
        if state and (state.get("rank"), state.get("world"), state.get("workers_n")) == (rank, world, n_workers):
            self.worker_states = {int(k): v for k, v in state.get("workers", {}).items()}
            if state.get("reshard_from"):  # resharded, and some worker had not yielded since
                old_layout = tuple(state["reshard_from"]["layout"])
                old_slots = state["reshard_from"]["slots"]
        elif state:
            ranks = state.get("ranks")
            if ranks is None and state.get("world") == 1:
                ranks = [state]
            if ranks is None or len(ranks) != state.get("world"):
                raise ValueError(f"loader state of rank {state.get('rank')}/{state.get('world')} with "
                                 f"{state.get('workers_n')} workers cannot resume rank {rank}/{world} with "
                                 f"{n_workers} without every saved rank's state (state['ranks'], which "
                                 "train.checkpoint.load_checkpoint adds)")
            old_layout = (int(state["world"]), int(state["workers_n"]))
            old_slots = [r.get("workers", {}).get(str(w)) for r in ranks for w in range(old_layout[1])]
            if old_layout == (world, n_workers):  # the same layout seen from another rank's file
                self.worker_states = {int(k): v for k, v in ranks[rank].get("workers", {}).items()}
                old_slots, old_layout = None, None
        dataset = _Batches(cfg, rank, world, self.worker_states, rotation=rotation, sources=sources,
                           old_slots=old_slots, old_layout=old_layout)
        self._reshard_from = None if old_slots is None else {"layout": list(old_layout), "slots": old_slots}
        # forkserver, not spawn: a spawned worker leaves through interpreter finalisation
        # (sys.exit), and a worker stopped mid-prefetch still has its queue's feeder thread inside
        # torch's C++ tensor pickling; finalisation pthread_exit()s that thread inside a noexcept
        # frame and the worker dies with SIGABRT ("terminate called without an active
        # exception"), which the DataLoader reports as a failed worker. A forkserver child ends
        # with os._exit, and it is forked from a clean single-threaded server, not from a process
        # holding torch, gloo or Dask threads (why plain fork is not used either). The server is
        # started once per process and keeps the environment it was started with. It imports this
        # module (torch, pyarrow, Pillow, the data path) when it starts, so each worker it forks
        # starts with them loaded instead of importing them again: about 2 CPU-s less per worker
        # each time a loader is iterated (persistent_workers is off). The same modules are loaded
        # in a DataLoader's usual fork from the trainer; only a server started before this
        # line (another forkserver user in the process) keeps its own preload list.
        if cfg.workers:
            multiprocessing.set_forkserver_preload(["__main__", __name__])
        self.loader = DataLoader(dataset, batch_size=None, num_workers=cfg.workers, persistent_workers=False,
                                 pin_memory=cfg.pin_memory, multiprocessing_context="forkserver" if cfg.workers else None)

    def stats(self) -> dict[str, Any]:
        """This rank's data counters: samples skipped by "<kind>/<reason>", samples dropped by a
        resume on another layout, and reads retried after a transient store error, summed over the
        workers' latest batches (cumulative; retries since each worker started)."""
        skipped: dict[str, int] = {}
        dropped = retried = 0
        for worker_skipped, worker_dropped, worker_retried in self.worker_stats.values():
            for k, n in worker_skipped.items():
                skipped[k] = skipped.get(k, 0) + n
            dropped += worker_dropped
            retried += worker_retried
        return {"skipped": dict(sorted(skipped.items())), "dropped_on_reshard": dropped, "retried": retried}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()
        self._iterator = iter(self.loader)
        for batch in self._iterator:
            if self.cfg.steps is not None and self.batches >= self.cfg.steps:
                break
            worker = batch.pop("worker")
            self.worker_states[worker] = batch.pop("state")
            self.worker_stats[worker] = (batch["skipped"], batch["dropped_on_reshard"], batch["retried"])
            batch.update(self.stats())
            self.batches += 1
            yield batch
        self.close()

    def close(self) -> None:
        """Stop the worker processes now (a loader left mid-iteration otherwise stops them when it
        is collected, at an arbitrary moment)."""
        iterator, self._iterator = getattr(self, "_iterator", None), None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the batches handed out and each worker's state after its last one."""
        state = {"rank": self.rank, "world": self.world, "workers_n": max(1, self.cfg.workers),
                 "batches": self.batches, "workers": {str(k): v for k, v in self.worker_states.items()}}
        if self._reshard_from is not None and len(self.worker_states) < max(1, self.cfg.workers):
            state["reshard_from"] = self._reshard_from  # until every worker has a state of its own
        return state
