"""`html_extract`: a doc's raw page -> its segments, parsed in sandboxed child processes.

Contract, for each live `doc` row:
- `html` not null: the page is extracted by `curate.html_segments.extract` (see its docstring for the
  rules) and the row gets `segments` (JSON, curate.documents' layout, images without an index
  yet), `title` and `html_lang` (the `<html lang>`); or the row is dropped:
  `too_large`      the page is over `max_html_bytes` (checked before anything parses it);
  `not_html`       a binary payload (image or archive signature, NUL bytes);
  `empty_document` no text and no image segment;
  `parse_timeout`  no result within `timeout_s` (the child is killed and replaced);
  `parse_error`    the parser failed, or the child died (memory limit, a crash: the exit status
                   is in the detail) and was replaced.
  `html` is cleared (null) on every row processed here, kept or dropped: the raw page never
  travels further than this stage.
- `html` null and `segments` present (OBELICS-style parquet sources): untouched.
- `html` null and no `segments`: `empty_document` ("no html and no segments").

Why a child process: HTML is hostile input and libxml2 is C. A page that makes the parser run
forever, allocate without bound, or crash must cost one row, never the Dask worker, which runs
many tasks on threads. Each child is a fresh interpreter (`python -m curate.html_segments`, started by
subprocess: exec, never fork, and it works from Dask's daemonic worker processes, where
multiprocessing refuses to start children) with RLIMIT_AS set to `max_memory_mb`; it answers
one page at a time over two pipes in JSON and raw bytes (nothing the child sends is unpickled).
A stage instance (one per worker process, cached by the task runner) owns `processes` slots;
each worker thread leases one slot for a page, so threads extract in parallel and a child is
started once and reused for every later page: a kill or a crash replaces only that child, and
the pages after it go on. Children are killed when the stage is garbage-collected or the
process exits (a weakref finalizer), and exit by themselves when their parent's pipe closes.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, field_validator

import curate
from curate.html_segments import EMPTY_DOCUMENT, PARSE_ERROR
from curate.stages.base import Drop, RowStage, StageConfig, register
from curate.units import parse_bytes

TOO_LARGE = "too_large"
PARSE_TIMEOUT = "parse_timeout"
START_TIMEOUT_S = 120.0  # a fresh interpreter importing lxml: seconds, even on a loaded machine


class HtmlExtractConfig(StageConfig):
    kind: Literal["html_extract"] = "html_extract"
    # Seconds one page may take in the child, from the moment it is handed over.
    timeout_s: float = Field(10.0, gt=0, le=3600)
    # Pages over this many bytes are dropped unparsed (`too_large`).
    max_html_bytes: int = Field(8 * 1024 * 1024, ge=1)
    # Address-space limit of each child (RLIMIT_AS): a page over it is `parse_error`.
    max_memory_mb: int = Field(1024, ge=64)
    # Child processes per stage instance (one per worker process): at most this many pages parse
    # at once; give it the worker's thread count. How to run, not what comes out: not hashed.
    processes: int = Field(2, ge=1, le=256, json_schema_extra={"execution_only": True})
    # Blocks between two images form one text segment ("\n\n"), OBELICS' layout; else one
    # segment per paragraph, the unit paragraph-level stages remove.
    merge_paragraphs: bool = False

    @field_validator("max_html_bytes", mode="before")
    @classmethod
    def _bytes(cls, v: Any) -> int:
        return parse_bytes(v)


class ChildStartError(RuntimeError):
    """A child could not start: an environment problem (the stage's, not a page's)."""


class _ChildGone(Exception):
    """The child died or its pipe broke; the message says how."""


def _exit_description(returncode: int | None) -> str:
    if returncode is None:
        return "no exit status"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class _Child:
    """One extraction child process and its two pipes."""

    def __init__(self, max_memory_mb: int):
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        env = dict(os.environ)
        root = str(Path(curate.__file__).resolve().parent.parent)  # the child imports curate from here too
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "curate.html_segments", str(request_read), str(reply_write), str(max_memory_mb)],
                pass_fds=(request_read, reply_write), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                env=env, close_fds=True,
            )
        finally:
            os.close(request_read)
            os.close(reply_write)
        self.requests = Connection(request_write, readable=False)
        self.replies = Connection(reply_read, writable=False)
        try:
            ready = self.replies.poll(START_TIMEOUT_S) and json.loads(self.replies.recv_bytes()).get("ready")
        except (EOFError, OSError, ValueError):
            ready = False
        if not ready:
            self.kill()
            raise ChildStartError(f"html_extract: the extraction child did not start "
                                  f"({_exit_description(self.proc.returncode)})")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # unkillable (D state): leave it to the OS
            pass
        for conn in (self.requests, self.replies):
            try:
                conn.close()
            except OSError:
                pass

    def exit_info(self) -> str:
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "pipe closed, still running"
        return _exit_description(self.proc.returncode)

    def send(self, header: dict[str, Any], page: bytes) -> None:
        try:
            self.requests.send_bytes(json.dumps(header).encode())
            self.requests.send_bytes(page)
        except OSError as exc:
            raise _ChildGone(f"{type(exc).__name__} writing to it, {self.exit_info()}") from exc

    def receive(self, deadline: float) -> bytes | None:
        """The next message, or None when `deadline` (time.monotonic) passes first."""
        if not self.replies.poll(max(0.0, deadline - time.monotonic())):
            return None
        try:
            return self.replies.recv_bytes()
        except (EOFError, OSError) as exc:
            raise _ChildGone(self.exit_info()) from exc


class _Slot:
    """A place for one child in the pool; the child starts on first use and after a kill."""

    def __init__(self, max_memory_mb: int):
        self.max_memory_mb = max_memory_mb
        self.child: _Child | None = None

    def started(self) -> _Child:
        if self.child is not None and self.child.proc.poll() is not None:  # died while idle
            self.discard()
        if self.child is None:
            self.child = _Child(self.max_memory_mb)
        return self.child

    def discard(self) -> None:
        if self.child is not None:
            self.child.kill()
            self.child = None

    def extract(self, page: bytes, header: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """{"segments", "title", "lang", "encoding"} or {"reason", "detail"}; never raises for
        the page's sake (a child start failure does raise: that is no page's fault)."""
        child = self.started()
        try:
            try:
                child.send(header, page)
            except _ChildGone:  # died while idle (killed from outside): one fresh try
                self.discard()
                child = self.started()
                child.send(header, page)
            deadline = time.monotonic() + timeout_s
            first = child.receive(deadline)
            if first is None:
                self.discard()
                return {"reason": PARSE_TIMEOUT, "detail": f"no result within timeout_s {timeout_s:g}; child killed"}
            reply = json.loads(first)
            if "reason" in reply:
                if reply.pop("restart", False):
                    self.discard()
                return reply
            body = child.receive(deadline)
            if body is None:
                self.discard()
                return {"reason": PARSE_TIMEOUT, "detail": f"no result within timeout_s {timeout_s:g}; child killed"}
            reply["segments"] = body.decode("utf-8")
            return reply
        except _ChildGone as exc:
            self.discard()
            return {"reason": PARSE_ERROR, "detail": f"extraction child died ({exc}); replaced"}


class ExtractorPool:
    """`size` slots of extraction children, leased one page at a time; thread-safe."""

    def __init__(self, size: int, max_memory_mb: int):
        self.slots = [_Slot(max_memory_mb) for _ in range(size)]
        self._idle: queue.LifoQueue[_Slot] = queue.LifoQueue()  # LIFO: warm children first
        for slot in reversed(self.slots):
            self._idle.put(slot)
        self._closed = threading.Event()

    @contextmanager
    def lease(self) -> Iterator[_Slot]:
        if self._closed.is_set():
            raise RuntimeError("html_extract: the extraction pool is closed")
        slot = self._idle.get()
        try:
            yield slot
        finally:
            self._idle.put(slot)

    @staticmethod
    def close_slots(slots: list[_Slot]) -> None:
        for slot in slots:
            slot.discard()

    def close(self) -> None:
        self._closed.set()
        self.close_slots(self.slots)

    def pids(self) -> list[int]:
        """Process ids of the running children (for tests and diagnostics)."""
        return [s.child.proc.pid for s in self.slots if s.child is not None]


@register
class HtmlExtract(RowStage):
    """Raw page -> segments, title and language, in sandboxed children (see module docstring)."""

    name = "html_extract"
    Config = HtmlExtractConfig
    config: HtmlExtractConfig
    kinds: ClassVar[tuple[str, ...]] = ("doc",)
    output_columns: ClassVar[dict[str, pa.DataType]] = {"title": pa.string(), "html_lang": pa.string()}

    def setup(self) -> None:
        self.pool = ExtractorPool(self.config.processes, self.config.max_memory_mb)
        # Kill the children with the stage, or at interpreter exit; the finalizer holds the slots,
        # never the stage.
        self._finalizer = weakref.finalize(self, ExtractorPool.close_slots, self.pool.slots)
        with self.pool.lease() as slot:  # one child now: an environment that cannot start one fails the task
            slot.started()

    def close(self) -> None:
        """Stop the children now (they would stop with the stage or the process anyway)."""
        if self._ready:
            self.pool.close()
            self._finalizer()
            self._ready = False

    def process_row(self, row: dict[str, Any]) -> Drop | None:
        html = row.get("html")
        if html is None:
            return None if row.get("segments") else Drop(EMPTY_DOCUMENT, "no html and no segments")
        row["html"] = None
        limit = self.config.max_html_bytes
        if len(html) > limit:
            return Drop(TOO_LARGE, f"{len(html)} bytes > max_html_bytes {limit}")
        header = {"url": row.get("url"), "charset": row.get("charset"),
                  "merge_paragraphs": self.config.merge_paragraphs}
        with self.pool.lease() as slot:
            result = slot.extract(html, header, self.config.timeout_s)
        if "reason" in result:
            return Drop(result["reason"], result.get("detail") or "")
        row["segments"] = result["segments"]
        row["title"] = result.get("title")
        row["html_lang"] = result.get("lang")
        return None

    def process(self, table: pa.Table) -> pa.Table:
        out = super().process(table)
        if "html" in out.column_names:  # dropped-earlier rows too: the raw page goes no further
            index = out.column_names.index("html")
            out = out.set_column(index, out.schema.field(index), pa.nulls(len(out), out.schema.field(index).type))
        return out
