"""The OpenAI-compatible client for one upstream: one place where aiohttp's
exceptions and the upstream's error bodies become `Failure`s, and where a
stream's network reads are handed to the (pure) SSE decoder.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

from proxy.config import Upstream
from proxy.core.failures import Failure, classify_status, connection_failure, dropped_failure, timeout_failure
from proxy.core.sse import Batch, EventTooLarge, SseDecoder

MAX_ERROR_BODY = 64 * 1024
MAX_EVENT_BYTES = 8 * 1024 * 1024
UPSTREAM_CONNECTIONS = 1000


# (upstream name, model, HTTP status, response headers): told of every upstream response.
Observer = Callable[[str, str, int, Mapping[str, str]], None]


class UpstreamError(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class UpstreamClient:
    """One upstream, with its own session: default headers and timeout are set once there,
    so a request merges nothing and builds no timer objects of its own."""

    def __init__(
        self,
        name: str,
        config: Upstream,
        api_key: str | None,
        *,
        observe: Observer | None = None,
        connector: aiohttp.BaseConnector | None = None,
    ) -> None:
        self.name = name
        self.kind = config.kind_for(name)
        self.api_key = api_key
        self.key_env = config.api_key_env
        self.base_url = config.base_url
        headers = {"Content-Type": "application/json", **config.headers}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._session = aiohttp.ClientSession(
            connector=connector
            or aiohttp.TCPConnector(limit=UPSTREAM_CONNECTIONS, ttl_dns_cache=300, keepalive_timeout=60),
            # sock_connect, not connect: armed only when a new connection is opened, not per pooled request.
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=config.timeout_s, sock_connect=config.connect_timeout_s),
        )
        # Told of every response's status and headers (rate-limit tracking).
        self.observe = observe
        self._urls: dict[str, URL] = {}  # per API path, parsed once (aiohttp would parse a str per request)
        # A stream may run long; what must not happen is a silence longer than timeout_s.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout_s, sock_read=config.timeout_s
        )

    async def close(self) -> None:
        await self._session.close()

    async def key_info(self) -> dict[str, Any]:
        """OpenRouter's GET /key: the key's limit, what is left, and its usage."""
        async with self._session.get(self.base_url + "/key") as response:
            if response.status != 200:
                raise UpstreamError(
                    classify_status(response.status, error_object(await response.read()), response.headers)
                )
            payload = orjson.loads(await response.read())
        data = payload.get("data") if isinstance(payload, dict) else None
        return data if isinstance(data, dict) else {}

    async def generation(self, generation_id: str, timeout_s: float = 10.0) -> dict[str, Any] | None:
        """OpenRouter's GET /generation?id=: what it billed for one generation, or None while it
        does not know the id yet (404). Other failures raise UpstreamError."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self._session.get(
                self.base_url + "/generation", params={"id": generation_id}, timeout=timeout
            ) as response:
                raw = await response.read()
                if response.status == 404:
                    return None
                if response.status != 200:
                    raise UpstreamError(classify_status(response.status, error_object(raw), response.headers))
        except TimeoutError:
            raise UpstreamError(timeout_failure(f"looking up generation {generation_id}")) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(connection_failure(f"{type(exc).__name__}: {exc}")) from None
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError(dropped_failure("the generation lookup answered with invalid JSON")) from None
        return payload if isinstance(payload, dict) else None

    async def call(
        self, method: str, path: str, *, payload: bytes | None = None, params: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        """A JSON call to the upstream's own API (OpenRouter's `/batches`): the status and the parsed
        body (None when it is not JSON). Timeouts and connection failures raise UpstreamError."""
        try:
            async with self._session.request(method, self.base_url + path, data=payload, params=params) as response:
                raw = await response.read()
                status = response.status
        except TimeoutError:
            raise UpstreamError(timeout_failure(f"{method} {path} on upstream {self.name}")) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(connection_failure(f"{type(exc).__name__}: {exc}")) from None
        try:
            return status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return status, None

    async def post(
        self,
        payload: bytes,
        *,
        stream: bool,
        model: str,
        path: str = "/chat/completions",
        headers: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a request to `path` (under the base URL), with `headers` on top of the session's
        (the client headers an API forwards); return a 2xx response (the caller closes it) or raise
        UpstreamError."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + path)
        try:
            if stream:
                response = await self._session.post(url, data=payload, headers=headers, timeout=self._stream_timeout)
            else:
                response = await self._session.post(url, data=payload, headers=headers)
        except TimeoutError:
            raise UpstreamError(timeout_failure(f"connecting to upstream {self.name}")) from None
        except aiohttp.ClientConnectionError as exc:
            raise UpstreamError(connection_failure(f"{type(exc).__name__}: {exc}")) from None
        if self.observe is not None:
            self.observe(self.name, model, response.status, response.headers)
        if response.status < 300:
            return response
        try:
            raw = await response.content.read(MAX_ERROR_BODY)
        except (TimeoutError, aiohttp.ClientError):
            raw = b""
        finally:
            response.close()
        raise UpstreamError(classify_status(response.status, error_object(raw), response.headers))

    async def read_json(
        self, response: aiohttp.ClientResponse, content_key: str = "choices"
    ) -> tuple[bytes, dict[str, Any]]:
        """Read a non-streamed answer; an `error` in a 200 body without the answer's own content
        (`content_key`: `choices` for chat) counts as a failure too."""
        try:
            raw = await response.read()
        except TimeoutError:
            raise UpstreamError(timeout_failure(f"waiting for upstream {self.name}")) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(dropped_failure(f"{type(exc).__name__}: {exc}")) from None
        finally:
            response.release()
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError(dropped_failure("the upstream answered with invalid JSON")) from None
        if not isinstance(payload, dict):
            raise UpstreamError(dropped_failure("the upstream answered with a non-object JSON body"))
        error = payload.get("error")
        if error and not payload.get(content_key):
            status = error.get("code") if isinstance(error, dict) else None
            raise UpstreamError(
                classify_status(
                    status if isinstance(status, int) else 502,
                    error if isinstance(error, dict) else None,
                    response.headers,
                )
            )
        return raw, payload


def error_object(raw: bytes) -> dict[str, Any] | None:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw.decode("utf-8", "replace").strip()
        return {"message": text[:300]} if text else None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return error
    if isinstance(error, str):
        return {"message": error}
    return None


async def iter_batches(response: aiohttp.ClientResponse) -> AsyncIterator[Batch]:
    """Yield, per network read that completes any event, what `SseDecoder` makes of it: the whole
    events' bytes, untouched and ready to forward in one write, and the `data` of each. Stops after
    `data: [DONE]`.

    Forwarding per read rather than per event keeps one write per packet, not one per token, while
    every event still leaves as soon as it has arrived whole. Raises UpstreamError when the stream
    breaks (connection dropped, read timeout, an event over MAX_EVENT_BYTES).
    """
    content, decoder = response.content, SseDecoder(MAX_EVENT_BYTES)
    while (batch := await next_batch(content, decoder)) is not None:
        yield batch
        if batch.done:
            return


async def next_batch(content: aiohttp.StreamReader, decoder: SseDecoder) -> Batch | None:
    """The next read's batch that has anything to forward, or None once the stream has ended."""
    while True:
        batch = decode(decoder, await read_piece(content))
        if batch is None or batch.raw or batch.done:
            return batch


async def read_piece(content: aiohttp.StreamReader) -> bytes:
    """The next network read of a stream (empty: it ended); UpstreamError when the stream breaks."""
    try:
        return await content.readany()
    except TimeoutError:
        raise UpstreamError(timeout_failure("waiting for the next stream event")) from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(dropped_failure(f"stream broken: {type(exc).__name__}")) from None


def decode(decoder: SseDecoder, piece: bytes) -> Batch | None:
    """What a read completes (`raw` may be empty), or None at the stream's end (`piece` empty).
    UpstreamError when it ended in the middle of an event, or an event is over the limit."""
    if not piece:
        if decoder.pending:  # EOF in the middle of an event: the connection was cut
            raise UpstreamError(dropped_failure("the upstream closed the stream mid-event"))
        return None
    try:
        return decoder.feed(piece)
    except EventTooLarge as exc:
        raise UpstreamError(dropped_failure(str(exc))) from None


@dataclass(slots=True)
class OpenedStream:
    """A stream that answered, with its first network read already taken."""

    response: aiohttp.ClientResponse
    first: Batch | None  # None: the stream ended before sending anything
    decoder: SseDecoder  # has cut the reads so far, and cuts the next ones (`read_piece`, `decode`)


async def open_stream(
    client: UpstreamClient,
    payload: bytes,
    model: str,
    path: str = "/chat/completions",
    headers: Mapping[str, str] | None = None,
) -> OpenedStream:
    """Send a streamed request and take its first read. Read here, in the task that opened it:
    aiohttp raises a dropped connection ahead of the bytes still buffered, so a stream handed to
    another task before its first read could lose the text that did arrive. A stream that breaks
    before its first byte fails like any attempt (and the chain falls back)."""
    response = await client.post(payload, stream=True, model=model, path=path, headers=headers)
    decoder = SseDecoder(MAX_EVENT_BYTES)
    try:
        first = await next_batch(response.content, decoder)
    except BaseException:
        response.close()
        raise
    return OpenedStream(response, first, decoder)
