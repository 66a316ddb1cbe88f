"""Extract the Anthropic Messages API schemas the tests validate against, from Anthropic's official
Python SDK (`anthropic`, generated from Anthropic's OpenAPI spec), version pinned in pyproject.toml.

    python tests/schemas/extract_anthropic.py > tests/schemas/anthropic-messages-schemas.json

The SDK's pydantic models (`anthropic.types`) are turned into JSON Schema 2020-12 with pydantic's
own generator: the Message object, every raw stream event, the token count and the error body.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anthropic
from anthropic.types import ErrorResponse, Message, MessageTokensCount, RawMessageStreamEvent
from pydantic import TypeAdapter

ROOTS: dict[str, Any] = {
    "Message": Message,
    "RawMessageStreamEvent": RawMessageStreamEvent,
    "MessageTokensCount": MessageTokensCount,
    "ErrorResponse": ErrorResponse,
}


def main() -> None:
    defs: dict[str, Any] = {}
    for name, kind in ROOTS.items():
        schema = TypeAdapter(kind).json_schema(ref_template="#/$defs/{model}")
        defs.update(schema.pop("$defs", {}))
        defs[name] = schema
    document = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"Extracted by tests/schemas/extract_anthropic.py from the official anthropic Python SDK "
        f"{anthropic.__version__} (anthropic.types: Message, RawMessageStreamEvent, MessageTokensCount, "
        "ErrorResponse) with pydantic's JSON Schema generator.",
        "$defs": defs,
    }
    json.dump(document, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
