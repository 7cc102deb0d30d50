"""The Dask cluster a run executes on, and how its per-partition tasks reach it.

`Cluster(recipe)` is a client on the recipe's scheduler (`cluster.address`; a RecipeError when it
does not answer within `cluster.connect_timeout_s`), or on a LocalCluster
it starts (processes, bound to 127.0.0.1, `WORKER_CONFIG` in its workers); a context manager, so
what it started is closed however the run ends. `run_tasks` submits one future per call with the
resources the stages declare (client.submit: resource annotations on dataframe graphs are dropped
by dask's graph optimisation) and returns the results in call order, showing one live line per
step on stderr (`Step`, `StepLine`). `check_resources` fails before any task is submitted when no
worker advertises what a segment needs. Before a step's tasks are submitted, `check_imports` has
every worker import the modules they need (the task function's, each stage's and source's): a
worker that cannot would die unpickling its first task, and the task wait for a worker forever;
it is a `WorkerEnvironmentError` instead, naming the worker and the import error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dask
from dask.distributed import Client, LocalCluster, as_completed
from tqdm import tqdm

from curate.engine.jobref import JobRef, call_with_job, share_job
from curate.engine.steps import Job
from curate.recipe import Recipe, RecipeError
from curate.sources.base import SOURCES
from curate.stages.base import STAGES

__all__ = ["WORKER_CONFIG", "Cluster", "Step", "StepLine", "WorkerEnvironmentError", "check_imports",
           "check_resources", "connect", "run_tasks", "segment_resources"]

log = logging.getLogger("mm1.curate")

# Dask settings for the workers of the LocalCluster we start (BENCHMARKS.md, download vs
# img2dataset, measures each). dask's nanny exports MALLOC_TRIM_THRESHOLD_=65536 to its workers,
# which turns off glibc's dynamic mmap threshold: every buffer over 128 KiB (each downloaded body,
# each decoded picture) is then mmap'ed and unmapped again, 20x the page faults and +16% wall on
# the download + resize path. `None` unsets it (glibc keeps freed memory for reuse instead: a
# higher but flat RSS). The worker's sampling profiler (a stack sample of every thread each
# 10 ms) costs CPU on stages with many I/O threads and we do not read its output.
# External clusters: start `dask worker` with the same (DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED
# =False, and MALLOC_TRIM_THRESHOLD_ unset in `distributed.nanny.pre-spawn-environ`); README.
WORKER_CONFIG: dict[str, Any] = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.worker.profile.enabled": False,
}


class Cluster:
    """A client on the recipe's scheduler, or on a LocalCluster we start (127.0.0.1 only).

    `client` is the dask Client; `close()` (or leaving the `with` block) closes it and the
    LocalCluster if we started one, never an external scheduler."""

    def __init__(self, recipe: Recipe):
        cfg = recipe.cluster
        self.cluster: LocalCluster | None = None
        if cfg.address:
            try:
                self.client = Client(cfg.address, timeout=f"{cfg.connect_timeout_s}s")
            except OSError as exc:  # distributed's connect timeout and refusals are OSErrors
                raise RecipeError(f"cannot reach the Dask scheduler at {cfg.address} (no answer in "
                                  f"{cfg.connect_timeout_s:g} s): start it with `dask scheduler` "
                                  "or drop cluster.address") from exc
        else:
            # Arrow's Acero (pandas 3's string operations in the global passes) prints a warning
            # per unaligned buffer; copying them instead is what its docs advise. Read once per
            # process: set before the workers start (they inherit it), here and for the client.
            os.environ.setdefault("ACERO_ALIGNMENT_HANDLING", "reallocate")
            # The nannies copy the config when they start: these settings reach our workers only.
            with dask.config.set(WORKER_CONFIG):
                self.cluster = LocalCluster(
                    n_workers=cfg.n_workers,
                    threads_per_worker=cfg.threads_per_worker,
                    processes=True,
                    host="127.0.0.1",
                    # The scheduler's HTTP server (health, metrics) starts even without the
                    # dashboard: keep it on loopback, on a free port.
                    dashboard_address="127.0.0.1:0",
                    scheduler_kwargs={"dashboard": cfg.dashboard},
                    memory_limit=cfg.memory_limit,
                )
            self.client = Client(self.cluster)
        log.info("dask dashboard: %s", self.client.dashboard_link)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextmanager
def connect(recipe: Recipe, client: Client | None = None) -> Iterator[Client]:
    """`client` when one is given (the caller's cluster, left open), else the client of a
    `Cluster` for the recipe's cluster block, closed when the block ends. The client is the
    current one inside the block, so the global passes' dask collections compute on its cluster
    even when it is not the process's default client."""
    if client is not None:
        with client.as_current():
            yield client
        return
    with Cluster(recipe) as cluster, cluster.client.as_current():
        yield cluster.client


def check_resources(client: Client, needed: dict[str, float]) -> None:
    """Fail, saying how to start the workers, when no worker advertises a resource `needed`
    (the tasks would wait for one forever)."""
    if not needed:
        return
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    for name, amount in needed.items():
        if not any(w.get("resources", {}).get(name, 0) >= amount for w in workers):
            raise RuntimeError(
                f"a stage needs worker resource {name}={amount}, and no worker advertises it; "
                f"start workers with `dask worker ... --resources {name}={amount}`"
            )


class WorkerEnvironmentError(RuntimeError):
    """A worker's environment cannot run the tasks (a module they need does not import there)."""


def task_modules(fn: Callable[..., Any], job: Job) -> list[str]:
    """The modules a worker imports to run `fn` on `job`: the task's own, and each of the recipe's
    stages' and sources' (what unpickling the task and building its stages load)."""
    modules = {fn.__module__}
    modules |= {STAGES[cfg.kind].__module__ for s in job.segments for cfg in s.row_stages}
    modules |= {STAGES[s.global_stage.kind].__module__ for s in job.segments if s.global_stage is not None}
    modules |= {SOURCES[cfg.kind].__module__ for cfg in job.recipe.sources}
    return sorted(modules)


# How long the workers may take to import the tasks' modules (torch and open_clip: ~10-30 s on a
# cold disk); an import that hangs (a network filesystem, a lock) ends the run after it
IMPORT_CHECK_TIMEOUT_S = 300.0


async def _within(timeout: float, start: Callable[[], Any]) -> Any:
    return await asyncio.wait_for(start(), timeout)


def check_imports(client: Client, modules: list[str], timeout: float = IMPORT_CHECK_TIMEOUT_S) -> None:
    """Every worker imports `modules`, or a WorkerEnvironmentError names the workers that cannot
    and why, or says that they did not answer within `timeout` seconds. distributed unpickles a
    task on the worker's connection to the scheduler: one that fails there closes the connection
    and the worker (its nanny too), and the task waits for a worker forever where none is left.
    `exec` is a builtin: it unpickles on any worker. (`Client.run` waits without a bound: a worker
    whose import hangs would hang the run.)"""
    code = f"import {', '.join(modules)}"
    try:
        answers = client.sync(_within, timeout, lambda: client._run(exec, code, on_error="return"))
    except asyncio.TimeoutError:
        raise WorkerEnvironmentError(
            f"the Dask workers did not finish importing the modules their tasks need ({', '.join(modules)}) "
            f"within {timeout:g} s: an import hangs on a worker (a network filesystem, a lock held by "
            "another process); look at the workers' logs") from None
    failed = {w: a for w, a in answers.items() if isinstance(a, BaseException)}
    if failed:
        worker, error = sorted(failed.items())[0]
        more = f" (and {len(failed) - 1} more of the {len(answers)} workers)" if len(failed) > 1 else ""
        raise WorkerEnvironmentError(
            f"Dask worker {worker}{more} cannot import the modules its tasks need "
            f"({', '.join(modules)}): {type(error).__name__}: {error}; install this project, with the "
            "recipe's extras, in every worker's environment (the same version as the driver's)")


def segment_resources(job: Job, seg: int) -> dict[str, float]:
    """The worker resources a task of segment `seg` holds: the most each row stage declares."""
    needed: dict[str, float] = {}
    for cfg in job.segments[seg].row_stages:
        for k, v in cfg.resources.items():
            needed[k] = max(needed.get(k, 0), v)
    return needed


@dataclass(frozen=True)
class Step:
    """What a step's progress line shows: `label` (the step and the stages it runs), and how a
    finished task counts: `tally(call, result)` -> (samples, kept, dropped) of its partition
    (None: the line counts partitions only); `total`: the step's samples when known."""

    label: str
    tally: Callable[[tuple, dict[str, Any]], tuple[int, int, int]] | None = None
    total: int | None = None


class StepLine:
    """One live line on stderr for a step (tqdm): samples done/total and samples/s, then
    partitions done/total, kept and dropped so far (a step without a tally: partitions done/total
    and partitions/s). `quiet` shows nothing."""

    def __init__(self, step: Step, partitions: int, quiet: bool):
        self.partitions, self.done, self.kept, self.dropped = partitions, 0, 0, 0
        self.samples = step.tally is not None
        self.bar = tqdm(total=step.total if self.samples else partitions, desc=step.label,
                        unit=" samples" if self.samples else " partitions", disable=quiet, file=sys.stderr,
                        postfix=self.postfix())

    def postfix(self) -> str | None:
        return f"{self.done}/{self.partitions} partitions, kept {self.kept:,}, dropped {self.dropped:,}" \
            if self.samples else None

    def add(self, samples: int, kept: int, dropped: int, partitions: int = 1) -> None:
        """Tasks finished: their partitions' samples, kept and dropped."""
        self.done += partitions
        self.kept += kept
        self.dropped += dropped
        if self.samples:
            self.bar.set_postfix_str(self.postfix(), refresh=False)
        self.bar.update(samples if self.samples else partitions)

    def close(self) -> None:
        self.bar.close()


def run_tasks(client: Client, fn: Callable[..., dict[str, Any]], calls: list[tuple], step: Step | str,
              progress: bool, resources: dict[str, float] | None = None, retries: int = 0) -> list[dict[str, Any]]:
    """Submit `fn(*args)` for each call as futures, wait for all, return the results in order.

    Each call's first argument is the `Job` and the next two name the task (partition, ...): the
    task key is unique per step, round, partition and recipe. The futures are released on
    return, so a worker that dies later does not make the scheduler recompute finished tasks.
    A task's exception is a bug in a stage: it stops the run. `step` is what the progress line
    shows (a plain label: partitions only), updated as each task finishes. The workers are
    checked first (`check_imports`): one that cannot import what the tasks need ends the run
    instead of stalling it."""
    if isinstance(step, str):
        step = Step(step)
    if calls:
        check_imports(client, task_modules(fn, calls[0][0]))
    refs: dict[int, JobRef] = {}  # each Job once on the output, not once per task (curate.engine.jobref)
    for args in calls:
        if id(args[0]) not in refs:
            refs[id(args[0])] = share_job(args[0])
    futures = []
    for args in calls:
        ref = refs[id(args[0])]
        futures.append(client.submit(
            call_with_job, fn, ref, *args[1:], key=f"{fn.__name__}-r{ref.round}-{'-'.join(map(str, args[1:3]))}-"
                                                  f"{ref.recipe_hash}",
            resources=resources or None, retries=retries, pure=False))
    call_of = {f.key: args for f, args in zip(futures, calls)}
    results: dict[Any, dict[str, Any]] = {}
    line = StepLine(step, len(futures), quiet=not progress)
    try:
        for fut in as_completed(futures):
            results[fut.key] = fut.result()
            line.add(*step.tally(call_of[fut.key], results[fut.key]) if step.tally else (1, 0, 0))
        return [results[f.key] for f in futures]
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        line.close()
