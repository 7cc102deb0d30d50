"""What a cluster-wide per-host slot costs: curate.web.hosts' hand-offs against a plain
`distributed.Semaphore` lease per request (the same code with MAX_HANDOFFS = 0), side by side on
one LocalCluster.

Each of `--workers` processes runs one task whose `--threads` threads take `--slots` slots of
ONE host between them (the download stage's shape when a batch is all one host), with no rate
limit and an empty body, so only the limiter's own cost is measured: CPU seconds of every
process (workers, and the driver that hosts the scheduler) per slot, and slots per second.

    python -m tools.bench.domain_slots [--workers 2] [--threads 32] [--slots 2500] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask
import psutil
from dask.distributed import Client, LocalCluster

from curate.engine.cluster import WORKER_CONFIG
from curate.web import hosts as domains


def _task(mode: str, namespace: str, n: int, threads: int, concurrency: int) -> float:
    """Take `n` slots of one host from `threads` threads; the CPU seconds this process used."""
    limiter = domains.DomainLimiter(concurrency, None, namespace=namespace)
    saved = domains.MAX_HANDOFFS
    domains.MAX_HANDOFFS = 0 if mode == "semaphore" else saved  # 0: every slot is a scheduler lease
    start = time.process_time()
    try:
        def one(_: int) -> None:
            with limiter.slot("bench.test"):
                pass

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(n)))
    finally:
        domains.MAX_HANDOFFS = saved
    return time.process_time() - start


def run(workers: int, threads: int, slots: int, concurrency: int, repeat: int) -> dict[str, Any]:
    with dask.config.set(WORKER_CONFIG):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None)
    client = Client(cluster)
    me = psutil.Process()
    results: dict[str, list[dict[str, float]]] = {"semaphore": [], "hand-offs": []}
    try:
        for r in range(repeat):
            for mode in (("semaphore", "hand-offs") if r % 2 == 0 else ("hand-offs", "semaphore")):
                ns = f"bench-{mode}-{r}"
                before, t0 = me.cpu_times(), time.perf_counter()
                futures = [client.submit(_task, mode, ns, slots, threads, concurrency, pure=False,
                                         key=f"slots-{ns}-{w}", workers=[addr])
                           for w, addr in enumerate(sorted(client.scheduler_info(n_workers=-1)["workers"]))]
                worker_cpu = sum(client.gather(futures))
                wall, after = time.perf_counter() - t0, me.cpu_times()
                driver_cpu = (after.user + after.system) - (before.user + before.system)
                n = slots * workers
                results[mode].append({"cpu_ms_per_slot": 1000 * (worker_cpu + driver_cpu) / n,
                                      "slots_per_s": n / wall})
    finally:
        client.close()
        cluster.close()
    return {mode: {k: statistics.median(x[k] for x in runs) for k in runs[0]} for mode, runs in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--slots", type=int, default=2500, help="per worker process")
    parser.add_argument("--concurrency", type=int, default=8, help="max_per_host")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"{args.workers} processes x {args.threads} threads, {args.slots} slots each, one host, "
          f"max_per_host {args.concurrency}, no rate; {os.cpu_count()} cores; medians of {args.repeat}")
    out = run(args.workers, args.threads, args.slots, args.concurrency, args.repeat)
    print("| | CPU ms per slot (all processes) | slots/s |\n|---|---:|---:|")
    for mode, m in out.items():
        print(f"| {mode} | {m['cpu_ms_per_slot']:.3f} | {m['slots_per_s']:,.0f} |")
    ratio = out["semaphore"]["cpu_ms_per_slot"] / out["hand-offs"]["cpu_ms_per_slot"]
    print(f"hand-offs use {ratio:.1f}x less CPU per slot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
