"""POST /v1/embeddings: OpenAI's embeddings, which OpenRouter serves at /api/v1/embeddings.

Only virtual models of kind `embeddings` (`models.NAME.kind`) serve it; the answer is never
streamed and has no completion: a request is priced, reserved and billed by its input alone
(OpenRouter's `usage.cost` when it gives one, else `usage.prompt_tokens` at the catalogue's price).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.core.apis.base import Api, check_model, task_of
from proxy.core.errors import InvalidRequest
from proxy.core.features import CHARS_PER_TOKEN, IMAGE_PART_TYPES, IMAGE_TOKENS, IMAGE_TYPICAL_TOKENS, RequestFeatures
from proxy.core.record import Usage


class EmbeddingsApi(Api):
    name = "embeddings"
    routes = ("/v1/embeddings",)
    path = "/embeddings"
    model_kind = "embeddings"
    content_key = "data"  # a 200 body with `error` and no `data` is a failure
    cacheable = False  # the response cache stores chat completions (see the README)
    done = None
    streams = False

    def check(self, body: dict[str, Any]) -> None:
        check_model(body)
        check_input(body.get("input"))
        if body.get("stream") is True:
            raise InvalidRequest("Embeddings are not streamed: remove 'stream'.", param="stream", code="invalid_value")
        dimensions = body.get("dimensions")
        if dimensions is not None and (not _is_int(dimensions) or dimensions < 1):
            raise InvalidRequest("'dimensions' must be a whole number >= 1.", param="dimensions", code="invalid_value")

    def features(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> RequestFeatures:
        size = input_size(body.get("input"))
        return RequestFeatures(
            task=task_of(body, headers),
            has_images=size.images > 0,
            prompt_tokens=size.bound,
            last_user_text=size.last_text,
            max_tokens=0,  # nothing is generated: the worst case is the input's
            prompt_estimate=size.estimate,
            kind=self.model_kind,
        )

    def usage(self, payload: Mapping[str, Any]) -> Usage | None:
        usage = Usage.from_payload(payload.get("usage"))
        if usage is not None:
            # An embedding has no completion; a figure an upstream puts there is not generated text.
            usage.completion_tokens = 0
        return usage


def check_input(value: Any) -> None:
    """OpenAI's shapes: a string, an array of strings, an array of token ids, an array of such arrays;
    and OpenRouter's array of multimodal objects (`{"content": [parts]}`). None of them empty."""
    if value is None:
        raise InvalidRequest("You must provide an 'input' parameter.", param="input", code="missing_required_parameter")
    if isinstance(value, str):
        if not value:
            raise InvalidRequest("'input' cannot be an empty string.", param="input", code="invalid_value")
        return
    if not isinstance(value, list) or not value:
        raise InvalidRequest(
            "'input' must be a non-empty string or a non-empty array (of strings, token ids, arrays of "
            "token ids, or objects with `content`).",
            param="input",
            code="invalid_type",
        )
    for index, item in enumerate(value):
        if isinstance(item, str) or _is_int(item) or isinstance(item, dict):
            continue
        if isinstance(item, list) and item and all(_is_int(token) for token in item):
            continue
        raise InvalidRequest(
            f"'input[{index}]' must be a string, a token id, a non-empty array of token ids or an object.",
            param=f"input[{index}]",
            code="invalid_type",
        )


@dataclass(frozen=True, slots=True)
class InputSize:
    bound: int  # an upper bound on the tokens of any tokenizer (see `prompt_token_bound`)
    estimate: int  # the typical count: four bytes a token, token ids as they are
    images: int = 0
    last_text: str = ""  # the last text input, for `last_user_message_matches` rules


def input_size(value: Any) -> InputSize:
    """The input's size by the prompt bound's rules: a token per UTF-8 byte of its text as JSON, a
    token id as one token, `IMAGE_TOKENS` per image part of a multimodal object."""
    if isinstance(value, str):
        size = len(orjson.dumps(value))
        return InputSize(size, -(-size // CHARS_PER_TOKEN), 0, value)
    if not isinstance(value, list):
        return InputSize(0, 0)
    if all(_is_int(item) for item in value):  # one array of token ids: exactly that many tokens
        return InputSize(len(value), len(value))
    text = tokens = images = 0
    last = ""
    for item in value:
        if isinstance(item, str):
            text += len(orjson.dumps(item))
            last = item
        elif isinstance(item, list):
            tokens += len(item)
        elif _is_int(item):
            tokens += 1
        elif isinstance(item, dict):
            kept, count = _without_images(item)
            images += count
            text += len(orjson.dumps(kept))
    bound = text + tokens + IMAGE_TOKENS * images
    estimate = -(-text // CHARS_PER_TOKEN) + tokens + IMAGE_TYPICAL_TOKENS * images
    return InputSize(bound, estimate, images, last)


def _without_images(item: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A multimodal input object without its image parts (their URLs are not text), and their count."""
    content = item.get("content")
    if not isinstance(content, list):
        return item, 0
    kept = [part for part in content if not (isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES)]
    return ({**item, "content": kept}, len(content) - len(kept)) if len(kept) != len(content) else (item, 0)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
