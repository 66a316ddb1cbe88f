"""POST /v1/messages: Anthropic's Messages API, as OpenRouter serves it at /api/v1/messages.

What differs from chat: the system prompt is a top-level field, content comes in typed blocks
(images may hide inside tool results), tools carry an `input_schema`, usage counts cached input
apart (`input_tokens` excludes `cache_read_input_tokens` and `cache_creation_input_tokens`), a
stream is typed events with no end marker, errors take Anthropic's shape, and clients may send
their key as `x-api-key`. Only OpenRouter upstreams speak it; the proxy never translates formats.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.core.apis.base import Api, check_model, check_stream, positive_int, task_of
from proxy.core.apis.messages_stream import MessagesMeter, messages_usage
from proxy.core.errors import InvalidRequest
from proxy.core.features import (
    CHARS_PER_TOKEN,
    IMAGE_PART_TYPES,
    IMAGE_TOKENS,
    IMAGE_TYPICAL_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    TOOL_OVERHEAD_TOKENS,
    RequestFeatures,
)
from proxy.core.record import RequestRecord, Usage

# Anthropic wraps any request with tools in a tool-use system prompt it bills as input: 530 tokens
# at most (Claude 3 Opus with tool_choice auto; 346 on the Claude 4 models), per its pricing page.
TOOL_SYSTEM_PROMPT_TOKENS = 600
# A document block (a PDF, or text) is counted by its bytes like text, plus one image's allowance
# for the page Anthropic renders: the base64 of a PDF is no bound on its pages (see the README).
DOCUMENT_TYPES = frozenset(("document",))


class MessagesApi(Api):
    name = "messages"
    routes = ("/v1/messages",)
    path = "/messages"
    error_style = "anthropic"
    kinds = frozenset(("openrouter",))  # an OpenAI-style upstream has no /messages: skipped
    content_key = "content"
    done = None  # a Messages stream ends with `message_stop`, then the connection closes
    forwarded_headers = ("anthropic-version", "anthropic-beta")

    def check(self, body: dict[str, Any]) -> None:
        check_model(body)
        check_messages(body)
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and positive_int(max_tokens) is None:
            raise InvalidRequest(
                "max_tokens: must be a whole number greater than or equal to 1.",
                param="max_tokens",
                code="invalid_type",
            )
        system = body.get("system")
        if system is not None and not isinstance(system, str | list):
            raise InvalidRequest(
                "system: must be a string or an array of text blocks.", param="system", code="invalid_type"
            )
        check_stream(body)

    def features(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> RequestFeatures:
        prompt = measure_prompt(body)
        tools = body.get("tools")
        return RequestFeatures(
            task=task_of(body, headers),
            has_tools=bool(tools),
            has_images=prompt.images > 0,
            json_mode=output_schema(body) is not None,
            stream=body.get("stream") is True,
            prompt_tokens=prompt.bound,
            last_user_text=prompt.last_user_text,
            max_tokens=positive_int(body.get("max_tokens")),
            prompt_estimate=prompt.estimate,
        )

    def usage(self, payload: Mapping[str, Any]) -> Usage | None:
        return messages_usage(payload.get("usage"))

    def meter(self, record: RequestRecord, started: float, body: Mapping[str, Any]) -> MessagesMeter:
        return MessagesMeter(record, started)

    def stream_error(self, message: str, code: str) -> bytes:
        """Anthropic's in-stream error event; its SDKs raise on `event: error` (a `data:` alone is skipped)."""
        return b"event: error\ndata: " + orjson.dumps(error_event("api_error", message)) + b"\n\n"

    def authorization(self, headers: Mapping[str, str]) -> str | None:
        """`Authorization: Bearer` as everywhere, else Anthropic's own `x-api-key` header (what the
        SDKs and Claude Code send for an API key)."""
        authorization = headers.get("Authorization")
        if authorization:
            return authorization
        key = headers.get("x-api-key")
        return f"Bearer {key}" if key else None


