"""What the tests of the embeddings and legacy completions APIs share: OpenAI's schema of a legacy
completion stream chunk (tests/schemas/openai-api-schemas.json, see extract_openai.py there)."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema

from tests.support.gateway import API_SPEC


def completion_chunk_schema() -> dict[str, Any]:
    """OpenAI's `CreateCompletionResponse`, for stream chunks. Its spec says streamed and whole answers
    share one shape, yet OpenAI's own streams (and OpenRouter's) carry `finish_reason: null` until
    the last chunk, which the spec's enum leaves out (the SDK's types say the same and check nothing):
    that is the one relaxation, so everything else in a chunk is held to the spec."""
    defs = json.loads(API_SPEC.read_text())["$defs"]
    chunk = copy.deepcopy(defs["CreateCompletionResponse"])
    choice = chunk["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    return {"$defs": defs, **chunk}


def completion_chunk_validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(completion_chunk_schema())
