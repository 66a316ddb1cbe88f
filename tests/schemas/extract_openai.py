"""Extract the OpenAI schemas the API tests validate against, from OpenAI's published OpenAPI spec.

Source: github.com/openai/openai-openapi, `openapi.json` at commit f85dbe2 (the same commit as
../shared/spec/openai-chat-schemas.json). Run with the path of that file:

    python tests/schemas/extract_openai.py /path/to/openapi.json > tests/schemas/openai-api-schemas.json

What it does, as for the shared chat schemas: keep the named schemas and everything they
reference, rewrite `#/components/schemas/X` refs to `#/$defs/X`, and rewrite OpenAPI's
`nullable: true` as `anyOf [..., null]`, so any JSON Schema 2020-12 validator can use them.
"""

from __future__ import annotations

import json
import sys
from typing import Any

ROOTS = (
    "Response",
    "ResponseStreamEvent",
    "CreateEmbeddingResponse",
    "CreateCompletionResponse",
    "Model",
    "ListModelsResponse",
    "ErrorResponse",
    # The Batch API (issue 14): the batch and file objects, a list of batches, a deleted file.
    "Batch",
    "ListBatchesResponse",
    "OpenAIFile",
    "DeleteFileResponse",
)
PREFIX = "#/components/schemas/"


def references(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(PREFIX):
            found.add(ref[len(PREFIX) :])
        for value in node.values():
            found |= references(value)
    elif isinstance(node, list):
        for value in node:
            found |= references(value)
    return found


def rewrite(node: Any) -> Any:
    if isinstance(node, list):
        return [rewrite(value) for value in node]
    if not isinstance(node, dict):
        return node
    out = {key: rewrite(value) for key, value in node.items() if key not in ("nullable", "discriminator")}
    if isinstance(out.get("$ref"), str):
        out["$ref"] = out["$ref"].replace(PREFIX, "#/$defs/")
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


def main(path: str) -> None:
    with open(path) as source:
        schemas = json.load(source)["components"]["schemas"]
    wanted: set[str] = set()
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        todo.extend(references(schemas[name]) - wanted)
    document = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "Extracted by tests/schemas/extract_openai.py from openai/openai-openapi openapi.json (commit "
        "f85dbe2): the Responses API object and stream events, embeddings, legacy completions, models, "
        "errors, and the Batch API's batch and file objects, refs rewritten to $defs and `nullable: true` "
        "rewritten as anyOf with null.",
        "$defs": {name: rewrite(schemas[name]) for name in sorted(wanted)},
    }
    json.dump(document, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
