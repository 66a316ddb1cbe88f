"""The emulator's embeddings: POST /embeddings and GET /embeddings/models, in OpenRouter's shape
under `/api/v1` (a generation `id`, `provider`, `usage.cost`) and in OpenAI's under `/v1` (none of
those: `usage` has the token counts alone).

Vectors are deterministic (seeded by the model and the input), unit length, `dimensions` long when
asked (else the model's own size), and base64-encoded float32 when `encoding_format` is `base64`,
which the openai SDK asks for by default. Tokens are counted as the chat emulator counts text: a
token per four UTF-8 bytes of each input string; token-id inputs are their own count.
"""

from __future__ import annotations

import array
import asyncio
import base64
import math
import random
import zlib
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from .billing import IMAGE_PART_TYPES, IMAGE_TOKENS, Charge, text_tokens
from .completions import ModelInfo, is_embedding_model, usage_for
from .replies import accept, error_response, fault_response, json_response
from .state import EMULATOR_STATE, EmulatorState

DEFAULT_DIMENSIONS = 1024
# Each model's own vector size (OpenRouter does not list it); others get DEFAULT_DIMENSIONS.
DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "qwen3-embedding-8b": 4096}


def add_embedding_routes(router: web.UrlDispatcher, prefix: str) -> None:
    router.add_post(f"{prefix}/embeddings", embeddings)
    router.add_get(f"{prefix}/embeddings/models", embedding_models)


async def embedding_models(request: web.Request) -> web.Response:
    """OpenRouter's GET /embeddings/models: the catalogue's embedding models (its /models omits them)."""
    data = request.app[EMULATOR_STATE].catalogue.get("data", [])
    return json_response({"data": [entry for entry in data if is_embedding_model(entry)]})


async def embeddings(request: web.Request) -> web.Response:
    accepted = await accept(request, _validate)
    if isinstance(accepted, web.Response):
        return accepted
    state, body, model = accepted
    fault = state.faults.take(model.id, body)
    if fault is not None and not fault.streams_normally:
        failed = await fault_response(request, state, fault, model)
        if failed is not None:
            return failed
    # Billed before any latency, as a chat answer is: the work is done whether or not the client waits.
    created = int(state.clock())
    gen_id = "gen-emb-" + state.new_id(created).removeprefix("gen-")
    charge = Charge(input_tokens(body["input"]), 0)
    state.bill(gen_id, model, charge, streamed=False, finish_reason="stop")
    state.stats["completions"] += 1
    openrouter = not request.path.startswith("/v1/")
    answer = embedding_body(body, model, gen_id, usage_for(charge, model), openrouter=openrouter)
    if fault is not None and fault.latency_s:
        await asyncio.sleep(fault.latency_s)
    return web.Response(body=answer, headers={"X-Generation-Id": gen_id}, content_type="application/json")


def _validate(state: EmulatorState, body: Mapping[str, Any], model_id: str | None) -> ModelInfo | web.Response:
    if not model_id:
        return error_response(400, "No model specified: set `model` to a model ID from /api/v1/embeddings/models")
    model = state.models.get(model_id)
    if model is None:
        return error_response(400, f"{model_id} is not a valid model ID")
    if not model.embeddings:
        return error_response(400, f"{model_id} is not an embeddings model (see /api/v1/embeddings/models)")
    value = body.get("input")
    if value is None or value == "" or value == []:
        return error_response(400, "Input required: `input` must be a non-empty string or array")
    dimensions = body.get("dimensions")
    if dimensions is not None and not (isinstance(dimensions, int) and dimensions >= 1):
        return error_response(400, "`dimensions` must be a positive integer")
    if body.get("encoding_format", "float") not in ("float", "base64"):
        return error_response(400, "`encoding_format` must be `float` or `base64`")
    return model


def inputs_of(value: Any) -> list[Any]:
    """The separate inputs: a string or one array of token ids is one input; other arrays list them."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, int) for v in value)):
        return [value]
    return list(value) if isinstance(value, list) else [value]


def input_tokens(value: Any) -> int:
    total = 0
    for item in inputs_of(value):
        if isinstance(item, str):
            total += text_tokens(len(item.encode()))
        elif isinstance(item, list):
            total += len(item)
        elif isinstance(item, dict):
            total += _object_tokens(item)
        else:
            total += 1
    return total


def _object_tokens(item: dict[str, Any]) -> int:
    """A multimodal input: its text parts as text, each image part at `IMAGE_TOKENS`."""
    content = item.get("content")
    parts = content if isinstance(content, list) else [content]
    total = 0
    for part in parts:
        if isinstance(part, str):
            total += text_tokens(len(part.encode()))
        elif isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
            total += IMAGE_TOKENS
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            total += text_tokens(len(part["text"].encode()))
    return total


def vector(model: str, item: Any, dimensions: int) -> list[float]:
    """A deterministic unit vector for one input: the same text always embeds the same."""
    rng = random.Random(zlib.crc32(model.encode() + b"\0" + orjson.dumps(item)))
    values = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def dimensions_of(model: ModelInfo, body: Mapping[str, Any]) -> int:
    asked = body.get("dimensions")
    if isinstance(asked, int) and asked >= 1:
        return asked
    return DIMENSIONS.get(model.id.split("/", 1)[-1], DEFAULT_DIMENSIONS)


def embedding_body(
    body: Mapping[str, Any], model: ModelInfo, gen_id: str, usage: dict[str, Any], *, openrouter: bool
) -> bytes:
    """The serialised answer; OpenRouter's carries its generation id, provider and cost."""
    size = dimensions_of(model, body)
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(inputs_of(body["input"])):
        values = vector(model.id, item, size)
        encoded: Any = base64.b64encode(array.array("f", values).tobytes()).decode() if as_base64 else values
        data.append({"object": "embedding", "embedding": encoded, "index": index})
    tokens = usage["prompt_tokens"]
    if not openrouter:  # OpenAI's: no id, no provider, no cost
        return orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": model.id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
    return orjson.dumps(
        {
            "id": gen_id,
            "object": "list",
            "data": data,
            "model": model.id,
            "provider": model.provider,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "cost": usage["cost"]},
        }
    )
