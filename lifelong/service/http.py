"""The HTTP endpoints ``/metrics``, ``/healthz`` (liveness) and ``/readyz`` (readiness), served on a thread."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

MAX_SCRAPES_PER_S = 20.0  # /metrics answers at most this often; more scrapers wait their turn, idle
EXPOSITION_S = 1.0  # a rendered /metrics body is served for this long (engine values refresh as often)


class HealthServer:
    """``/metrics``, ``/healthz`` (liveness: recent progress) and ``/readyz`` on a background thread; see
    ``exposition`` for how scrapes are paced."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        live: Callable[[], tuple[bool, dict[str, Any]]],
        ready: Callable[[], tuple[bool, dict[str, Any]]],
    ):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.startswith("/metrics"):
                    body, status, ctype = outer.exposition(), 200, CONTENT_TYPE_LATEST
                elif self.path.startswith("/healthz") or self.path.startswith("/readyz"):
                    ok, detail = (live if self.path.startswith("/healthz") else ready)()
                    body, status, ctype = json.dumps(detail).encode(), 200 if ok else 503, "application/json"
                else:
                    body, status, ctype = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.registry = registry
        self.scrape_lock = threading.Lock()
        self.next_scrape = self.fresh_until = 0.0
        self.body = b""
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="lifelong-http", daemon=True)

    def exposition(self) -> bytes:
        """The metrics text, rendered at most once per ``EXPOSITION_S``. Scrapes take turns, spaced by
        1 / ``MAX_SCRAPES_PER_S``: however many scrapers poll however fast, they cost the daemon a bounded share
        of its CPU and wait, idle, for their turn."""
        with self.scrape_lock:
            wait = self.next_scrape - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            now = time.monotonic()
            self.next_scrape = now + 1.0 / MAX_SCRAPES_PER_S
            if now >= self.fresh_until:
                self.body, self.fresh_until = generate_latest(self.registry), now + EXPOSITION_S
            return self.body

    def start(self) -> None:
        """Serve on a background thread."""
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
