"""Pure construction of OpenRouter chat-completion replies.

Request body + model info in, reply plan and response JSON out (the SSE
frames of a streamed reply are in `frames`).
Deterministic: the same request yields the same text and token counts; the
generation id and timestamp are passed in by the caller.  Nothing here does
IO, so the emulator's wire format can be tested without a socket.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .billing import Charge, Prices, prompt_tokens, text_tokens

ECHO_WORDS = 16  # how much of the last user message the reply echoes
WORDS_PER_CHUNK = 3  # streamed content is split into chunks of a few words
# A request field only the emulator reads (benchmarks of long streams): the reply is that many
# content chunks long when streamed (WORDS_PER_CHUNK words each), and as long when not.
CHUNKS_FIELD = "emulator_chunks"
MAX_CHUNKS = 100_000
ARGUMENT_FRAGMENTS = 3  # tool-call arguments are streamed in this many parts

# The hosting provider OpenRouter reports, by the slug's vendor prefix.
_PROVIDERS = {
    "anthropic": "Anthropic",
    "openai": "OpenAI",
    "google": "Google AI Studio",
    "x-ai": "xAI",
    "deepseek": "DeepSeek",
    "mistralai": "Mistral",
    "meta-llama": "DeepInfra",
    "qwen": "DeepInfra",
}

# Providers' own stop reasons, which OpenRouter passes on as native_finish_reason.
_NATIVE_FINISH = {
    "Anthropic": {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"},
    "Google AI Studio": {"stop": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP"},
}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the emulator needs to know about one catalogue entry."""

    id: str
    prompt_price: float  # USD per token
    completion_price: float
    provider: str
    fingerprint: str
    cache_read_price: float | None = None
    cache_write_price: float | None = None
    embeddings: bool = False  # an embedding model (`output_modalities: ["embeddings"]`): /embeddings only

    @property
    def prices(self) -> Prices:
        return Prices(self.prompt_price, self.completion_price, self.cache_read_price, self.cache_write_price)

    def native_finish(self, finish_reason: str) -> str:
        return _NATIVE_FINISH.get(self.provider, {}).get(finish_reason, finish_reason)


def index_catalogue(catalogue: Mapping[str, Any]) -> dict[str, ModelInfo]:
    """Model id -> ModelInfo, parsed once so requests never touch the raw JSON."""
    index: dict[str, ModelInfo] = {}
    for entry in catalogue.get("data", []):
        model_id = entry["id"]
        pricing = entry.get("pricing", {})
        vendor = model_id.split("/", 1)[0] if "/" in model_id else "openai"
        index[model_id] = ModelInfo(
            id=model_id,
            prompt_price=float(pricing.get("prompt", 0) or 0),
            completion_price=float(pricing.get("completion", 0) or 0),
            provider=_PROVIDERS.get(vendor, vendor.title()),
            fingerprint=f"fp_{zlib.crc32(model_id.encode()):08x}",
            cache_read_price=_price(pricing.get("input_cache_read")),
            cache_write_price=_price(pricing.get("input_cache_write")),
            embeddings=is_embedding_model(entry),
        )
    return index


def is_embedding_model(entry: Mapping[str, Any]) -> bool:
    """OpenRouter marks embedding models by their output modality (and lists them at /embeddings/models)."""
    architecture = entry.get("architecture")
    outputs = architecture.get("output_modalities") if isinstance(architecture, dict) else None
    return isinstance(outputs, list) and "embeddings" in outputs


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON string, as OpenAI's wire format wants


@dataclass(frozen=True, slots=True)
class Reply:
    """The planned answer: either text content or one tool call."""

    content: str
    tool_call: ToolCall | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def estimate_tokens(text_length: int) -> int:
    """ceil(bytes / 4): the rule of thumb the emulator bills by (see `billing`)."""
    return text_tokens(text_length)


def plan_reply(body: Mapping[str, Any], model: ModelInfo, call_id: str) -> Reply:
    """Decide what the model "says" to this request."""
    messages = body["messages"]
    prompt = prompt_tokens(messages, body.get("tools") or body.get("functions"))
    echo = _echo(messages)
    tool = _chosen_tool(body)
    if tool is not None and _answers_a_tool_result(messages) and body.get("tool_choice") in (None, "auto"):
        # After a tool result a model answers in words (unless the request forces a call), so an
        # agent loop driven through the emulator ends.
        tool, echo = None, _tool_summary(messages[-1])
    if tool is not None:
        call = ToolCall(call_id, tool.get("name", "tool"), _arguments_for(tool.get("parameters")))
        size = len(call.name.encode()) + len(call.arguments.encode())
        return Reply("", call, "tool_calls", prompt, estimate_tokens(size))
    text = orjson.dumps({"model": model.id, "echo": echo}).decode() if _wants_json(body) else f"[{model.id}] {echo}"
    chunks = body.get(CHUNKS_FIELD)
    if isinstance(chunks, int) and not isinstance(chunks, bool) and 0 < chunks <= MAX_CHUNKS:
        text = " ".join(["word"] * (WORDS_PER_CHUNK * chunks))  # streamed as exactly `chunks` content chunks
    finish = "stop"
    limit = _max_tokens(body)
    if limit is not None and estimate_tokens(len(text.encode())) > limit:
        text, finish = text.encode()[: limit * 4].decode(errors="ignore"), "length"
    return Reply(text, None, finish, prompt, estimate_tokens(len(text.encode())))


