"""Pure: the facts about a chat request that routing rules (and budgets) look at.

Extracted once per request from the already-parsed body; nothing here does IO.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.core.body import JsonBody

# Bills a stream cut before its usage came (never reservations or rules, which use
# `prompt_token_bound`): OpenAI's rule of thumb of about four bytes a token, for the prompt as sent
# and the text seen.
CHARS_PER_TOKEN = 4
# The prompt bound's allowances (see `prompt_token_bound`).
MESSAGE_OVERHEAD_TOKENS = 4  # the chat template's role markers and separators around each message
TOOL_OVERHEAD_TOKENS = 16  # the template wrapping each tool definition
# The most any provider charges for one image part: OpenAI's patch-based models cap an image at
# 1,536 patches times a 1.62 multiplier (2,489 tokens), its tiled ones at 1,445, Anthropic at
# about 1,600, Gemini at 258 a tile. Images are not read here (a data URL would be megabytes).
IMAGE_TOKENS = 2_500
# What an image typically costs (OpenAI's 1024x1024 in high detail: 85 + 4 tiles x 170): the
# estimate a stream cut short is billed with, never what is reserved.
IMAGE_TYPICAL_TOKENS = 765
IMAGE_PART_TYPES = frozenset(("image_url", "input_image", "image"))


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    task: str | None = None
    has_tools: bool = False
    has_images: bool = False
    json_mode: bool = False
    stream: bool = False
    prompt_tokens: int = 0  # an upper bound: `prompt_token_bound`
    last_user_text: str = ""
    max_tokens: int | None = None
    prompt_estimate: int = 0  # a typical count (`PromptSize.estimate`): bills a stream cut before its usage
    kind: str = "chat"  # the kind of virtual model that may serve it (`models.NAME.kind`): chat | embeddings


def extract_features(body: Mapping[str, Any], headers: Mapping[str, str]) -> RequestFeatures:
    messages = body.get("messages") or ()
    images = 0
    last_user_text = ""
    for message in messages:
        if not isinstance(message, dict):
            continue
        text, count = _content_text(message.get("content"))
        images += count
        if message.get("role") == "user":
            last_user_text = text
    tools = body.get("tools") or body.get("functions")
    response_format = body.get("response_format")
    json_mode = isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")
    metadata = body.get("metadata")
    task = headers.get("X-Task-Type") or (metadata.get("task") if isinstance(metadata, dict) else None)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    size = prompt_size(messages, tools, response_format, images=images, measured=_measured(body, images))
    return RequestFeatures(
        task=task.strip().lower() if isinstance(task, str) and task.strip() else None,
        has_tools=bool(tools),
        has_images=images > 0,
        json_mode=json_mode,
        stream=body.get("stream") is True,
        prompt_tokens=size.bound,
        last_user_text=last_user_text,
        max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None,
        prompt_estimate=size.estimate,
    )


def _measured(body: Mapping[str, Any], images: int) -> int | None:
    """The bytes of the messages and the tools as JSON, from the JSON a `JsonBody` keeps for the
    upstream body (None: `prompt_size` serialises them itself)."""
    if images or not isinstance(body, JsonBody) or not body.get("messages"):
        return None
    tools = "tools" if body.get("tools") else "functions" if body.get("functions") else None
    return len(body.json("messages")) + (len(body.json(tools)) if tools else 0)


@dataclass(frozen=True, slots=True)
class PromptSize:
    bound: int  # `prompt_token_bound`
    estimate: int  # four bytes a token of the same text, images at IMAGE_TYPICAL_TOKENS


def prompt_token_bound(
    messages: Sequence[Any], tools: Any = None, response_format: Any = None, *, images: int | None = None
) -> int:
    """The most prompt tokens a request can be billed for, by any real tokenizer: what budget
    reservations and routing rules (`prompt_tokens_over/under`) count.

    - Text: one token per UTF-8 byte of the messages as JSON, i.e. with control characters as
      their JSON escapes (`\\u0001` is 6 bytes), which is how the upstream receives them. The
      tokenizers of every hosted model are byte-level BPE (or SentencePiece with byte fallback):
      a token covers at least one byte, so no text has more tokens than bytes. CJK text (3 bytes
      a character) and emoji (4) are covered as surely as ASCII; the JSON keys and punctuation
      counted with the text more than cover the role names.
    - Images: `IMAGE_TOKENS` per image part, whatever its size (the URL or base64 is not counted).
    - `MESSAGE_OVERHEAD_TOKENS` per message and `TOOL_OVERHEAD_TOKENS` per tool, plus the tools
      and a `response_format` schema as JSON: providers put them in the prompt.

    `images`: the number of image parts, when the caller has counted them (None: count here).
    """
    return prompt_size(messages, tools, response_format, images=images).bound


def prompt_size(
    messages: Sequence[Any],
    tools: Any = None,
    response_format: Any = None,
    *,
    images: int | None = None,
    measured: int | None = None,
) -> PromptSize:
    """The prompt's upper bound (`prompt_token_bound`) and its typical size, from one measure:
    the bytes of its text as JSON (the messages without their image parts, and the tools).
    `measured`: that measure, when the caller has it (a request without images)."""
    if images is None:
        images = sum(_content_text(m.get("content"))[1] for m in messages if isinstance(m, dict))
    if measured is not None:
        text = measured
    elif images:  # the image parts are priced by the allowance, not by the bytes of their URLs
        text = len(orjson.dumps([_without_images(message) for message in messages]))
    else:
        text = len(orjson.dumps(messages))  # the common case: one serialisation, no walk
    if tools and measured is None:
        text += len(orjson.dumps(tools))
    bound = text + MESSAGE_OVERHEAD_TOKENS * len(messages) + IMAGE_TOKENS * images
    if tools:
        bound += TOOL_OVERHEAD_TOKENS * (len(tools) if isinstance(tools, list) else 1)
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        bound += len(orjson.dumps(response_format))
    estimate = -(-text // CHARS_PER_TOKEN) + IMAGE_TYPICAL_TOKENS * images
    return PromptSize(bound, estimate)


def _without_images(message: Any) -> Any:
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    kept = [part for part in message["content"] if not _is_image(part)]
    return {**message, "content": kept}


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES


def _content_text(content: Any) -> tuple[str, int]:
    """The text of a message's content and how many image parts it carries."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        return "", 0
    parts: list[str] = []
    images = 0
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind in IMAGE_PART_TYPES:
            images += 1
    return "\n".join(parts), images
