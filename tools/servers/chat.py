"""A small OpenAI-compatible chat-completions server over local Hugging Face models: what the
recaptioning stage's `openai` backend talks to at scale (vLLM, SGLang), here in one process on
loopback so tests, the demo and the benchmarks run a real server with nothing downloaded.

    python -m tools.servers.chat --vlm MODEL_DIR [--llm MODEL_DIR] [--port 0] [--port-file F]
        [--max-batch 16] [--batch-window-ms 5]

- `POST /v1/chat/completions`: `{"model", "messages", "max_tokens"}`; the last message's content is
  a string (a text prompt, answered by `--llm`) or a list of parts with one `image_url` (a data URL)
  and text (answered by `--vlm`). Greedy decoding. Requests that arrive together are generated in
  one batch per model (up to `--max-batch`, gathered for `--batch-window-ms`), as serving engines
  batch, so throughput grows with client concurrency.
- `GET /v1/models`, `GET /health`, `GET /stats` (requests, completions, batches, largest batch).
- `POST /control` with `{"script": [step, ...]}`: the next chat requests, in arrival order, meet
  these failures instead of (or before) an answer, for testing clients: `{"mode": "status",
  "status": 500}`, `{"mode": "slow", "delay_s": 5}` (then a normal answer), `{"mode":
  "malformed"}` (a 200 whose body is not JSON), `{"mode": "drop"}` (the connection closed without
  a response), `{"mode": "drip", "delay_s": 0.5}` (a valid answer, one byte at a time), `{"mode":
  "reply", "text": "..."}` (that text as the answer, finish_reason "stop").
  `POST /reset` clears the script and the counters.

Binds 127.0.0.1 unless told otherwise; it is a test and demo server, not a hardened service.
"""

from __future__ import annotations

import argparse
import base64
import json
import queue
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from curate.captions.generation import TransformersLM, TransformersVLM


