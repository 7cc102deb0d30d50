"""A real S3-compatible server on loopback, to try (and test) outputs on object storage here.

It runs moto's server mode (`pip install 'moto[server]'`, in the dev extra) as its own process,
bound to 127.0.0.1, and gives the environment that points boto3, s3fs and every process started
from it (Dask workers, torchrun ranks, DataLoader workers) at it:

    python -m tools.servers.s3            # prints the environment, serves until Ctrl-C
    eval "$(python -m tools.servers.s3 --print-env)"   # (in another shell, while it runs)

The credentials are moto's dummies. AWS_EC2_METADATA_DISABLED keeps botocore from asking the
instance metadata address (169.254.169.254) for credentials: all traffic stays on loopback.

`FlakyProxy` stands between a client and such a server and fails requests by rule (a 503, a
connection reset), to test what a reader does when the store misbehaves.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

START_TIMEOUT = 60.0  # seconds; moto starts in about two


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    """What boto3/s3fs read: the endpoint, dummy credentials, a region, no metadata lookups."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "mm1-test",
        "AWS_SECRET_ACCESS_KEY": "mm1-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def forget_clients() -> None:
    """Drop s3fs's cached filesystems: they keep the endpoint they were made with, and the
    environment's endpoint is not part of their cache key (a second server would be missed)."""
    try:
        from s3fs import S3FileSystem  # the s3 extra: optional (without it there is nothing to forget)
    except ImportError:
        return
    S3FileSystem.clear_instance_cache()


class S3Server:
    """moto's S3 server as a subprocess on 127.0.0.1 (stopped by `stop()` or on exit)."""

    def __init__(self, log: Path | None = None, port: int | None = None):
        self.port = port or _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        out = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env()},
        )
        if log:
            out.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto's server exited with {self.proc.returncode} (log: {log})")
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto's server did not answer on {self.endpoint} in {START_TIMEOUT:.0f}s")
                time.sleep(0.1)

    def env(self) -> dict[str, str]:
        return s3_env(self.endpoint)

    @contextlib.contextmanager
    def environment(self) -> Iterator[dict[str, str]]:
        """This process's environment pointed at the server (and restored afterwards)."""
        saved = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        forget_clients()
        try:
            yield self.env()
        finally:
            forget_clients()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def create_bucket(self, name: str | None = None) -> str:
        import boto3  # comes with moto (dev extra): optional, needed only to make a bucket

        name = name or f"mm1-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="mm1-test", aws_secret_access_key="mm1-test")
        client.create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------
# A store that fails on purpose
# ---------------------------------------------------------------------------------------------

NO_RETRIES = {"AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}  # botocore: one attempt a call


class _LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer's own asks socket.getfqdn: a name lookup that may leave the machine
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]


@dataclass
class Fault:
    """Fail the first `times` requests (None: every one) whose path matches `path` (a regular
    expression, searched; "" matches all), by `how`: "503" answers 503 ServiceUnavailable in S3's
    XML, "reset" closes the connection with a TCP reset before answering. Later matching requests
    are forwarded."""

    path: str = ""
    times: int | None = 1
    how: str = "503"

    def __post_init__(self) -> None:
        if self.how not in ("503", "reset"):
            raise ValueError(f"Fault.how {self.how!r}: expected '503' or 'reset'")


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream` (e.g. `S3Server.endpoint`) that fails
    requests by its `faults` (the first fault that matches a request and has failures left
    decides), and forwards every other request unchanged (headers, body, signature: the client
    signs for the proxy's address and moto does not check signatures).

    Point a client at `endpoint` (`env()` gives S3Server's environment for it). `requests` logs
    every request as (method, path, outcome): "503", "reset" or the upstream's status. One
    request per connection is forwarded upstream; request bodies must come with a Content-Length
    (what botocore sends). Runs in threads of this process; `stop()` ends it."""

    def __init__(self, upstream: str, *faults: Fault):
        target = urllib.parse.urlsplit(upstream)
        self.upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self.set_faults(*faults)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, *args) -> None:
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

        self.server = _LoopbackServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="flaky-proxy", daemon=True)
        self._thread.start()

    def set_faults(self, *faults: Fault) -> None:
        """Replace the rules (their counts start afresh) and clear `requests`."""
        with self._lock:
            self.faults = [(f, re.compile(f.path)) for f in faults]
            self._left = [f.times for f in faults]
            self.requests = []

    def env(self) -> dict[str, str]:
        return s3_env(self.endpoint)

    def _fault(self, path: str) -> Fault | None:
        with self._lock:
            for i, (fault, pattern) in enumerate(self.faults):
                if pattern.search(path) and (self._left[i] is None or self._left[i] > 0):
                    if self._left[i] is not None:
                        self._left[i] -= 1
                    return fault
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        fault = self._fault(urllib.parse.urlsplit(h.path).path)
        if fault is not None and fault.how == "reset":
            self.requests.append((h.command, h.path, "reset"))
            # SO_LINGER 0: close() sends RST, as a load balancer dropping the connection does
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            h.close_connection = True
            return
        if fault is not None:
            self.requests.append((h.command, h.path, "503"))
            payload = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
                       b"<Message>injected by FlakyProxy</Message></Error>")
            h.send_response(503)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("connection", "keep-alive")}
        upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            upstream.request(h.command, h.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
        finally:
            upstream.close()
        self.requests.append((h.command, h.path, str(response.status)))
        h.send_response_only(response.status, response.reason)
        hop = ("connection", "keep-alive", "transfer-encoding", "content-length")
        for k, v in response.getheaders():
            if k.lower() not in hop:
                h.send_header(k, v)
        # HEAD: the object's length, as upstream said; otherwise the body we send
        length = response.getheader("Content-Length", "0") if h.command == "HEAD" else str(len(payload))
        h.send_header("Content-Length", length)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--bucket", default="mm1", help="a bucket created at start")
    parser.add_argument("--print-env", action="store_true", help="print the environment for a server on --port and exit")
    args = parser.parse_args(argv)
    if args.print_env:
        print("\n".join(f"export {k}={v}" for k, v in s3_env(f"http://127.0.0.1:{args.port}").items()))
        return 0
    server = S3Server(port=args.port)
    server.create_bucket(args.bucket)
    print("\n".join(f"export {k}={v}" for k, v in server.env().items()))
    print(f"# serving s3://{args.bucket} on {server.endpoint}; Ctrl-C stops", flush=True)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
