"""Text generation for the recaptioning stage: a vision-language model that captions images and a
language model that rewrites captions, each behind one of two backends.

- `TransformersVLM` / `TransformersLM`: a Hugging Face model by local folder (or hub name, which
  transformers resolves; nothing here fetches on its own), loaded once per worker process with
  `AutoModelForImageTextToText` + `AutoProcessor` (transformers 5 removed the vision2seq auto
  class and the image-to-text pipeline) or `AutoModelForCausalLM` + `AutoTokenizer`; prompts go
  through the processor's or tokenizer's chat template; batched, greedy, on the given device.
  Weights are read from safetensors only (`use_safetensors=True`: no pickled `.bin`), and no
  remote code runs.
- `ChatCompletions`: an OpenAI-compatible `/v1/chat/completions` server (vLLM, SGLang, TGI...),
  images sent inline as data URLs, up to `concurrency` requests in flight, a total deadline per
  attempt, retries with jittered exponential backoff on timeouts, dropped connections, 429, 5xx
  and malformed responses; 4xx other than 429 are not retried.

Every call returns one `Generated` per input, in order: the text, or a stable error code
(`decode_error`, `generation_error`, `timeout`, `connection_error`, `http_<status>`,
`bad_response`) with a detail.
`calls` counts model invocations (generate calls, HTTP requests) and `items` the prompts
answered, so tests and benchmarks can see what a cache saved.

`model_id` names the model for the stage's cache and metadata: for a local folder its name plus
a fingerprint of its config files and weight files (names and sizes, and the bytes themselves
when they are small, as tests' tiny models are); for a hub name the name; for a server
`served:<model>` (the served name, wherever it is served). A recipe's `model_id` replaces it (a
retrained model at the same path, other weights under one served name).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

DECODE_ERROR = "decode_error"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
BAD_RESPONSE = "bad_response"
GENERATION_ERROR = "generation_error"
SMALL_WEIGHTS = 64 * 2**20  # weight files up to this size in total are hashed whole
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Generated:
    text: str | None = None
    error: str | None = None
    detail: str = ""
    truncated: bool = False  # stopped at the token limit, not at an end token

    @property
    def ok(self) -> bool:
        return self.error is None


def folder_fingerprint(path: str | Path) -> str:
    """sha256 (16 hex) of a model folder's config/tokenizer files and its weight files' names and
    sizes, plus the weight bytes when they are under SMALL_WEIGHTS in total."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")]
    small = sum(p.stat().st_size for p in weights) <= SMALL_WEIGHTS
    for p in files:
        rel = p.relative_to(root).as_posix()
        if p in weights:
            h.update(f"{rel}\0{p.stat().st_size}\0".encode())
            if small:
                h.update(p.read_bytes())
        elif p.suffix in (".json", ".jinja", ".model", ".txt"):
            h.update(f"{rel}\0".encode() + p.read_bytes())
    return h.hexdigest()[:16]


def local_model_id(model: str) -> str:
    path = Path(model)
    return f"{path.name}@{folder_fingerprint(path)}" if path.is_dir() else model