class _Batcher:
    """One model's request queue and the thread that answers it in batches."""

    def __init__(self, backend: Any, kind: str, max_batch: int, window_s: float, stats: dict, lock: threading.Lock):
        self.backend, self.kind, self.max_batch, self.window_s = backend, kind, max_batch, window_s
        self.stats, self.lock = stats, lock
        self.queue: queue.Queue = queue.Queue()
        backend.load()  # here, so a model that does not load fails the server's start
        threading.Thread(target=self._run, daemon=True, name=f"chat-{kind}").start()

    def submit(self, payload: Any, prompt: str, max_tokens: int) -> Future:
        f: Future = Future()
        self.queue.put((payload, prompt, max_tokens, f))
        return f

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    batch.append(self.queue.get(timeout=max(left, 0)) if left > 0 else self.queue.get_nowait())
                except queue.Empty:
                    break
            groups: dict[tuple[str, int], list] = {}
            for item in batch:
                groups.setdefault((item[1], item[2]), []).append(item)
            with self.lock:
                self.stats["batches"] += 1
                self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
            for (prompt, max_tokens), items in groups.items():
                try:
                    self.backend.max_new_tokens = max_tokens
                    if self.kind == "vlm":
                        out = self.backend.caption([i[0] for i in items], prompt)
                    else:
                        out = self.backend.complete([i[0] for i in items])
                    for item, g in zip(items, out):
                        item[3].set_result(g)
                except Exception as exc:  # noqa: BLE001 - answered as a 500, the server goes on
                    for item in items:
                        item[3].set_exception(exc)


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], vlm: str | None, llm: str | None, *, max_batch: int = 16,
                 window_ms: float = 5.0, device: str = "cpu"):
        super().__init__(address, _Handler)
        self.lock = threading.Lock()
        self.script: list[dict[str, Any]] = []
        self.stats = {"requests": 0, "completions": 0, "batches": 0, "max_batch": 0}
        self.models: dict[str, _Batcher] = {}
        self.names: dict[str, str] = {}
        for kind, path, cls in (("vlm", vlm, TransformersVLM), ("llm", llm, TransformersLM)):
            if path:
                backend = cls(path, device=device, batch_size=max_batch)
                self.models[kind] = _Batcher(backend, kind, max_batch, window_ms / 1000, self.stats, self.lock)
                self.names[kind] = Path(path).name

    def next_step(self) -> dict[str, Any] | None:
        with self.lock:
            self.stats["requests"] += 1
            return self.script.pop(0) if self.script else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body leave in two writes: with Nagle's algorithm the second waits for the
    # client's delayed ACK (~40 ms a response on Linux)
    disable_nagle_algorithm = True
    server: ChatServer

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its deadline passed)
            self.close_connection = True

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode())

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/health":
            self._json(200, {"ok": True})
        elif self.path == "/stats":
            with self.server.lock:
                self._json(200, dict(self.server.stats))
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in self.server.names.values()]})
        else:
            self._json(404, {"error": {"message": f"no {self.path}"}})

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        if n > 64 * 2**20:
            raise ValueError("request over 64 MiB")
        return json.loads(self.rfile.read(n) or b"{}")

    def do_POST(self) -> None:  # noqa: N802
        try:
            body = self._body()
        except ValueError as exc:
            return self._json(400, {"error": {"message": f"bad request: {exc}"}})
        if self.path == "/control":
            with self.server.lock:
                self.server.script.extend(body.get("script", []))
            return self._json(200, {"queued": len(self.server.script)})
        if self.path == "/reset":
            with self.server.lock:
                self.server.script.clear()
                self.server.stats.update(requests=0, completions=0, batches=0, max_batch=0)
            return self._json(200, {"ok": True})
        if self.path != "/v1/chat/completions":
            return self._json(404, {"error": {"message": f"no {self.path}"}})
        step = self.server.next_step()
        if step is not None and self._misbehave(step, body):
            return
        self._complete(body)

    def _misbehave(self, step: dict[str, Any], body: Any) -> bool:
        """Apply a scripted step; True when it answered (or dropped) the request itself."""
        mode = step.get("mode")
        if mode == "slow":
            time.sleep(float(step.get("delay_s", 5)))
            return False
        if mode == "status":
            self._json(int(step.get("status", 500)), {"error": {"message": "scripted failure"}})
            return True
        if mode == "malformed":
            self._send(200, b'{"choices": [{"message": ', "application/json")
            return True
        if mode == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return True
        if mode == "drip":  # a valid answer, one byte every delay_s: only a total deadline stops it
            body = json.dumps({"choices": [{"message": {"content": "slowly"}, "finish_reason": "stop"}]}).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(float(step.get("delay_s", 0.5)))
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            return True
        if mode == "reply":
            self._answer(body.get("model", ""), step.get("text", ""), truncated=False)
            return True
        return False

    def _complete(self, body: dict[str, Any]) -> None:
        try:
            content = body["messages"][-1]["content"]
            max_tokens = int(body.get("max_tokens") or 128)
            if isinstance(content, str):
                kind, payload, prompt = "llm", content, ""
            else:
                image = next(p["image_url"]["url"] for p in content if p.get("type") == "image_url")
                prompt = "".join(p.get("text", "") for p in content if p.get("type") == "text")
                kind, payload = "vlm", base64.b64decode(image.split(",", 1)[1])
        except (KeyError, IndexError, TypeError, ValueError, StopIteration) as exc:
            return self._json(400, {"error": {"message": f"bad request: {type(exc).__name__}: {exc}"}})
        if kind not in self.server.models:
            return self._json(400, {"error": {"message": f"this server has no {kind}"}})
        try:
            g = self.server.models[kind].submit(payload, prompt, max_tokens).result()
        except Exception as exc:  # noqa: BLE001
            return self._json(500, {"error": {"message": f"{type(exc).__name__}: {exc}"}})
        if not g.ok:
            return self._json(400, {"error": {"message": f"{g.error}: {g.detail}"}})
        self._answer(body.get("model", self.server.names[kind]), g.text or "", g.truncated)

    def _answer(self, model: str, text: str, truncated: bool) -> None:
        with self.server.lock:
            self.server.stats["completions"] += 1
        self._json(200, {"id": f"chatcmpl-{time.monotonic_ns()}", "object": "chat.completion",
                         "created": int(time.time()), "model": model,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "length" if truncated else "stop"}]})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vlm", help="an image-text-to-text model folder")
    ap.add_argument("--llm", help="a causal LM folder with a chat template")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", help="write the bound port here once listening")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    server = ChatServer((args.host, args.port), args.vlm, args.llm, max_batch=args.max_batch,
                        window_ms=args.batch_window_ms, device=args.device)
    port = server.server_address[1]
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)
    print(f"listening on http://{args.host}:{port}/v1", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
