"""Every benchmark row that waits for a GPU, in one command that fits a short device lease (about
6 minutes on one H100 with the default rows' caps). Each row runs in its own subprocess under a
time cap (a row that hangs or runs long is killed, with what it printed so far kept), and each
finished row is appended to `OUT/gpu_suite.jsonl` as one JSON line the moment it ends, after a
`machine` line (GPU, torch, CUDA, Python, package versions), so a suite killed half-way keeps
every row that finished.

Rows (`--rows` picks some; the default is every row marked default), with their caps:

- train_mfu_3b (150 s): MM1-3B's training step (tools/bench/train_mfu.py), bf16, compile,
  selective activation checkpointing, tower trained, seq 4096, 8 images; batch 2 then 1 on a GPU
  of over 100 GiB, 1 elsewhere, then full checkpointing if that runs out of memory;
- clip_vith378 (90 s): the CLIP scoring stage against the bare forward
  (tools/bench/clip_scoring.py), ViT-H-14-378-quickgelu with random weights, bf16;
- recaption_local (90 s): the local recaption backend, batch 1 vs 8 vs 32
  (tools/bench/recaption.py), the tiny random-weight VLM built from configs;
- train_mfu_3b_frozen (150 s, not a default): train_mfu_3b with the tower frozen.

`--dry-run` runs the same rows at tiny sizes on the CPU in seconds (tests/tools/
test_bench_gpu_suite.py does, in `make test`). Nothing is downloaded: every model has random
weights and is built from a config.

On the GPU machine (Python 3.12, torch 2.11, no registry) open_clip, pydantic and their few
dependencies are missing: `make gpu-wheels` downloads their cp312 wheels into build/gpu_wheels
(8 wheels, 5.1 MiB; the list is in the Makefile), which the device call carries:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site build/gpu_wheels/*.whl \\
        && export PYTHONPATH=/tmp/site && python3 -m tools.bench.gpu_suite

with `carry: ["build/gpu_wheels"]`; the results come back as `$OUT/gpu_suite.jsonl`.

    python -m tools.bench.gpu_suite [--rows a,b,c] [--dry-run] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
RESULTS = "gpu_suite.jsonl"
RESULT_PREFIX, PROGRESS_PREFIX = "RESULT ", "PROGRESS "
MACHINE_CAP_S = 60


@dataclass(frozen=True)
class Row:
    cap_s: float
    run: Callable[[bool], dict[str, Any]]  # dry_run -> the row's result (its "status" says how it went)
    default: bool = True


def _progress(record: dict[str, Any]) -> None:
    """A partial result, kept by the suite even if the row is killed at its cap later."""
    print(PROGRESS_PREFIX + json.dumps(record), flush=True)


# the rows -----------------------------------------------------------------------------------------


def _train_mfu(dry: bool, tower: str) -> dict[str, Any]:
    # in the row's child process only (torch: train extra): a row whose imports fail is that row's error
    import torch

    from tools.bench.train_mfu import measure_or_oom  # likewise: it imports torch at its top

    if dry:
        device = torch.device("cpu")
        size = {"name": "tiny", "seq_len": 128, "images": 4, "steps": 1, "warmup": 1, "compile": False}
        attempts = [(2, "selective")]
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device (--dry-run runs the rows on the CPU)")
        device = torch.device("cuda")
        size = {"name": "mm1-3b", "seq_len": 4096, "images": 8, "steps": 10, "warmup": 3, "compile": True}
        memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        # MM1-3B with its tower trained holds ~54 GiB of fp32 weights, gradients and AdamW moments
        attempts = ([(2, "selective")] if memory_gib > 100 else []) + [(1, "selective"), (1, "full")]
    tried = []
    for batch, ac in attempts:
        r = measure_or_oom(size["name"], seq_len=size["seq_len"], batch=batch, images=size["images"],
                           steps=size["steps"], warmup=size["warmup"], compile=size["compile"], ac=ac, ac_every=2,
                           tower=tower, device=device)
        _progress(r)
        tried.append(r)
        if r["status"] == "ok":
            break
    return {**tried[-1], "attempts": [{k: a.get(k) for k in ("batch", "activation_checkpointing", "status")}
                                      for a in tried]}


def _clip(dry: bool) -> dict[str, Any]:
    from tools.bench.clip_scoring import run  # in the row's child process only (open_clip: train extra)

    if dry:
        r = run("ViT-S-32", 4, 4, "cpu", "fp32", 1)
    else:
        import torch  # in the row's child process only (train extra)

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device (--dry-run runs the rows on the CPU)")
        r = run("ViT-H-14-378-quickgelu", 256, 64, "cuda", "bf16", 8)
    return {"status": "ok", **r, "goal": "whole stage >= 0.9 x bare forward", "meets_goal": r["ratio"] >= 0.9}


def _recaption(dry: bool) -> dict[str, Any]:
    # in the row's child process only: a row whose imports fail is that row's error, not the suite's
    from tools.bench.recaption import images, local
    from tools.demo.tiny_models import build_tiny_vlm

    if dry:
        n, new_tokens, batches, device = 4, 2, [1, 4], "cpu"
    else:
        import torch  # in the row's child process only (train extra)

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device (--dry-run runs the rows on the CPU)")
        n, new_tokens, batches, device = 128, 16, [1, 8, 32], "cuda"
    pics = images(n)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        vlm = str(build_tiny_vlm(Path(tmp) / "vlm"))
        for batch in batches:
            results.append(local(vlm, pics, batch, new_tokens, device))
            _progress(results[-1])
    one = results[0]["captions_per_s"]
    return {"status": "ok", "model": "tiny random-weight LLaVA-architecture VLM", "device": device,
            "new_tokens": new_tokens,
            "results": [{**r, "ratio": r["captions_per_s"] / one} for r in results]}


def machine() -> dict[str, Any]:
    """What ran the suite: GPU, torch and CUDA, Python, and the versions of the packages the
    rows import (None: not installed)."""
    import torch  # in the `machine` child process only (train extra); the suite's parent never loads it

    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    versions = {}
    for pkg in ("open_clip_torch", "pydantic", "transformers", "torchvision", "timm", "triton", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"status": "ok", "gpu": props.name if props else None,
            "gpu_memory_gib": props.total_memory / 2**30 if props else None, "gpu_count": torch.cuda.device_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "packages": versions}


ROWS: dict[str, Row] = {
    "train_mfu_3b": Row(150, lambda dry: _train_mfu(dry, "trained")),
    "clip_vith378": Row(90, _clip),
    "recaption_local": Row(90, _recaption),
    "train_mfu_3b_frozen": Row(150, lambda dry: _train_mfu(dry, "frozen"), default=False),
}


# running them ----------------------------------------------------------------------------------


def _child_argv(name: str, dry: bool) -> list[str]:
    return [sys.executable, "-m", "tools.bench.gpu_suite", "--child", name] + (["--dry-run"] if dry else [])


def _parse(stdout: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    result, progress = None, []
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
        elif line.startswith(PROGRESS_PREFIX):
            progress.append(json.loads(line[len(PROGRESS_PREFIX):]))
    return result, progress


def run_row(name: str, cap_s: float, dry: bool) -> dict[str, Any]:
    """One row in its own process group, killed whole at `cap_s`. The record: row, status ("ok",
    the row's own such as "out of memory", "timeout", "error"), seconds, cap_s, dry_run, the
    row's result, and on failure what the row reported before it ended and its stderr's tail."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(_child_argv(name, dry), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=cap_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    result, progress = _parse(out)
    record: dict[str, Any] = {"row": name, "seconds": round(seconds, 2), "cap_s": cap_s, "dry_run": dry}
    if timed_out:
        record["status"] = "timeout"
    elif proc.returncode != 0 or result is None:
        record["status"] = "error"
    else:
        record["status"] = result.get("status", "ok")
        record["result"] = result
        return record
    record.update(returncode=proc.returncode, progress=progress, stderr_tail=err[-3000:])
    return record


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _summary(record: dict[str, Any]) -> str:
    r = record.get("result") or record
    bits = [f"{record['row']}: {record['status']} in {record['seconds']:.0f}s"]
    if "mfu" in r:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        hfu = f"{r['hfu']:.1%}" if r.get("hfu") is not None else "n/a"
        bits.append(f"{r.get('tokens_per_s', 0):,.0f} tokens/s, MFU {mfu}, HFU {hfu}, batch {r.get('batch')}, "
                    f"ac {r.get('activation_checkpointing')}")
    if "ratio" in r:
        bits.append(f"stage / bare forward {r['ratio']:.2f}")
    if "results" in r:
        bits.append(", ".join(f"batch {x['batch_size']}: {x['captions_per_s']:.1f}/s" for x in r["results"]))
    if "gpu" in r:
        bits.append(f"{r['gpu']}, torch {r['torch']}, Python {r['python']}")
    return " | ".join(bits)


def _default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench_out" / "gpu_suite"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", help=f"comma-separated, of {', '.join(ROWS)} (default: "
                    f"{','.join(n for n, r in ROWS.items() if r.default)})")
    ap.add_argument("--dry-run", action="store_true", help="every row at tiny sizes on the CPU")
    ap.add_argument("--out", type=Path, help="where gpu_suite.jsonl goes (default: $OUT, else bench_out/gpu_suite)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = ap.parse_args(argv)
    if args.child:
        result = machine() if args.child == "machine" else ROWS[args.child].run(args.dry_run)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    names = [n.strip() for n in args.rows.split(",") if n.strip()] if args.rows \
        else [n for n, r in ROWS.items() if r.default]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    out = args.out or _default_out()
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    ok = True
    for name in ["machine", *names]:
        record = run_row(name, MACHINE_CAP_S if name == "machine" else ROWS[name].cap_s, args.dry_run)
        if name == "machine":  # one flat line: what ran, and which rows follow
            record.update(record.pop("result", {}), rows=names)
        _append(path, record)
        print(_summary(record), flush=True)
        ok &= record["status"] == "ok"
    print(f"results: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
