"""POST /v1/chat/completions: OpenAI's chat completions, OpenRouter's main format."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from proxy.core.apis.base import Api, check_model, check_stream
from proxy.core.errors import InvalidRequest
from proxy.core.features import RequestFeatures, extract_features
from proxy.core.record import RequestRecord
from proxy.core.stream_meter import StreamMeter


class ChatApi(Api):
    name = "chat"
    path = "/chat/completions"
    cacheable = True
    top_level_cache_control = True  # OpenRouter's chat completions take it (automatic prompt caching)

    def check(self, body: dict[str, Any]) -> None:
        check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest(
                "'messages' must be a non-empty array of messages.",
                param="messages",
                code="missing_required_parameter" if messages is None else "invalid_type",
            )
        check_stream(body)

    def features(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> RequestFeatures:
        return extract_features(body, headers)

    def meter(self, record: RequestRecord, started: float, body: Mapping[str, Any]) -> StreamMeter:
        return StreamMeter(record, started, include_usage=wants_usage(body))

    def prepare(self, body: Mapping[str, Any], model: str, kind: str) -> bytes:
        if kind == "openrouter" or body.get("stream") is not True:
            return super().prepare(body, model, kind)
        # An OpenAI-style upstream sends usage on a stream only when asked, and an unbilled stream
        # is money lost: always ask. A client that did not ask never sees it (`StreamMeter.forward`).
        out = orjson.loads(super().prepare(body, model, kind))
        options = out.get("stream_options")
        out["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return orjson.dumps(out)


def wants_usage(body: Mapping[str, Any]) -> bool:
    """The client asked for the usage chunk (`stream_options.include_usage: true`)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
