"""Per-stage wall and CPU seconds and row counts, measured where each stage runs.

`StageTimes` is what a segment task (`curate.engine.steps.run_segment`) times its row stages
with: per stage, wall seconds (time.perf_counter), CPU seconds, the live rows (no drop_reason)
that reached it (`rows_in`) and those it let through (`rows_out`), summed over the task's
batches, and the counts the stage made (`Stage.count`: faces blurred, addresses replaced) under
`counts`; `totals` is what the task's done marker records under `stages`. `GlobalPassClock`
times a global pass from the driver: wall seconds there, CPU seconds of the cluster's worker
processes during the pass (their process clocks read before and after: what else they ran
meanwhile, idle overhead included, counts too).

The CPU clock of a row stage: on a worker that runs one task at a time (`threads_per_worker: 1`,
the default) the process's clock (time.process_time), which counts the threads a stage starts
itself (download's fetch pool, torch's intra-op threads); on a worker running several tasks at
once the task thread's own clock (getrusage RUSAGE_THREAD), because a process clock would charge
each task with its neighbours' work; a stage's helper threads are then not counted, and the CPU
seconds are a lower bound.
"""

from __future__ import annotations

import resource
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from curate.stages.base import counting

__all__ = ["GlobalPassClock", "StageTimes", "cpu_clock", "live_rows"]


def _thread_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def cpu_clock() -> Callable[[], float]:
    """The CPU clock a task on this process times its stages with (module docstring)."""
    # distributed is imported by the worker already; here only to ask how many tasks it runs at once
    from distributed import get_worker

    try:
        threads = get_worker().state.nthreads
    except ValueError:  # not in a Dask task (a task run in-process)
        threads = 1
    return time.process_time if threads == 1 else _thread_cpu


def live_rows(table: pa.Table) -> int:
    """Rows of a batch that no stage has dropped."""
    return table.column("drop_reason").null_count if "drop_reason" in table.column_names else table.num_rows


class StageTimes:
    """Wall and CPU seconds and live rows in and out per stage name, summed over batches."""

    def __init__(self) -> None:
        self.cpu = cpu_clock()
        self.totals: dict[str, dict[str, Any]] = {}

    def run(self, name: str, process: Callable[[pa.Table], pa.Table], table: pa.Table) -> pa.Table:
        """`process(table)`, timed and counted under `name`."""
        rows_in = live_rows(table)
        wall, cpu = time.perf_counter(), self.cpu()
        with counting() as counts:
            out = process(table)
        wall, cpu = time.perf_counter() - wall, self.cpu() - cpu
        entry = self.totals.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "rows_in": 0, "rows_out": 0})
        entry["wall_s"] += wall
        entry["cpu_s"] += cpu
        entry["rows_in"] += rows_in
        entry["rows_out"] += live_rows(out)
        if counts:
            merged = Counter(entry.get("counts", {})) + counts
            entry["counts"] = dict(sorted(merged.items()))
        return out


class GlobalPassClock:
    """Times a global pass from the driver (a context manager): `wall_s` and `cpu_s` once it ends.
    The pass computes on the current Dask client's cluster (its workers' CPU is counted), or, with
    none, on dask's local scheduler in this process (this process's CPU is)."""

    def __init__(self) -> None:
        # distributed is imported by the driver already; here only to find the current client
        from distributed import default_client

        try:
            self.client: Any = default_client()
        except ValueError:  # no client: dask computes in this process
            self.client = None
        self.wall_s = self.cpu_s = 0.0

    def _cpu(self) -> dict[str, float]:
        return self.client.run(time.process_time) if self.client is not None else {"": time.process_time()}

    def __enter__(self) -> GlobalPassClock:
        self._start = (time.perf_counter(), self._cpu())
        return self

    def __exit__(self, *exc: Any) -> None:
        wall, before = self._start
        after = self._cpu()
        self.wall_s = time.perf_counter() - wall
        for worker, now in after.items():
            start = before.get(worker)
            # a worker that started (or restarted) during the pass: all it has counts
            self.cpu_s += now - start if start is not None and now >= start else now
