"""A small dashboard: one HTML page and a JSON endpoint it polls.

``serve_dashboard(source)`` starts a stdlib `ThreadingHTTPServer` in a daemon
thread on 127.0.0.1 (port 0: a free port) and returns a `DashboardServer`
(``.url``, ``.port``, ``.stop()``).  The source is a run directory (read from
the run store on every poll, so a run being written shows up live), an
object with a ``records`` list (a live `Coordinator`), or a callable returning
RoundRecords.

Routes: ``/`` the page (`dashboard_page.PAGE`: inline SVG charts drawn by
inline JavaScript, nothing fetched from elsewhere), ``/api/rounds`` the data
as JSON (``columns``, ``events``, ``versions``, ``run``), ``/healthz``.  The
stdlib server is enough here: one page, a handful of viewers, read-only.
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from ..ops.store import RunStore
from ..records import RoundRecord
from .dashboard_page import PAGE
from .series import columns, events, json_safe

Source = str | Path | Callable[[], Sequence[RoundRecord]] | Any


class _Feed:
    """Where the records come from, and what to say about the run."""

    def __init__(self, source: Source, poll_ms: int):
        self.poll_ms = int(poll_ms)
        self.store: RunStore | None = None
        self._records: Callable[[], Sequence[RoundRecord]]
        if isinstance(source, (str, Path)):
            self.store = RunStore.open(source)
            self._records = self.store.records
            self.label = self.store.run_id
        elif callable(source):
            self._records = source
            self.label = "live"
        elif hasattr(source, "records"):
            store = getattr(source, "store", None)
            self.label = getattr(store, "run_id", "") or "live"
            self._records = lambda: list(source.records)
            self._done = lambda: getattr(source, "round", 0) >= source.config.server.rounds if hasattr(source, "config") else False
        else:
            raise TypeError(f"dashboard source must be a run directory, a callable or an object with .records, got {type(source).__name__}")

    def snapshot(self) -> dict[str, Any]:
        records = list(self._records())
        run: dict[str, Any] = {"id": self.label, "status": "live", "poll_ms": self.poll_ms}
        if self.store is not None:
            info = self.store.info()
            run.update(status=info["status"], name=info.get("name"), created=str(info.get("created_at") or ""), rounds_done=info.get("rounds_done"))
        elif getattr(self, "_done", None) is not None and self._done():
            run["status"] = "finished"
        versions = [
            {"version": r.version, "round": r.round, "accuracy": r.accuracy, "loss": r.loss, "status": r.status}
            for r in records
            if r.status in ("ok", "rolled_back")
        ]
        if self.store is not None:  # the registry's tags (production, canary, rolled_back...)
            from ..ops import ModelRegistry

            tags = {v.version: v.tags for v in ModelRegistry(self.store).versions()}
            for v in versions:
                v["tags"] = ", ".join(tags.get(v["version"], [])) if v["status"] == "ok" else ""
        return json_safe({"run": run, "columns": columns(records), "events": events(records), "versions": versions})


class DashboardServer:
    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread):
        self.httpd, self.thread = httpd, thread
        self.host, self.port = httpd.server_address[0], int(httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> "DashboardServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _handler(feed: _Feed) -> type[BaseHTTPRequestHandler]:
    page = PAGE.encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        server_version = "fleetlearn-dashboard"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: a poll every second is not news
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            elif path == "/api/rounds":
                try:
                    body = json.dumps(feed.snapshot(), allow_nan=False).encode()
                except Exception as exc:  # a store being written or gone: say so, keep serving
                    self._send(HTTPStatus.SERVICE_UNAVAILABLE, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode(), "application/json")
                    return
                self._send(HTTPStatus.OK, body, "application/json")
            elif path == "/healthz":
                self._send(HTTPStatus.OK, b"ok\n", "text/plain")
            elif path == "/favicon.ico":
                self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

        do_HEAD = do_GET

    return Handler


def serve_dashboard(source: Source, host: str = "127.0.0.1", port: int = 0, poll_ms: int = 2000) -> DashboardServer:
    """Serve the dashboard of `source` (a run directory, a live Coordinator, or a
    callable returning RoundRecords) on host:port in a daemon thread."""
    feed = _Feed(source, poll_ms)
    httpd = ThreadingHTTPServer((host, int(port)), _handler(feed))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name="fleetlearn-dashboard", daemon=True)
    thread.start()
    return DashboardServer(httpd, thread)
