"""The proxy's telemetry endpoint: `/metrics` for Prometheus and `/healthz` for the kubelet.

A small threaded WSGI server on its own daemon thread, so a slow scrape never blocks the
dispatcher and `close()` stops it deterministically (tests bind port 0 and read `.port`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

import structlog
from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

DEFAULT_PORT = 9400

HealthCheck = Callable[[], tuple[bool, str]]

_log = structlog.get_logger(__name__)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a hung scraper must not keep the proxy from exiting


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the logs; errors still reach stderr."""


class TelemetryServer:
    """Serves `registry` on /metrics and `health()` on /healthz until `close()`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        health: HealthCheck,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
    ) -> None:
        self._metrics_app = make_wsgi_app(registry)
        self._health = health
        self._server = make_server(
            host, port, self._app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="telemetry-http", daemon=True
        )
        self._thread.start()
        _log.info("telemetry listening", host=host, port=self.port)

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0)."""
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> TelemetryServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body: Iterable[bytes] = self._metrics_app(environ, start_response)
            return body
        if path == "/healthz":
            return self._healthz(start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found; try /metrics or /healthz\n"]

    def _healthz(self, start_response: StartResponse) -> Iterable[bytes]:
        try:
            ok, reason = self._health()
        except Exception as exc:
            # A crashing check is itself a failure to report, not a reason to drop the request.
            ok, reason = False, f"health check raised {type(exc).__name__}: {exc}"
        status = "200 OK" if ok else "503 Service Unavailable"
        text = "ok" if ok else reason
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [text.encode() + b"\n"]
