"""Limits of the embedded HTTP server that uvicorn does not give: a bound on the request head, a header-read timeout
and a connection cap.

The server speaks HTTP/1.1 through uvicorn's httptools protocol (llhttp, a C parser): per request it costs ~0.1 ms
less of the event loop than uvicorn's pure-Python h11 protocol (a 10,000-point /sample on 2 cores: ~3.2 -> ~3.1 ms,
a 16-point one ~0.95 -> ~0.86 ms, curl, one connection). It bounds nothing by itself; this subclass adds:

- `max_header_bytes`: request line + headers of one request; beyond it 431 and close (counted here as bytes
  arrive, before the parser buffers them, so a client cannot make the server buffer more);
- `header_timeout_s`: from connection (or the end of the previous response) to the end of the request head;
  beyond it 408 and close (a client dripping one byte every few seconds is cut off);
- `max_connections`: a connection beyond it gets a 503 at once and is closed (file descriptors stay available,
  the refusal is logged at most once per 10 s and counted in `swissroll_connections_refused_total`).

Header count (`max_headers`) is checked by `HeaderCountLimit`, an ASGI middleware, so it holds in-process too.
"""

import json
import logging
import time

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.metrics import Metrics

log = logging.getLogger("swissroll")


def error_body(detail: str) -> bytes:
    """The body every error of the service has (service/responses.py Error): {"detail": "..."}."""
    return json.dumps({"detail": detail}).encode()


def _error_response(status: int, reason: str, detail: str, extra: bytes = b"") -> bytes:
    data = error_body(detail)
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\nconnection: close\r\n".encode()
        + extra
        + b"\r\n"
        + data
    )


class _RateLimitedLog:
    """One warning per `every_s` for a repeated event, with how many happened since the last one."""

    def __init__(self, every_s: float = 10.0):
        self.every_s, self.last, self.count = every_s, float("-inf"), 0

    def __call__(self, message: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.every_s:
            log.warning(f"{message} ({self.count} since the last such warning)")
            self.last, self.count = now, 0


def limited_http_protocol(
    max_header_bytes: int, header_timeout_s: float, max_connections: int, metrics: Metrics | None = None
) -> type[HttpToolsProtocol]:
    """An HttpToolsProtocol class with these limits (uvicorn.Config(http=...) takes a class)."""
    refused_log, slow_log, large_log = _RateLimitedLog(), _RateLimitedLog(), _RateLimitedLog()

    def count(reason: str) -> None:
        if metrics is not None:
            metrics.connections_refused.labels(reason).inc()

    class LimitedHttpProtocol(HttpToolsProtocol):
        # Between requests and while a request's head arrives, every byte received counts against max_header_bytes
        # (the parser's callbacks only see whole header lines, after it has buffered them: too late for a bound).
        # A request's body does not count: from the end of its head to the end of its message.

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._awaiting_head, self._head_bytes, self._head_timer = True, 0, None
            self._head_too_large = False  # a 431 waiting for the response in flight (responses stay in order)
            if len(self.connections) > max_connections:
                count("max_connections")
                refused_log(f"connection refused: {max_connections} connections open (SWISSROLL_MAX_CONNECTIONS)")
                self._reject(503, "Service Unavailable", "too many connections; retry later", b"retry-after: 1\r\n")
                return
            self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _idle_or_reading_head(self) -> bool:
            # No request being answered (a pipelined one runs after the current response) and no complete head since.
            return self._awaiting_head and (self.cycle is None or self.cycle.response_complete)

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self._idle_or_reading_head() and not self.transport.is_closing():
                count("header_timeout")
                slow_log(f"connection closed: request head not received within {header_timeout_s:g} s")
                if self._head_bytes:
                    self._reject(408, "Request Timeout", "request headers not received in time")
                else:
                    self.transport.close()  # idle connection: nothing to answer

        def _reject(self, status: int, reason: str, detail: str, extra: bytes = b"") -> None:
            self._cancel_head_timer()
            self._unset_keepalive_if_required()
            if not self.transport.is_closing():
                self.transport.write(_error_response(status, reason, detail, extra))
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing() or self._head_too_large:
                return  # refused or timed out: drop whatever else arrives
            if self._awaiting_head:
                self._head_bytes += len(data)
                if self._head_bytes > max_header_bytes:
                    count("header_too_large")
                    large_log(
                        f"request refused: head larger than {max_header_bytes} bytes (SWISSROLL_MAX_HEADER_BYTES)"
                    )
                    self._head_too_large = True
                    self._reject_large_head_when_idle()
                    return
            super().data_received(data)

        def _reject_large_head_when_idle(self) -> None:
            # Behind a pipelined request still being answered, the 431 follows that response.
            if self._head_too_large and (self.cycle is None or self.cycle.response_complete):
                self._reject(431, "Request Header Fields Too Large", "request header fields too large")

        def on_headers_complete(self) -> None:
            self._awaiting_head = False
            self._cancel_head_timer()  # the head is complete: the request runs under its own deadline
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._awaiting_head, self._head_bytes = True, 0  # what follows is the next request's head

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._reject_large_head_when_idle()
            # The next request's head gets the same time (uvicorn's keep-alive is shorter), unless a pipelined request
            # started just now: its head is complete.
            if not self.transport.is_closing() and self.cycle.response_complete:
                self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

    return LimitedHttpProtocol


class HeaderCountLimit:
    """ASGI middleware: more than `max_headers` header fields is answered 431 before any route runs."""

    def __init__(self, app, max_headers: int):
        self.app, self.max_headers = app, max_headers

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and len(scope["headers"]) > self.max_headers:
            body = error_body(f"more than {self.max_headers} header fields")
            await send(
                {
                    "type": "http.response.start",
                    "status": 431,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(body)),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
