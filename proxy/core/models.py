"""The OpenAI model objects the proxy shows (`GET /v1/models`, `GET /v1/models/{id}`), pure: the
virtual models first, then the real models their chains use, rendered once per config snapshot."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.config import Config
from proxy.core.routing import DIRECT_SLUG


def model_entries(config: Config, created: int, allowed: frozenset[str] | None = None) -> list[dict[str, Any]]:
    """With `allowed` (a key's model list), only those virtual models: such a key may use nothing else."""
    data: list[dict[str, Any]] = []
    real: dict[str, str] = {}
    for name, model in config.models.items():
        if allowed is not None and name not in allowed:
            continue
        entry: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "openrouter-proxy",
            "virtual": True,
            "kind": model.kind,  # chat | embeddings: which API it serves
            "description": model.description,
        }
        if model.chain is not None:
            entry["chain"] = [m.model if m.upstream == "openrouter" else f"{m.model}@{m.upstream}" for m in model.chain]
            for member in model.chain if allowed is None else ():
                real.setdefault(member.model, member.upstream)
        else:
            entry["route"] = [
                {"when": rule.when.model_dump(exclude_none=True, mode="json"), "to": rule.to}
                for rule in model.route or ()
            ]
        data.append(entry)
    data.extend(real_model(slug, upstream, created) for slug, upstream in real.items())
    return data


def real_model(slug: str, upstream: str, created: int) -> dict[str, Any]:
    return {
        "id": slug,
        "object": "model",
        "created": created,
        "owned_by": slug.split("/", 1)[0] if "/" in slug else upstream,
        "virtual": False,
        "upstream": upstream,
    }


def render_models(config: Config, created: int, allowed: frozenset[str] | None = None) -> bytes:
    """OpenAI's list format."""
    return orjson.dumps({"object": "list", "data": model_entries(config, created, allowed)})


def model_index(config: Config, created: int) -> dict[str, bytes]:
    """Each listed model's own object, by id: what `GET /v1/models/{id}` answers."""
    return {entry["id"]: orjson.dumps(entry) for entry in model_entries(config, created)}


def direct_model(config: Config, model_id: str, created: int) -> bytes | None:
    """A real slug outside every chain, when direct models are allowed: it is served too."""
    if config.allow_direct_models and DIRECT_SLUG.match(model_id):
        return orjson.dumps(real_model(model_id, config.direct_upstream, created))
    return None
