"""The `Job` a step's tasks share: written once by the driver, read once per worker process.

A Job lists every partition (its source, file spans and fingerprint), so a Job pickles to a few
hundred bytes a partition. Passed as each task's argument, the scheduler held a copy per task:
partitions x steps x a Job that grows with the partitions, memory growing as the square of the
partitions (measured by tools/bench/global_passes.py: 1.7 GB of scheduler memory at 1,000
partitions, 9.6 GB and growing when a 10,000-partition run was stopped). Instead `share_job`
writes the pickled Job once under `_work/jobs/<digest>.pkl`, on the output's storage that every
worker reads anyway, and each task gets a `JobRef` (that path and the digest, a few dozen
bytes); `call_with_job` loads the Job on the worker, once per process. A file on the output
survives what a `client.scatter` would not: every worker that held the data dying.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from curate.engine.steps import Job
from curate.storage import open_read

_CACHED = 4  # Jobs a worker process keeps loaded (a run and its retry rounds)
_LOADED: OrderedDict[str, Job] = OrderedDict()


@dataclass(frozen=True)
class JobRef:
    """Where a step's Job is written, and the digest of its bytes."""

    path: Any  # a Path, or a UPath on an object store
    digest: str
    round: int
    recipe_hash: str


def share_job(job: Job) -> JobRef:
    """Write `job` (pickled) under its output's `_work/jobs/`, named by its digest: the same Job
    is written once, however many steps and runs of the driver share it."""
    blob = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
    digest = hashlib.sha256(blob).hexdigest()[:32]
    storage = job.storage
    final = job.work / "jobs" / f"{digest}.pkl"
    if not storage.exists(final):
        tmp = storage.attempt_path(final, deterministic=True)
        with storage.open_write(tmp) as fh:
            fh.write(blob)
        storage.publish(tmp, final)
    return JobRef(final, digest, job.round, job.recipe_hash)


def load_job(ref: JobRef) -> Job:
    """The Job `ref` names (read and checked once per process)."""
    job = _LOADED.get(ref.digest)
    if job is None:
        with open_read(ref.path) as fh:
            blob = fh.read()
        if hashlib.sha256(blob).hexdigest()[:32] != ref.digest:
            raise RuntimeError(f"{ref.path} does not hold the job it was written with (digest {ref.digest})")
        job = pickle.loads(blob)  # noqa: S301 - the driver of this run wrote it, under the run's output
        _LOADED[ref.digest] = job
        while len(_LOADED) > _CACHED:
            _LOADED.popitem(last=False)
    _LOADED.move_to_end(ref.digest)
    return job


def call_with_job(fn: Callable[..., dict[str, Any]], ref: JobRef, *args: Any) -> dict[str, Any]:
    """A task: `fn(job, *args)` with the Job `ref` names."""
    return fn(load_job(ref), *args)
