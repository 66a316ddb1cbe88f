"""The emulator's account endpoints, as OpenRouter answers them: the model list, the key's usage
and limit (`/key`), and what one generation was billed (`/generation`).
"""

from __future__ import annotations

from aiohttp import web

from .billing import generation_data
from .completions import is_embedding_model, key_data
from .replies import error_response, json_response, unauthorized
from .state import EMULATOR_STATE


async def list_models(request: web.Request) -> web.Response:
    """Like OpenRouter's, text models unless `output_modalities` asks for others (`embeddings`, `all`)."""
    wanted = request.query.get("output_modalities", "text")
    data = request.app[EMULATOR_STATE].catalogue.get("data", [])
    if wanted != "all":
        data = [entry for entry in data if is_embedding_model(entry) == ("embeddings" in wanted.split(","))]
    return json_response({"data": data})


async def key_info(request: web.Request) -> web.Response:
    state = request.app[EMULATOR_STATE]
    denied = unauthorized(state, request)
    if denied is not None:
        return denied
    return json_response({"data": key_data(state.key_usage, state.credit_limit)})


async def generation(request: web.Request) -> web.Response:
    """OpenRouter's GET /generation?id=: what one generation was billed. Like OpenRouter, it says
    404 for a while after the generation (`generation_lag` lookups), then the figures."""
    state = request.app[EMULATOR_STATE]
    denied = unauthorized(state, request)
    if denied is not None:
        return denied
    gen_id = request.query.get("id", "")
    seen = state.generation_lookups[gen_id] = state.generation_lookups.get(gen_id, 0) + 1
    bill = state.bills.get(gen_id)
    if bill is None or seen <= state.generation_lag:
        return error_response(404, f"Generation {gen_id} not found")
    return json_response({"data": generation_data(bill)})
