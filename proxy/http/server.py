"""The connection layer under the app: limits that aiohttp does not have, and its protocol errors
answered in OpenAI's error JSON.

aiohttp reads a request's headers without a deadline and accepts every connection the kernel
hands it, so a client that opens many connections and sends its headers slowly holds file
descriptors until none are left for anyone else. `GuardedServer` makes each connection's
`GuardedHandler` (aiohttp's `RequestHandler` with three additions):

* a header deadline (`server.header_timeout_s`) from the connection's accept, or from the first
  byte of the next request on a kept-alive connection, to the end of the headers;
* a cap on open connections (`server.max_connections`, kept below the process's file limit): at
  the cap, a connection without a request in progress is closed for the new one (the oldest of
  those that never completed a request first, then the longest idle), so slow clients cannot lock
  a prompt one out, and a client whose kept-alive connection has served it keeps it; only when
  every connection is busy with a request does the new one get a 503;
* an optional cap per client address (`server.max_connections_per_client`): a 429 past it.

The limits come from the config snapshot serving when a connection opens, so a reload applies to
the next connection. aiohttp's parser errors (a bad request line, oversized headers, a broken
Content-Length) are answered in OpenAI's JSON and logged as one line at most every few seconds,
never as a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import secrets
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

from proxy.config import Server as Limits
from proxy.http.errors import SERVED

log = logging.getLogger("orproxy")
# File descriptors kept for everything but client connections: the ledger, the cache, logs, the
# listening socket. Each client connection may hold one upstream connection besides its own.
FD_RESERVE = 64
PROTOCOL_LOG_INTERVAL_S = 10.0


def connection_cap(configured: int, soft_limit: int | None = None) -> int:
    """`server.max_connections`, lowered to what the process's file limit can carry."""
    if soft_limit is None:
        soft_limit = raise_file_limit()
    return max(1, min(configured, (soft_limit - FD_RESERVE) // 2))


def raise_file_limit() -> int:
    """Lift the soft limit on open files to the hard one (what a server needs); return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class EveryFewSeconds:
    """One log line per interval at most; the lines held back are counted in the next one."""

    def __init__(self, interval_s: float, clock: Callable[[], float]) -> None:
        self._interval = interval_s
        self._clock = clock
        self._next = 0.0
        self._held = 0

    def __call__(self, message: str, *args: Any) -> None:
        now = self._clock()
        if now < self._next:
            self._held += 1
            return
        held, self._held, self._next = self._held, 0, now + self._interval
        suffix = f" ({held} more like it in the last {self._interval:g} s)" if held else ""
        log.warning(message + suffix, *args)


def error_bytes(status: int, message: str, code: str, request_id: str) -> tuple[bytes, dict[str, str]]:
    """OpenAI's error JSON and the headers every answer carries, for answers made outside the app."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    body = orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})
    headers = {
        "Content-Type": "application/json",
        "x-request-id": request_id,
        "x-proxy-attempts": "0",
        "x-proxy-route": f"-: {code}",
    }
    return body, headers


def _raw_answer(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 response, for a connection refused before any request was read."""
    body, headers = error_bytes(status, message, code, secrets.token_hex(16))
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers.items())]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "Retry-After: 1"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class GuardedServer(web.Server):
    """aiohttp's Server, making `GuardedHandler`s and keeping the books the limits need."""

    def __init__(self, handler: Any, *, limits: Callable[[], Limits], **kwargs: Any) -> None:
        kwargs.pop("keepalive_timeout", None)  # per connection, from the snapshot
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.soft_file_limit = raise_file_limit()
        self.live: set[GuardedHandler] = set()
        # Connections with no request in progress, oldest first: those that never completed a request
        # (closed first at the cap), and kept-alive ones between requests.
        self.fresh: dict[GuardedHandler, None] = {}
        self.waiting: dict[GuardedHandler, None] = {}
        self.per_peer: dict[str, int] = {}
        self.refused = 0
        self.evicted = 0
        self.protocol_errors = 0
        self.log_protocol_error = EveryFewSeconds(PROTOCOL_LOG_INTERVAL_S, self._loop.time)

    @classmethod
    def like(cls, plain: web.Server, limits: Callable[[], Limits]) -> GuardedServer:
        """The guarded twin of the Server aiohttp's runner built (same handler, factory and options)."""
        return cls(
            plain.request_handler,
            limits=limits,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )

    def __call__(self) -> RequestHandler:
        limits = self.limits()
        return GuardedHandler(self, loop=self._loop, keepalive_timeout=limits.keepalive_timeout_s, **self._kwargs)

    def admit(self, handler: GuardedHandler, peer: str, limits: Limits) -> bytes | None:
        """Count a new connection in, or return the answer that refuses it."""
        per_client = limits.max_connections_per_client
        if per_client is not None and self.per_peer.get(peer, 0) >= per_client:
            self.refused += 1
            return _raw_answer(
                429,
                "Too Many Requests",
                f"Too many connections from your address (server.max_connections_per_client is {per_client}); "
                "reuse connections or close idle ones.",
                "too_many_connections",
            )
        if len(self.live) >= connection_cap(limits.max_connections, self.soft_file_limit):
            if not self.fresh and not self.waiting:
                self.refused += 1
                return _raw_answer(
                    503,
                    "Service Unavailable",
                    "The proxy is at its connection limit (server.max_connections) with every connection "
                    "busy; retry shortly.",
                    "too_many_connections",
                )
            oldest = next(iter(self.fresh or self.waiting))
            self.evicted += 1
            oldest.drop()
        self.live.add(handler)
        self.fresh[handler] = None
        self.per_peer[peer] = self.per_peer.get(peer, 0) + 1
        return None

    def forget(self, handler: GuardedHandler, peer: str) -> None:
        if handler not in self.live:
            return
        self.live.discard(handler)
        self.fresh.pop(handler, None)
        self.waiting.pop(handler, None)
        left = self.per_peer.get(peer, 1) - 1
        if left > 0:
            self.per_peer[peer] = left
        else:
            self.per_peer.pop(peer, None)


class GuardedHandler(RequestHandler):
    """One client connection, with a header deadline; see the module's docstring."""

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._peer = ""
        self._header_timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._refused = False
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        limits = self._guard.limits()
        refusal = self._guard.admit(self, self._peer, limits)
        if refusal is not None:
            self._refused = True
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(refusal)
            transport.close()
            return
        super().connection_made(transport)
        self._arm(limits.header_timeout_s)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self._guard.forget(self, self._peer)
        if self._refused:
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and not self._busy and self._header_timer is None:
            self._arm(self._guard.limits().header_timeout_s)  # the first byte of the next request
        super().data_received(data)

    def close_after_response(self) -> None:
        """The request's body was abandoned (too slow, too large, broken): close the connection once
        the answer is out, instead of draining what is left of the body for up to lingering_time."""
        self._close_after = True

    def drop(self) -> None:
        """Closed to make room for a new connection (it had no request in progress)."""
        self._guard.forget(self, self._peer)
        self.force_close()

    def _arm(self, timeout_s: float) -> None:
        self._header_timer = self._loop.call_later(timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self._busy:
            self.force_close()

    async def _handle_request(
        self, request: BaseRequest, start_time: float | None, request_handler: Any
    ) -> tuple[web.StreamResponse, bool]:
        self._disarm()
        self._busy = True
        self._guard.fresh.pop(self, None)
        self._guard.waiting.pop(self, None)

        async def answered(request: BaseRequest) -> web.StreamResponse:
            # The router's own 404/405 (a request target that is not a path, such as CONNECT's
            # host:port, never reaches the catch-all route): in OpenAI's JSON too.
            expect = request.headers.get("Expect")
            if expect is not None and expect.lower() != "100-continue":
                # aiohttp's own answer would echo the value, and fails on one that is not UTF-8.
                body, headers = error_bytes(
                    417, "Only `Expect: 100-continue` is supported.", "expectation_failed", secrets.token_hex(16)
                )
                return web.Response(status=417, body=body, headers=headers)
            try:
                return await request_handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                body, headers = error_bytes(
                    exc.status, _router_message(request, exc), _code(exc), secrets.token_hex(16)
                )
                return web.Response(status=exc.status, body=body, headers=headers)

        try:
            answer = await super()._handle_request(request, start_time, answered)
            if self._close_after:
                self.force_close()  # the answer is written; the transport sends it before closing
            return answer
        finally:
            self._busy = False
            if self in self._guard.live:
                self._guard.waiting[self] = None  # idle again: the newest of the waiting

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp logs a body that broke while it drained it (bad gzip, a cut chunked encoding)
        as an "Unhandled exception" with a traceback: that is the client's doing, one short line."""
        exc = kw.get("exc_info")
        if isinstance(exc, RequestPayloadError | HttpProcessingError):
            self._guard.protocol_errors += 1
            self._guard.log_protocol_error("dropped a connection whose request body broke: %s", _one_line(exc))
            return
        super().log_exception(*args, **kw)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to what its parser refused (or to an exception no route caught), in
        OpenAI's JSON; a parser error is logged as one short line, rate-limited, not a traceback."""
        if status >= 500 and exc is not None and not isinstance(exc, TimeoutError):
            log.error("unexpected error while handling a request", exc_info=exc)
        else:
            self._guard.protocol_errors += 1
            reason = " ".join(str(message or exc or "").split())[:160]
            self._guard.log_protocol_error("refused a malformed request from %s: %s %s", request.remote, status, reason)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had already started; the connection is closed instead")
        text = {
            500: "The proxy hit an internal error; it has been logged.",
            504: "The proxy timed out handling the request.",
        }.get(status, f"The request is not valid HTTP: {' '.join(str(message or exc or '').split())[:200]}")
        code = {500: "internal_error", 504: "timeout"}.get(status, "bad_http_request")
        body, headers = error_bytes(status, text, code, secrets.token_hex(16))
        response = web.Response(status=status, body=body, headers=headers)
        response.force_close()
        return response


def _one_line(exc: BaseException) -> str:
    return " ".join(str(getattr(exc, "message", "") or exc).split())[:160]


def _router_message(request: BaseRequest, exc: web.HTTPException) -> str:
    return f"{exc.reason}: {request.method} {request.path[:200]}; this proxy serves {SERVED}."


def _code(exc: web.HTTPException) -> str:
    return exc.reason.lower().replace(" ", "_")