def check_messages(body: Mapping[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            "messages: must be a non-empty array of messages.",
            param="messages",
            code="missing_required_parameter" if messages is None else "invalid_type",
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            where = f"messages.{index}"
            raise InvalidRequest(f"{where}: must be an object.", param=where, code="invalid_type")


def error_event(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def output_schema(body: Mapping[str, Any]) -> Any:
    """The JSON schema of structured output (`output_config.format`, or the beta `output_format`), or None."""
    config = body.get("output_config")
    found = config.get("format") if isinstance(config, dict) else body.get("output_format")
    return found if isinstance(found, dict) and found.get("type") == "json_schema" else None


@dataclass(frozen=True, slots=True)
class MessagesPrompt:
    bound: int  # the most input tokens any tokenizer can make of it (`measure_prompt`)
    estimate: int  # four bytes a token, images at their typical size: bills a stream cut short
    images: int
    last_user_text: str


def measure_prompt(body: Mapping[str, Any]) -> MessagesPrompt:
    """The input's upper bound, by `proxy.core.features.prompt_token_bound`'s rules applied to
    the Messages format: a token per UTF-8 byte of the system prompt, messages and tools as JSON
    (image blocks left out: `IMAGE_TOKENS` each, wherever they sit, tool results included),
    `MESSAGE_OVERHEAD_TOKENS` per message and for the system prompt, `TOOL_OVERHEAD_TOKENS` per
    tool plus Anthropic's tool-use system prompt, the structured-output schema as JSON, and one
    image's allowance per document for its rendered page."""
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    images, documents, last_user_text = _walk(messages)
    if images:  # image data (base64 or a URL) is priced by the allowance, not by its bytes
        text = len(orjson.dumps([_without_images(message) for message in messages]))
    else:
        text = len(orjson.dumps(messages))  # the common case: one serialisation, no copy
    system = body.get("system")
    bound = MESSAGE_OVERHEAD_TOKENS * len(messages)
    if system:
        text += len(orjson.dumps(system))
        bound += MESSAGE_OVERHEAD_TOKENS
    tools = body.get("tools")
    if tools:
        text += len(orjson.dumps(tools))
        bound += TOOL_SYSTEM_PROMPT_TOKENS + TOOL_OVERHEAD_TOKENS * (len(tools) if isinstance(tools, list) else 1)
    schema = output_schema(body)
    if schema is not None:
        bound += len(orjson.dumps(schema))
    bound += text + IMAGE_TOKENS * (images + documents)
    estimate = -(-text // CHARS_PER_TOKEN) + IMAGE_TYPICAL_TOKENS * images
    return MessagesPrompt(bound, estimate, images, last_user_text)


def _walk(messages: Sequence[Any]) -> tuple[int, int, str]:
    """Image blocks, document blocks, and the text of the last user message that has any."""
    images = documents = 0
    last_user_text = ""
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            if message.get("role") == "user":
                last_user_text = content
            continue
        if not isinstance(content, list):
            continue
        texts: list[str] = []
        for block in content:
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind in IMAGE_PART_TYPES:
                images += 1
            elif kind in DOCUMENT_TYPES:
                documents += 1
            elif kind == "tool_result" and isinstance(block.get("content"), list):
                images += sum(1 for part in block["content"] if _is_image(part))
        if texts and message.get("role") == "user":
            last_user_text = "\n".join(texts)
    return images, documents, last_user_text


def _is_image(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") in IMAGE_PART_TYPES


def _without_images(message: Any) -> Any:
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    kept = []
    for block in message["content"]:
        if _is_image(block):
            continue
        if isinstance(block, dict) and block.get("type") == "tool_result" and isinstance(block.get("content"), list):
            block = {**block, "content": [part for part in block["content"] if not _is_image(part)]}
        kept.append(block)
    return {**message, "content": kept}
