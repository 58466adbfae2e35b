"""An HTTPS JWKS endpoint for tests: slow or held on demand, counting its requests."""

from __future__ import annotations

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JwksServer:
    """Serves `doc` at /jwks.json over TLS (the test PKI's localhost certificate).

    Each answer waits `delay` seconds, and, with `hold=True`, until `release` is set
    (`stop()` sets it, so no handler thread outlives the test). `hits` counts requests.
    """

    def __init__(self, pki, doc: dict, delay: float = 0.0, hold: bool = False) -> None:
        self.doc = doc
        self.delay = delay
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.hits = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                with server._lock:
                    server.hits += 1
                server.release.wait(30)
                time.sleep(server.delay)
                body = json.dumps(server.doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(pki.cert_pem), str(pki.key_pem))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://localhost:{self.httpd.server_address[1]}/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def count(self) -> int:
        with self._lock:
            return self.hits

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    close = stop
