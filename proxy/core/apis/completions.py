"""POST /v1/completions: OpenAI's legacy text completions (a `prompt` in, `choices[].text` out),
which OpenRouter serves at /api/v1/completions with chat models.

The wire shape is chat's, with text where chat has messages and deltas: the same `[DONE]`, the same
final usage chunk with `"choices": []` (forwarded only to clients that asked for it with
`stream_options.include_usage`, so a naive `chunk.choices[0].text` loop runs clean), the same
in-stream error event. So it shares chat's stream meter and upstream body, not its checks or
features.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from proxy.core.apis.base import check_model, check_stream, positive_int, task_of
from proxy.core.apis.chat import ChatApi, wants_usage
from proxy.core.errors import InvalidRequest
from proxy.core.features import CHARS_PER_TOKEN, MESSAGE_OVERHEAD_TOKENS, RequestFeatures
from proxy.core.record import RequestRecord
from proxy.core.stream_meter import StreamMeter, text_bytes

# What a prompt grows by as the user message a chat model reads it as: the message's JSON around its
# text (`[{"role":"user","content":}]`, as chat's bound counts it) and the template's role markers.
PROMPT_AS_MESSAGE = len(b'[{"role":"user","content":}]') + MESSAGE_OVERHEAD_TOKENS


class CompletionsApi(ChatApi):
    name = "completions"
    routes = ("/v1/completions",)
    path = "/completions"
    # The response cache stores and replays chat completions; a text completion is not one.
    cacheable = False
    top_level_cache_control = False  # OpenRouter documents automatic caching for chat bodies only

    def check(self, body: dict[str, Any]) -> None:
        check_model(body)
        check_prompt(body.get("prompt"))
        check_stream(body)

    def features(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> RequestFeatures:
        prompt = body.get("prompt")
        text = len(orjson.dumps(prompt))
        suffix = body.get("suffix")
        if isinstance(suffix, str):
            text += len(orjson.dumps(suffix))
        return RequestFeatures(
            task=task_of(body, headers),
            stream=body.get("stream") is True,
            # A token per byte of the prompt as JSON, and of the chat message each prompt becomes on a
            # chat model (its JSON keys and template, as chat's bound counts them), bounds any tokenizer.
            prompt_tokens=text + PROMPT_AS_MESSAGE * len(prompts_of(prompt)),
            last_user_text=_last_text(prompt),
            max_tokens=completion_bound(body),
            # The emulator's count too, so a stream cut on an OpenAI upstream is billed as it bills.
            prompt_estimate=-(-text // CHARS_PER_TOKEN),
        )

    def meter(self, record: RequestRecord, started: float, body: Mapping[str, Any]) -> CompletionsMeter:
        return CompletionsMeter(record, started, include_usage=wants_usage(body))


def check_prompt(prompt: Any) -> None:
    """A string, an array of strings, an array of token ids or an array of such arrays."""
    if prompt is None:
        raise InvalidRequest(
            "You must provide a 'prompt' parameter.", param="prompt", code="missing_required_parameter"
        )
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt and all(_is_prompt_item(item) for item in prompt):
        return
    raise InvalidRequest(
        "'prompt' must be a string, or a non-empty array of strings, of token ids or of arrays of token ids.",
        param="prompt",
        code="invalid_type",
    )


def completion_bound(body: Mapping[str, Any]) -> int | None:
    """The most completion tokens the request can be billed for: `max_tokens` for each of `n`
    choices (or `best_of` candidates, generated and billed even when not returned) of each prompt
    of a batch. None when the client set no `max_tokens`: the model's own cap then decides."""
    limit = positive_int(body.get("max_tokens"))
    if limit is None:
        return None
    choices = max(positive_int(body.get("n")) or 1, positive_int(body.get("best_of")) or 1)
    return limit * choices * len(prompts_of(body.get("prompt")))


def prompts_of(prompt: Any) -> list[Any]:
    """The prompts of a request: an array of strings, or of token-id arrays, is a batch (a completion
    each); a string, or one array of token ids, is one prompt."""
    if isinstance(prompt, list) and prompt and not all(_is_int(item) for item in prompt):
        return prompt
    return [prompt]


class CompletionsMeter(StreamMeter):
    """Chat's meter (usage, generation id, errors, the usage chunk kept from clients that did not
    ask for it) reading generated text from `choices[].text`, where chat has deltas."""

    __slots__ = ()

    def see(self, data: bytes, now: float) -> dict[str, Any] | None:
        chunk = super().see(data, now)
        choices = chunk.get("choices") if chunk is not None else None
        if isinstance(choices, list):
            self._record.streamed_text_bytes += sum(
                utf8_len(choice["text"])
                for choice in choices
                if isinstance(choice, dict) and isinstance(choice.get("text"), str)
            )
        return chunk

    def _sole_text(self, chunk: dict[str, Any]) -> tuple[str, str] | None:
        choices = chunk.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            return None
        text = choices[0].get("text")
        return ("text", text) if isinstance(text, str) and not text_bytes(choices) else None


def utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())  # isascii() is O(1): ASCII is never encoded


def _is_prompt_item(item: Any) -> bool:
    if isinstance(item, str) or _is_int(item):
        return True
    return isinstance(item, list) and bool(item) and all(_is_int(token) for token in item)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _last_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    texts = [item for item in prompt if isinstance(item, str)] if isinstance(prompt, list) else []
    return texts[-1] if texts else ""
