"""A stand-in health port: answers every GET with 200 and ``{}`` (HAProxy's checks of
``/leader`` and ``/ready``), for a listener tested alone behind a real HAProxy."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class HealthStub:
    """``start()`` on 127.0.0.1 (a free port, :attr:`port`), ``stop()`` at the end."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.server = ThreadingHTTPServer((host, 0), _Ok)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> HealthStub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
