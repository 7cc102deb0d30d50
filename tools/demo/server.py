"""The demo's web: a real HTTP server on 127.0.0.1 serving real images, and a URL list that
points at it with the failures web data is full of.

Routes (all under `http://127.0.0.1:PORT/`):
    img/NAME            the files of the `www` folder
    status/CODE/NAME    answers HTTP CODE (a server error, a gone page)
    redirect/NAME       302 to img/NAME
Anything else is a 404.
"""

from __future__ import annotations

import http.server
import os
import socketserver
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote


class _Handler(http.server.BaseHTTPRequestHandler):
    www: Path
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet: the ledger tells what happened
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "text/plain", location: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if location:
            self.send_header("Location", location)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        parts = [unquote(p) for p in self.path.split("?")[0].strip("/").split("/")]
        if len(parts) == 2 and parts[0] == "img":
            path = self.www / parts[1]
            if "/" not in parts[1] and path.is_file():
                ctype = "image/jpeg" if path.suffix == ".jpg" else "image/" + path.suffix.lstrip(".")
                return self._send(200, path.read_bytes(), ctype)
        elif len(parts) == 3 and parts[0] == "status" and parts[1].isdigit():
            return self._send(int(parts[1]), f"status {parts[1]}\n".encode())
        elif len(parts) == 2 and parts[0] == "redirect":
            return self._send(302, location=f"/img/{parts[1]}")
        self._send(404, b"not found\n")


class LoopbackHTTPServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP server that never asks a name server anything: the stock `server_bind`
    calls `socket.getfqdn` on its address, a reverse lookup that may leave the machine."""

    daemon_threads = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that hung up (a byte cap, a deadline): nothing went wrong here
        super().handle_error(request, client_address)


PORT_ENV = "MM1_DEMO_PORT"  # pin the port (reproducing a demo byte for byte: the port is in the crawl)


@contextmanager
def serve(www: Path) -> Iterator[str]:
    """Serve `www` on 127.0.0.1 in a thread; yields the base URL. The port is a free one, or
    $MM1_DEMO_PORT: the URLs (and so the WARC's bytes and the doc ids' offsets) contain it, so two
    demos compare byte for byte only on the same port."""
    handler = type("DemoHandler", (_Handler,), {"www": Path(www)})
    server = LoopbackHTTPServer(("127.0.0.1", int(os.environ.get(PORT_ENV, "0"))), handler)
    thread = threading.Thread(target=server.serve_forever, name="demo-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
