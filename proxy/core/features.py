"""Pure: the facts about a chat request that routing rules (and budgets) look at.

Extracted once per request from the already-parsed body; nothing here does IO.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# A rough but stable estimate (OpenAI's rule of thumb: ~4 characters a token)
# that needs no tokenizer on the hot path. Used for rules and worst-case
# reservations, never for billing.
CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    task: str | None = None
    has_tools: bool = False
    has_images: bool = False
    json_mode: bool = False
    stream: bool = False
    prompt_tokens: int = 0
    last_user_text: str = ""
    max_tokens: int | None = None


def extract_features(body: Mapping[str, Any], headers: Mapping[str, str]) -> RequestFeatures:
    messages = body.get("messages") or ()
    chars = 0
    has_images = False
    last_user_text = ""
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        text, images = _content_text(content)
        chars += len(text)
        has_images = has_images or images
        if message.get("role") == "user":
            last_user_text = text
        tool_calls = message.get("tool_calls")
        if tool_calls:
            chars += len(str(tool_calls))
    tools = body.get("tools") or body.get("functions")
    if tools:
        chars += len(str(tools))
    response_format = body.get("response_format")
    json_mode = isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")
    metadata = body.get("metadata")
    task = headers.get("X-Task-Type") or (metadata.get("task") if isinstance(metadata, dict) else None)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return RequestFeatures(
        task=task.strip().lower() if isinstance(task, str) and task.strip() else None,
        has_tools=bool(tools),
        has_images=has_images,
        json_mode=json_mode,
        stream=body.get("stream") is True,
        prompt_tokens=chars // CHARS_PER_TOKEN + MESSAGE_OVERHEAD_TOKENS * len(messages),
        last_user_text=last_user_text,
        max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None,
    )


def _content_text(content: Any) -> tuple[str, bool]:
    """The text of a message's content and whether it carries an image."""
    if isinstance(content, str):
        return content, False
    if not isinstance(content, list):
        return "", False
    parts: list[str] = []
    images = False
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind in ("image_url", "input_image", "image"):
            images = True
    return "\n".join(parts), images
