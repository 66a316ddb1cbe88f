"""Shared by the Responses API tests: reading a Responses stream off the wire, and checking its
events against OpenAI's schema."""

from __future__ import annotations

from typing import Any

import orjson

from tests.support.gateway import Schemas


def events_of(raw: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    """(SSE event name, data) of each event of a whole stream body; comments carry none, and
    neither does OpenRouter's `data: [DONE]`, which is not a Responses event."""
    found = []
    for block in raw.split(b"\n\n"):
        name, data = None, None
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        if data is not None and data != b"[DONE]":
            found.append((name, orjson.loads(data)))
    return found


def check_event(schemas: Schemas, event: dict[str, Any]) -> None:
    """Validate one stream event as `ResponseStreamEvent`.

    One difference between OpenAI's wire and its published schema is allowed: until a response
    completes, its `usage` is `null` in the events that carry it (`response.created`,
    `.in_progress`), in OpenAI's streams and OpenRouter's alike (the emulator sends it as they
    do), while the schema's `ResponseUsage` is not nullable. Only that null is dropped before
    validating; anything else must match."""
    response = event.get("response")
    if isinstance(response, dict) and "usage" in response and response["usage"] is None:
        event = {**event, "response": {k: v for k, v in response.items() if k != "usage"}}
    schemas.validate("ResponseStreamEvent", event)
