"""A real S3-compatible server on loopback, to try (and test) outputs on object storage here.

It runs moto's server mode (`pip install 'moto[server]'`, in the dev extra) as its own process,
bound to 127.0.0.1, and gives the environment that points boto3, s3fs and every process started
from it (Dask workers, torchrun ranks, DataLoader workers) at it:

    python -m tools.s3_server            # prints the environment, serves until Ctrl-C
    eval "$(python -m tools.s3_server --print-env)"   # (in another shell, while it runs)

The credentials are moto's dummies. AWS_EC2_METADATA_DISABLED keeps botocore from asking the
instance metadata address (169.254.169.254) for credentials: all traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
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
        from s3fs import S3FileSystem
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
        import boto3

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
