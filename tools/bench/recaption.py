"""Recaptioning throughput: captions/s of the local (transformers) backend batched vs one image at a
time, and of the server backend against a chat-completions server as client concurrency grows.

- local: `curate.captions.generation.TransformersVLM` over the same images with `batch_size` 1 and each
  of `--batches`, greedy, `--new-tokens` tokens each (the tiny model never ends early, so every
  caption is exactly that long: equal work per caption on every side).
- server: `tools/servers/chat.py` in its own process over the same model (it batches requests
  that arrive together, up to `--max-batch`, as vLLM and SGLang do), and
  `curate.captions.generation.ChatCompletions` at each of `--concurrency`; the server's largest batch is
  reported beside.

By default the model is tools/demo/tiny_models.py's LLaVA-architecture VLM (RANDOM weights, built in a
temporary folder): the numbers are real for that model, whose per-token compute is tiny, so they
show the batching and concurrency overheads, not a real captioner's speed. `--vlm PATH` measures a
real model (with `--device cuda` on a GPU machine).

    python -m tools.bench.recaption [--images 64] [--new-tokens 16] [--batches 8 32]
        [--concurrency 1 4 16 32] [--vlm PATH] [--device cpu] [--json OUT]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from curate.captions.generation import ChatCompletions, TransformersVLM
from tools.demo.tiny_models import build_tiny_vlm


def images(n: int, side: int = 96) -> list[bytes]:
    """n distinct JPEG crops of scikit-image's sample photographs."""
    from skimage import data  # heavy optional dependency (demo extra): its sample photographs

    bases = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for i in range(n):
        img = bases[i % len(bases)]
        y, x = (i * 11) % (img.shape[0] - side), (i * 17) % (img.shape[1] - side)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img[y:y + side, x:x + side])).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def local(vlm: str, pics: list[bytes], batch: int, new_tokens: int, device: str) -> dict[str, Any]:
    model = TransformersVLM(vlm, device=device, batch_size=batch, max_new_tokens=new_tokens)
    model.caption(pics[:batch], "Describe this image.")  # load and warm up
    model.calls = model.items = 0
    start = time.perf_counter()
    out = model.caption(pics, "Describe this image.")
    dt = time.perf_counter() - start
    assert all(g.ok for g in out)
    return {"side": "local", "batch_size": batch, "captions": len(pics), "seconds": dt,
            "captions_per_s": len(pics) / dt, "model_calls": model.calls}


class _Server:
    def __init__(self, vlm: str, max_batch: int, device: str, tmp: Path):
        port_file = tmp / "port"
        self.proc = subprocess.Popen([sys.executable, "-m", "tools.servers.chat", "--vlm", vlm, "--port-file",
                                      str(port_file), "--max-batch", str(max_batch), "--device", device],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the chat server did not start")
            time.sleep(0.1)
        self.port = int(port_file.read_text())

    def post(self, path: str) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=b"{}", method="POST")
        return json.load(urllib.request.urlopen(req, timeout=30))

    def stats(self) -> dict:
        return json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=30))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def served(server: _Server, pics: list[bytes], concurrency: int, new_tokens: int) -> dict[str, Any]:
    client = ChatCompletions(f"http://127.0.0.1:{server.port}/v1", "vlm", concurrency=concurrency,
                             timeout_s=600, retries=0, max_tokens=new_tokens)
    client.caption(pics[:concurrency], "Describe this image.")  # connections up, server warm
    server.post("/reset")
    start = time.perf_counter()
    out = client.caption(pics, "Describe this image.")
    dt = time.perf_counter() - start
    assert all(g.ok for g in out), [g for g in out if not g.ok][:3]
    return {"side": "server", "concurrency": concurrency, "captions": len(pics), "seconds": dt,
            "captions_per_s": len(pics) / dt, "server_max_batch": server.stats()["max_batch"]}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--max-batch", type=int, default=32, help="the server's batch limit")
    ap.add_argument("--vlm", help="a model folder (default: the tiny random-weight VLM)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    pics = images(args.images)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        vlm = args.vlm
        if vlm is None:
            vlm = str(build_tiny_vlm(Path(tmp) / "vlm"))
        for batch in [1, *args.batches]:
            results.append(local(vlm, pics, batch, args.new_tokens, args.device))
            print(json.dumps(results[-1]), flush=True)
        server = _Server(vlm, args.max_batch, args.device, Path(tmp))
        try:
            for c in args.concurrency:
                results.append(served(server, pics, c, args.new_tokens))
                print(json.dumps(results[-1]), flush=True)
        finally:
            server.stop()
    one = results[0]["captions_per_s"]
    first_server = next(r for r in results if r["side"] == "server")["captions_per_s"]
    for r in results:
        r["ratio"] = r["captions_per_s"] / (one if r["side"] == "local" else first_server)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
            "model": "tiny random-weight LLaVA-architecture VLM" if args.vlm is None else args.vlm,
            "new_tokens": args.new_tokens}
    print(json.dumps(meta))
    for r in results:
        knob = f"batch {r['batch_size']}" if r["side"] == "local" else f"concurrency {r['concurrency']}"
        print(f"{r['side']:<7} {knob:<16} {r['captions_per_s']:8.2f} captions/s  x{r['ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
