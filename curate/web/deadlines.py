"""A request's total deadline, enforced on every socket operation and by a watchdog.

- `Clock`: a request's deadline; `remaining()` (the timeout for the next socket call) raises
  TimeoutError once it has passed; `postpone()` pushes it back by time that is not the request's
  own (waiting for a politeness slot).
- `Watchdog`: one daemon thread per fetcher that shuts down the socket of every request whose
  deadline passed, which wakes a thread blocked in recv/send at once, so a server dripping one
  byte at a time cannot stretch a request past its deadline. `arm(when)` gives a `Watch`,
  `watch(w, sock)` names the socket to shut, `release(w)` ends it.
- `DeadlineResponse`: an `http.client.HTTPResponse` whose every read first sets the socket's
  timeout to the request's remaining time.
"""

from __future__ import annotations

import heapq
import http.client
import io
import itertools
import socket
import threading
import time


class Clock:
    """A request's deadline. `remaining()` raises TimeoutError once it has passed."""

    def __init__(self, seconds: float):
        self.expires = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.expires - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def expired(self) -> bool:
        return time.monotonic() >= self.expires

    def postpone(self, seconds: float) -> None:
        """Push the deadline back by `seconds` (time that is not the request's own). A deadline
        that had passed before those seconds began stays passed."""
        self.expires += seconds


class Watch:
    """One request as the watchdog sees it: its deadline and the socket it is using now."""

    __slots__ = ("when", "sock", "fired", "done")

    def __init__(self, when: float):
        self.when, self.sock, self.fired, self.done = when, None, False, False


def _shut(sock: socket.socket) -> None:
    try:  # the C-level shutdown: on an SSLSocket, SSLSocket.shutdown would also drop its TLS state
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class Watchdog:
    """One daemon thread that shuts down the socket of every request whose deadline passed, which
    wakes a thread blocked in recv/send at once. Started on demand; exits after a minute idle."""

    IDLE_EXIT_S = 60.0

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, Watch]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False

    def arm(self, when: float) -> Watch:
        watch = Watch(when)
        with self._cv:
            heapq.heappush(self._heap, (when, next(self._seq), watch))
            if self._thread is None:
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="mm1-fetch-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is watch:  # the new earliest deadline: the thread must wait less
                self._cv.notify()
        return watch

    def watch(self, watch: Watch, sock: socket.socket | None) -> bool:
        """Make `sock` the one shut at the deadline (None: none). Returns whether it has passed."""
        with self._cv:
            watch.sock = sock
            if watch.fired and sock is not None:
                _shut(sock)
            return watch.fired

    def release(self, watch: Watch) -> None:
        with self._cv:
            watch.done, watch.sock = True, None

    def stop(self) -> None:
        with self._cv:
            self._stop, thread = True, self._thread
            self._cv.notify_all()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        with self._cv:
            idle_since: float | None = None
            while not self._stop:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                now = time.monotonic()
                if not self._heap:
                    idle_since = now if idle_since is None else idle_since
                    if now - idle_since >= self.IDLE_EXIT_S:
                        break
                    self._cv.wait(self.IDLE_EXIT_S)
                    continue
                idle_since = None
                when, _, watch = self._heap[0]
                if when > now:
                    self._cv.wait(when - now)
                    continue
                heapq.heappop(self._heap)
                watch.fired = True
                if watch.sock is not None:
                    _shut(watch.sock)
            self._thread = None


class _DeadlineReader(io.RawIOBase):
    """The response's raw stream: every recv first gets the request's remaining time as timeout."""

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, clock: Clock):
        self._raw, self._sock, self._clock = raw, sock, clock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int | None:  # type: ignore[override]
        self._sock.settimeout(self._clock.remaining())
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()  # the socket's makefile: releases its reference, not the socket
        super().close()


class DeadlineResponse(http.client.HTTPResponse):
    """A response whose reads (status line, headers, body) each get the clock's remaining time."""

    def __init__(self, sock: socket.socket, clock: Clock, **kwargs: object):
        super().__init__(sock, **kwargs)  # type: ignore[arg-type]
        self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, clock), 16 * 1024)
