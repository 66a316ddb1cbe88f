"""What one client API (chat, Responses, Messages, embeddings, completions) needs from the proxy,
without IO: how its requests are checked and measured, how its answers report usage, how its
streams are read and ended, and what the upstream is sent.

One `Api` object per API, shared by every request; the HTTP layer (`proxy.http.api`) runs the
same pipeline for each: authenticate, read, route, admit, run the chain, relay or answer, settle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

import orjson

from proxy.core.body import JsonBody
from proxy.core.errors import InvalidRequest
from proxy.core.features import RequestFeatures
from proxy.core.record import RequestRecord, Usage

ErrorStyle = Literal["openai", "anthropic"]
ModelKind = Literal["chat", "embeddings"]
# Fields only OpenRouter understands; an OpenAI-style upstream rejects them with a 400, which would
# turn a fallback into a client error. `models` and `fallbacks` are OpenRouter's own fallback lists:
# the proxy runs the chain itself, so they are never stacked on it (dropped for every upstream).
# `session_id` is OpenRouter's sticky-routing key (a conversation stays on one provider, so its prompt
# cache stays warm); OpenAI refuses it as an unknown parameter.
OPENROUTER_ONLY_FIELDS = frozenset(("provider", "transforms", "route", "usage", "plugins", "session_id"))
FALLBACK_FIELDS = frozenset(("models", "fallbacks"))
# The header form of `session_id`, passed on by every API (OpenRouter prefers the body's when both come).
SESSION_HEADER = "x-session-id"
# OpenRouter's automatic prompt caching: a top-level `cache_control` puts the breakpoint on the last
# cacheable block. Anthropic-family models need it (others cache by themselves).
AUTO_CACHE_CONTROL: dict[str, str] = {"type": "ephemeral"}
ANTHROPIC_FAMILY = ("anthropic/",)


class Meter(Protocol):
    """Reads a stream's events into the request's record as they pass."""

    def see(self, data: bytes, now: float) -> dict[str, Any] | None:
        """Note one event's `data` (`now`: the monotonic time it arrived); return it parsed (None
        when it is not a JSON object)."""
        ...

    def forward(self, chunk: dict[str, Any] | None) -> bool:
        """Whether the event goes on to the client (a usage chunk the client did not ask for does not)."""
        ...


class Api:
    """The chat-completions-like defaults; each API overrides what differs."""

    name: str = "chat"  # the ledger's `api` column and the metrics' `api` label
    routes: tuple[str, ...] = ("/v1/chat/completions",)  # the proxy's own paths (also served under /api)
    path: str = "/chat/completions"  # appended to the upstream's base URL
    error_style: ErrorStyle = "openai"
    kinds: frozenset[str] = frozenset(("openrouter", "openai"))  # the upstream kinds that speak it
    model_kind: ModelKind = "chat"  # the virtual models that may serve it
    content_key: str = "choices"  # a 200 body without it but with `error` is a failure
    cacheable: bool = False  # the response cache applies
    done: bytes | None = b"data: [DONE]\n\n"  # what ends a stream to the client (None: nothing)
    streams: bool = True
    # Client request headers passed on to the upstream as they are (when the client sent them),
    # besides `x-session-id`, which every API passes on.
    forwarded_headers: tuple[str, ...] = ()
    # The API's body takes OpenRouter's top-level `cache_control` (`prompt_cache: auto` adds it).
    top_level_cache_control: bool = False

    def upstream_headers(self, headers: Mapping[str, str]) -> dict[str, str] | None:
        """The client's headers this API passes on (None: none, the common case)."""
        if not self.forwarded_headers:
            session = headers.get(SESSION_HEADER)
            return {SESSION_HEADER: session} if session else None
        names = (*self.forwarded_headers, SESSION_HEADER)
        found = {name: headers[name] for name in names if name in headers}
        return found or None

    def with_prompt_cache(self, body: Mapping[str, Any], model: str, kind: str) -> Mapping[str, Any] | None:
        """The body for `model` with OpenRouter's automatic prompt caching turned on, or None to send
        it as it is: only for Anthropic-family models on an OpenRouter upstream, and never over the
        client's own caching (a `cache_control` anywhere in the body: explicit breakpoints are the
        client's choice, and Anthropic allows only four)."""
        if not self.top_level_cache_control or kind != "openrouter" or not model.startswith(ANTHROPIC_FAMILY):
            return None
        if has_key(body, "cache_control"):
            return None
        return {**body, "cache_control": AUTO_CACHE_CONTROL}

    def check(self, body: dict[str, Any]) -> None:
        """Refuse a body this API cannot serve (InvalidRequest, naming the parameter)."""
        check_model(body)
        check_stream(body)

    def features(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> RequestFeatures:
        raise NotImplementedError

    def usage(self, payload: Mapping[str, Any]) -> Usage | None:
        return Usage.from_payload(payload.get("usage"))

    def meter(self, record: RequestRecord, started: float, body: Mapping[str, Any]) -> Meter:
        raise NotImplementedError

    def prepare(self, body: Mapping[str, Any], model: str, kind: str) -> bytes:
        """The request for an upstream of `kind`: the client's body with `model` rewritten."""
        dropped = FALLBACK_FIELDS if kind == "openrouter" else FALLBACK_FIELDS | OPENROUTER_ONLY_FIELDS
        if dropped.isdisjoint(body):  # the common case: the body as read, with its model
            if isinstance(body, JsonBody):  # reuses the JSON the prompt bound was measured by
                return body.with_model(model)
            return orjson.dumps({**body, "model": model})
        out = {k: v for k, v in body.items() if k not in dropped}
        out["model"] = model
        return orjson.dumps(out)

    def stream_error(self, message: str, code: str) -> bytes:
        """The API's in-stream error event (the SDKs raise on it)."""
        error = {"message": message, "type": "upstream_error", "param": None, "code": code}
        return b"data: " + orjson.dumps({"error": error}) + b"\n\n"

    def stream_error_after(self, meter: Meter, message: str, code: str) -> bytes:
        """The in-stream error event that follows what `meter` has read (for APIs whose events are
        numbered); by default `stream_error`, which needs nothing of it."""
        return self.stream_error(message, code)

    def authorization(self, headers: Mapping[str, str]) -> str | None:
        """The client's credentials as an `Authorization` header value."""
        return headers.get("Authorization")


def check_model(body: Mapping[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("You must provide a model parameter.", param="model", code="missing_required_parameter")
    if len(model) > 256 or not model.isprintable():
        raise InvalidRequest(
            "The model name must be at most 256 printable characters.", param="model", code="invalid_value"
        )


def check_stream(body: Mapping[str, Any]) -> None:
    if "stream" in body and not isinstance(body["stream"], bool) and body["stream"] is not None:
        raise InvalidRequest("'stream' must be a boolean.", param="stream", code="invalid_type")


def task_of(body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    """The routing task: the `X-Task-Type` header, else `metadata.task`; trimmed and lower-cased."""
    metadata = body.get("metadata")
    task = headers.get("X-Task-Type") or (metadata.get("task") if isinstance(metadata, dict) else None)
    return task.strip().lower() if isinstance(task, str) and task.strip() else None


def positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def has_key(node: Any, key: str, depth: int = 0) -> bool:
    """Whether `key` is a key of any object in this JSON value (bodies nest at most 64 levels)."""
    if isinstance(node, dict):
        if key in node:
            return True
        values: Any = node.values()
    elif isinstance(node, list):
        values = node
    else:
        return False
    return depth < 64 and any(isinstance(v, (dict, list)) and has_key(v, key, depth + 1) for v in values)
