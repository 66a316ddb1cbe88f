"""The OpenRouter emulator as an aiohttp app: the wiring of one `EmulatorState` and its endpoints.

Speaks OpenRouter's wire format (and, under `/v1`, stands in for a plain OpenAI-compatible
upstream: its streams take OpenAI's shape) with faults injected from a `FaultPlan`. Each API's
handlers have their own module (`chat`, `responses`, `messages`, `embeddings`, `legacy`,
`batches`); what they share is in `replies` and `streaming`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from .account import generation, key_info, list_models
from .batches import add_batch_routes
from .chat import chat_completions
from .completions import index_catalogue
from .control import add_control_routes
from .embeddings import add_embedding_routes
from .legacy import add_completion_routes
from .messages import register as register_messages
from .responses import create_response
from .state import EMULATOR_STATE, MAX_RECORDED, EmulatorState

PREFIXES = ("/api/v1", "/v1")


def load_default_catalogue() -> dict[str, Any]:
    """The packaged `/api/v1/models` snapshot."""
    return orjson.loads((resources.files("proxy") / "data" / "openrouter-models.json").read_bytes())


def create_emulator_app(
    *,
    catalogue: dict[str, Any] | None = None,
    api_key: str | None = None,
    clock: Callable[[], float] = time.time,
    max_bills: int | None = None,
    max_recorded: int = MAX_RECORDED,
) -> web.Application:
    """An emulator app; its state is `app[EMULATOR_STATE]`. `max_bills`: keep only the newest
    bills past that many (a long benchmark), instead of all of them; `max_recorded`: how many
    requests it keeps (`state.requests`) for tests to read."""
    catalogue = catalogue if catalogue is not None else load_default_catalogue()
    app = web.Application()
    app[EMULATOR_STATE] = EmulatorState(
        catalogue, index_catalogue(catalogue), api_key, clock, max_bills=max_bills, max_recorded=max_recorded
    )
    for prefix in PREFIXES:
        app.router.add_post(f"{prefix}/chat/completions", chat_completions)
        app.router.add_post(f"{prefix}/responses", create_response)
        app.router.add_get(f"{prefix}/models", list_models)
        app.router.add_get(f"{prefix}/key", key_info)
        app.router.add_get(f"{prefix}/generation", generation)
        add_embedding_routes(app.router, prefix)
        add_completion_routes(app.router, prefix)
    register_messages(app)  # POST /api/v1/messages
    add_batch_routes(app)  # OpenRouter's Batch API
    add_control_routes(app.router)
    return app
