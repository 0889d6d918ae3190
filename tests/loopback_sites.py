"""Real web servers on loopback for the download tests: HTTPS with a self-signed
certificate (for `localhost` and 127.0.0.1) that the client trusts through
SSL_CERT_FILE, or plain HTTP. Each site answers from a table of routes and notes
every path it was asked for."""

from __future__ import annotations

import http.server
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

Route = Callable[[http.server.BaseHTTPRequestHandler], None]


def make_cert(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


class Site:
    """One server on 127.0.0.1; `url(path)` names it as https://localhost:PORT (or http://)."""

    def __init__(self, cert_and_key: tuple[Path, Path] | None = None):
        self.routes: dict[str, Route] = {}
        self.hits: list[str] = []
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                site.hits.append(path)
                route = site.routes.get(path)
                if route is None:
                    self.send_error(404, "Not Found")
                else:
                    route(self)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if cert_and_key:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*cert_and_key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "localhost") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def file(body: bytes) -> Route:
    def route(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return route


def redirect(location: str, code: int = 302) -> Route:
    def route(handler):
        handler.send_response(code)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return route


def drip(size: int, every: float, in_headers: bool = False) -> Route:
    """`size` bytes, one every `every` seconds: in the body, or as a header line before it."""
    def route(handler):
        try:
            if in_headers:
                handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            else:
                handler.send_response(200)
                handler.send_header("Content-Length", str(size))
                handler.end_headers()
            for _ in range(size):
                handler.wfile.write(b"x")
                handler.wfile.flush()
                time.sleep(every)
            if in_headers:
                handler.wfile.write(b"\r\nContent-Length: 0\r\n\r\n")
        except OSError:
            pass  # the client gave up
    return route