def usage_of(reply: Reply, model: ModelInfo, cached: int = 0, written: int = 0) -> dict[str, Any]:
    """OpenRouter's usage object, with `cost` in USD from per-token prices; `cached`/`written`:
    prompt tokens read from / written to the prompt cache."""
    return usage_for(Charge(reply.prompt_tokens, reply.completion_tokens, cached, written), model)


def usage_for(charge: Charge, model: ModelInfo) -> dict[str, Any]:
    cost, prompt_cost, completion_cost = charge.cost(model.prices)
    details: dict[str, Any] = {"cached_tokens": charge.cached_tokens, "audio_tokens": 0}
    if model.cache_write_price is not None:
        details["cache_write_tokens"] = charge.cache_write_tokens
    return {
        "prompt_tokens": charge.prompt_tokens,
        "completion_tokens": charge.completion_tokens,
        "total_tokens": charge.prompt_tokens + charge.completion_tokens,
        "cost": cost,
        "is_byok": False,
        "prompt_tokens_details": details,
        "cost_details": {
            "upstream_inference_cost": cost,
            "upstream_inference_prompt_cost": prompt_cost,
            "upstream_inference_completions_cost": completion_cost,
        },
        "completion_tokens_details": {"reasoning_tokens": 0, "image_tokens": 0},
    }


def completion_body(reply: Reply, model: ModelInfo, gen_id: str, created: int, usage: dict[str, Any]) -> bytes:
    """The serialised non-streamed `chat.completion` response."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None, "reasoning": None}
    if reply.tool_call is not None:
        call = reply.tool_call
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "index": 0,
                "function": {"name": call.name, "arguments": call.arguments},
            }
        ]
    return orjson.dumps(
        {
            "id": gen_id,
            "provider": model.provider,
            "model": model.id,
            "object": "chat.completion",
            "created": created,
            "choices": [
                {
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                    "native_finish_reason": model.native_finish(reply.finish_reason),
                    "index": 0,
                    "message": message,
                }
            ],
            "system_fingerprint": model.fingerprint,
            "usage": usage,
        }
    )


def error_body(status: int | str, message: str, metadata: Mapping[str, Any] | None = None) -> bytes:
    """OpenRouter's error JSON: {"error": {"code", "message", "metadata"?}}."""
    error: dict[str, Any] = {"code": status, "message": message}
    if metadata is not None:
        error["metadata"] = metadata
    return orjson.dumps({"error": error})


def key_data(usage: float, limit: float | None) -> dict[str, Any]:
    """`data` of GET /api/v1/key for a key that has spent `usage` USD."""
    return {
        "label": "sk-or-v1-emu...lator",
        "limit": limit,
        "limit_remaining": None if limit is None else max(limit - usage, 0.0),
        "limit_reset": None,
        "include_byok_in_limit": False,
        "usage": usage,
        "usage_daily": usage,
        "usage_weekly": usage,
        "usage_monthly": usage,
        "byok_usage": 0.0,
        "byok_usage_daily": 0.0,
        "byok_usage_weekly": 0.0,
        "byok_usage_monthly": 0.0,
        "is_free_tier": False,
        "is_provisioning_key": False,
        "rate_limit": {"requests": -1, "interval": "10s"},
    }


def _price(value: Any) -> float | None:
    try:
        price = float(value)
    except (TypeError, ValueError):
        return None
    return price if price >= 0 else None


def split_words(text: str, per_chunk: int = WORDS_PER_CHUNK) -> list[str]:
    """Split into pieces of a few words whose concatenation is exactly `text`."""
    words = text.split(" ")
    last = len(words)
    return [
        " ".join(words[i : i + per_chunk]) + (" " if i + per_chunk < last else "") for i in range(0, last, per_chunk)
    ]


def split_even(text: str, parts: int) -> list[str]:
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _echo(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            words = _text_of(message.get("content")).split()
            if words:
                tail = " ..." if len(words) > ECHO_WORDS else ""
                return "You said: " + " ".join(words[:ECHO_WORDS]) + tail
    return "Hello! How can I help you today?"


def _answers_a_tool_result(messages: list[Any]) -> bool:
    last = messages[-1] if messages else None
    return isinstance(last, dict) and last.get("role") in ("tool", "function")


def _tool_summary(message: dict[str, Any]) -> str:
    words = _text_of(message.get("content")).split()
    tail = " ..." if len(words) > ECHO_WORDS else ""
    return "The tool said: " + " ".join(words[:ECHO_WORDS]) + tail if words else "The tool returned nothing."


def _chosen_tool(body: Mapping[str, Any]) -> dict[str, Any] | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    functions = [t.get("function", {}) for t in tools if isinstance(t, dict)]
    if isinstance(choice, dict):  # {"type": "function", "function": {"name": ...}}
        wanted = choice.get("function", {}).get("name")
        for function in functions:
            if function.get("name") == wanted:
                return function
    return functions[0] if functions else None


_PLACEHOLDERS: dict[str, Any] = {
    "string": "emulated",
    "integer": 1,
    "number": 1,
    "boolean": True,
    "array": [],
    "object": {},
}


def _arguments_for(parameters: Any) -> str:
    """Arguments naming each required parameter with a placeholder of its type."""
    if not isinstance(parameters, dict):
        return "{}"
    properties = parameters.get("properties") or {}
    arguments = {}
    for name in parameters.get("required") or []:
        kind = properties.get(name, {}).get("type", "string")
        arguments[name] = _PLACEHOLDERS.get(kind if isinstance(kind, str) else "string")
    return orjson.dumps(arguments).decode()


def _wants_json(body: Mapping[str, Any]) -> bool:
    response_format = body.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