def decode_rgb(data: bytes, max_pixels: int) -> Any:
    """Pillow RGB image of `data`, its size checked on the header first (decompression bombs)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.width * img.height > max_pixels:
            raise ValueError(f"{img.width}x{img.height} is over {max_pixels} pixels")
        img.load()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            out = Image.new("RGB", rgba.size, (255, 255, 255))
            out.paste(rgba, mask=rgba.getchannel("A"))
            return out
        return img.convert("RGB")


def _require_transformers() -> None:
    try:  # the vecap extra, checked when the backend loads: keeps torch out of curate/
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"the transformers backend needs torch and transformers ({exc}): "
                           "pip install 'mm1-pipeline[vecap]'") from exc


def _torch_setup(device: str, dtype: str) -> tuple[Any, Any]:
    import torch  # keeps torch out of curate/ (vecap extra)

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device), getattr(torch, _DTYPES[dtype]) if dtype in _DTYPES else "auto"


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _finish(tokenizer: Any, new_tokens: Any, eos: set[int], max_new_tokens: int) -> list[Generated]:
    out = []
    for row in new_tokens.tolist():
        ended = any(t in eos for t in row)
        text = tokenizer.decode(row, skip_special_tokens=True)
        out.append(Generated(text=text, truncated=not ended and len(row) >= max_new_tokens))
    return out


class _Counted:
    calls = 0
    items = 0


class _Local(_Counted):
    """A transformers model of a local folder (or hub name), loaded on first use.

    A batch whose generation raises (out of device memory, an input the processor refuses) is
    tried again one item at a time; an item that still raises is a `generation_error`, so one
    sample cannot fail a task that holds a thousand."""

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto", batch_size: int = 8,
                 max_new_tokens: int = 128, model_id: str | None = None):
        self.name, self.device_name, self.dtype_name = model, device, dtype
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.model_id = model_id or local_model_id(model)
        self._model = None

    def _guarded(self, generate: Any, items: list[Any], *args: Any) -> list[Generated]:
        try:
            return generate(items, *args)
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            if len(items) > 1:
                return [g for item in items for g in self._guarded(generate, [item], *args)]
            return [Generated(error=GENERATION_ERROR, detail=f"{type(exc).__name__}: {exc}"[:300])]

    def _from_pretrained(self, auto_class: Any) -> Any:
        self.device, dtype = _torch_setup(self.device_name, self.dtype_name)
        model = auto_class.from_pretrained(self.name, dtype=dtype, use_safetensors=True)
        return model.to(self.device).eval()


class TransformersVLM(_Local):
    """Captions images with a local image-text-to-text model (greedy, batched)."""

    def __init__(self, model: str, *, max_pixels: int = 50_000_000, **kwargs: Any):
        super().__init__(model, **kwargs)
        self.max_pixels = max_pixels

    def load(self) -> None:
        if self._model is not None:
            return
        _require_transformers()
        from transformers import AutoModelForImageTextToText, AutoProcessor  # heavy, optional (vecap extra)

        self.processor = AutoProcessor.from_pretrained(self.name)
        self.processor.tokenizer.padding_side = "left"  # decoder-only batches grow to the right
        self._model = self._from_pretrained(AutoModelForImageTextToText)
        self.eos = _eos_ids(self._model, self.processor.tokenizer)

    def caption(self, images: list[bytes], prompt: str) -> list[Generated]:
        self.load()
        results: list[Generated | None] = [None] * len(images)
        decoded = []
        for i, data in enumerate(images):
            try:
                decoded.append((i, decode_rgb(data, self.max_pixels)))
            except Exception as exc:  # noqa: BLE001 - untrusted bytes: any failure is this code
                results[i] = Generated(error=DECODE_ERROR, detail=f"{type(exc).__name__}: {exc}"[:300])
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        for start in range(0, len(decoded), self.batch_size):
            chunk = decoded[start:start + self.batch_size]
            for (i, _), g in zip(chunk, self._guarded(self._generate, [img for _, img in chunk], text)):
                results[i] = g
        return results  # type: ignore[return-value]

    def _generate(self, images: list[Any], text: str) -> list[Generated]:
        import torch  # keeps torch out of curate/ (vecap extra)

        inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs and self._model.dtype != torch.float32:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        with torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        self.calls += 1
        self.items += len(images)
        return _finish(self.processor.tokenizer, out[:, inputs["input_ids"].shape[1]:].cpu(), self.eos,
                       self.max_new_tokens)


class TransformersLM(_Local):
    """Answers single-turn chat prompts with a local causal LM (greedy, batched)."""

    def load(self) -> None:
        if self._model is not None:
            return
        _require_transformers()
        from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy, optional (vecap extra)

        self.tokenizer = AutoTokenizer.from_pretrained(self.name)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.name}: the tokenizer has no chat template (an instruction model is needed)")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._model = self._from_pretrained(AutoModelForCausalLM)
        self.eos = _eos_ids(self._model, self.tokenizer)

    def complete(self, prompts: list[str]) -> list[Generated]:
        self.load()
        out: list[Generated] = []
        for start in range(0, len(prompts), self.batch_size):
            out += self._guarded(self._generate, prompts[start:start + self.batch_size])
        return out

    def _generate(self, prompts: list[str]) -> list[Generated]:
        import torch  # keeps torch out of curate/ (vecap extra)

        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                    tokenize=False) for p in prompts]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.inference_mode():
            gen = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                       pad_token_id=self.tokenizer.pad_token_id)
        self.calls += 1
        self.items += len(prompts)
        return _finish(self.tokenizer, gen[:, inputs["input_ids"].shape[1]:].cpu(), self.eos, self.max_new_tokens)


class _TooLarge(Exception):
    pass


_MIME = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG", "image/png"), (b"RIFF", "image/webp"))


class ChatCompletions(_Counted):
    """A client of an OpenAI-compatible chat-completions server, for images and for text."""

    def __init__(self, base_url: str, model: str, *, concurrency: int = 8, timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 0.5, max_tokens: int = 128, temperature: float = 0.0,
                 api_key_env: str | None = None, max_response_bytes: int = 2**20, model_id: str | None = None):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url {base_url!r}: expected http(s)://host[:port]/path")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.path = parts.path.rstrip("/") + "/chat/completions"
        self.model, self.concurrency, self.timeout_s = model, concurrency, timeout_s
        self.retries, self.backoff_s, self.max_tokens, self.temperature = retries, backoff_s, max_tokens, temperature
        self.api_key_env, self.max_response_bytes = api_key_env, max_response_bytes
        self.model_id = model_id or f"served:{model}"
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._lock = threading.Lock()

    def load(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="mm1-chat")

    def caption(self, images: list[bytes], prompt: str) -> list[Generated]:
        def content(data: bytes) -> list[dict[str, Any]]:
            mime = next((m for magic, m in _MIME if data.startswith(magic)), "application/octet-stream")
            url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
            return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]

        return self._all([content(d) for d in images])

    def complete(self, prompts: list[str]) -> list[Generated]:
        return self._all(list(prompts))

    def _all(self, contents: list[Any]) -> list[Generated]:
        self.load()
        assert self._pool is not None
        return list(self._pool.map(self._ask, contents))

    # one request, with retries ---------------------------------------------------------------

    def _ask(self, content: Any) -> Generated:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "max_tokens": self.max_tokens, "temperature": self.temperature}).encode()
        last = Generated(error=CONNECTION_ERROR, detail="not attempted")
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
            last, retry = self._once(body)
            if not retry:
                break
        with self._lock:
            self.items += 1
        return last

    def _connection(self, fresh: bool) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = cls(self.host, self.port, timeout=self.timeout_s)
            self._local.conn = conn
        return conn

    def _once(self, body: bytes) -> tuple[Generated, bool]:
        """(result, worth retrying)."""
        deadline = time.monotonic() + self.timeout_s
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env and os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        with self._lock:
            self.calls += 1
        conn = self._connection(fresh=False)
        reused = conn.sock is not None
        try:
            try:
                conn.request("POST", self.path, body=body, headers=headers)
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if not reused:
                    raise
                # a kept-alive connection the server had closed meanwhile: once more on a new one
                with self._lock:
                    self.calls += 1
                conn = self._connection(fresh=True)
                conn.request("POST", self.path, body=body, headers=headers)
                resp = conn.getresponse()
            data = self._read(conn, resp, deadline)
        except _TooLarge as exc:
            self._connection(fresh=True)
            return Generated(error=BAD_RESPONSE, detail=str(exc)), False
        except (socket.timeout, TimeoutError) as exc:
            self._connection(fresh=True)
            return Generated(error=TIMEOUT, detail=f"no answer within {self.timeout_s}s ({exc})"), True
        except (OSError, http.client.HTTPException) as exc:
            self._connection(fresh=True)
            return Generated(error=CONNECTION_ERROR, detail=f"{type(exc).__name__}: {exc}"[:300]), True
        if resp.status != 200:
            code = f"http_{resp.status}"
            return Generated(error=code, detail=data[:200].decode("utf-8", "replace")), \
                resp.status == 429 or resp.status >= 500
        try:
            choice = json.loads(data)["choices"][0]
            message = choice["message"]["content"]
            if isinstance(message, list):  # content parts
                message = "".join(p.get("text", "") for p in message if isinstance(p, dict))
            if not isinstance(message, str):
                raise TypeError(f"content is a {type(message).__name__}")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            return Generated(error=BAD_RESPONSE, detail=f"{type(exc).__name__}: {exc}"[:300]), True
        return Generated(text=message, truncated=choice.get("finish_reason") == "length"), False

    def _read(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, deadline: float) -> bytes:
        """The body within the deadline (a server dripping bytes cannot stretch it) and the cap."""
        chunks, size = [], 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("total deadline passed while reading")
            if conn.sock is not None:
                conn.sock.settimeout(left)
            chunk = resp.read1(65536)
            size += len(chunk)
            if size > self.max_response_bytes:
                raise _TooLarge(f"response over {self.max_response_bytes} bytes")
            chunks.append(chunk)
            if not chunk or resp.length == 0:  # read1 leaves a finished response open: close it
                resp.close()  # (the connection stays for the next request)
                return b"".join(chunks)
