"""The request shapes bench/run.py measures, and reading the proxy's overhead histogram.

* small: today's case, one short chat message (`max_tokens: 32`), non-streamed and streamed;
* big: a 50 kB prompt with 20 tools (JSON-schema parameters), non-streamed;
* long-stream: a stream of 1,000 content chunks (the emulator's `emulator_chunks` request field),
  measured as CPU per relayed chunk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

PROMPT = [{"role": "user", "content": "Say hello in one short sentence."}]
BIG_PROMPT_BYTES = 50_000
BIG_TOOLS = 20
LONG_STREAM_CHUNKS = 1_000


@dataclass(frozen=True)
class Shape:
    name: str
    stream: bool
    chunks: int = 0  # content chunks per stream, for CPU per relayed chunk (0: not counted)
    latency: bool = False  # also measured on one connection (the added-latency goal)

    def body(self, model: str) -> str:
        fields: dict = {"model": model, "stream": self.stream}
        if self.name == "big":
            fields |= {"messages": big_messages(), "tools": big_tools(), "max_tokens": 32}
        elif self.chunks:
            fields |= {"messages": PROMPT, "emulator_chunks": self.chunks}
        else:
            fields |= {"messages": PROMPT, "max_tokens": 32}
        return json.dumps(fields, separators=(",", ":"))


SHAPES = {
    shape.name: shape
    for shape in (
        Shape("small", stream=False, latency=True),
        Shape("small-stream", stream=True, latency=True),
        Shape("big", stream=False),
        Shape("long-stream", stream=True, chunks=LONG_STREAM_CHUNKS),
    )
}


def big_messages() -> list[dict]:
    """A system prompt and a user message of ~50 kB of prose between them: a long document to work on."""
    sentence = "The lighthouse keeper logged the weather, trimmed the wick and counted the passing ships. "
    text = (sentence * (BIG_PROMPT_BYTES // len(sentence) + 1))[: BIG_PROMPT_BYTES - 2_000]
    return [
        {"role": "system", "content": "You are a careful assistant. " * 60},
        {"role": "user", "content": text + " Summarise the log above in one sentence."},
    ]


def big_tools() -> list[dict]:
    """20 function tools with realistic JSON-schema parameters (an agent's toolbox)."""
    tools = []
    for number in range(BIG_TOOLS):
        tools.append(
            {
                "type": "function",
                "function": {
                    "name": f"tool_{number:02d}",
                    "description": f"Look up record kind {number} by its id and return the fields asked for.",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "id": {"type": "string", "description": "The record's id."},
                            "fields": {"type": "array", "items": {"type": "string"}, "maxItems": 20},
                            "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                            "since": {"type": "string", "format": "date-time"},
                        },
                        "required": ["id"],
                    },
                },
            }
        )
    return tools


# ---------------------------------------------------------------------- the overhead histogram

_BUCKET = re.compile(r"^orproxy_overhead_seconds_bucket\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M)


def overhead_buckets(exposition: str, api: str = "chat") -> dict[float, float]:
    """Cumulative counts per upper bound of `orproxy_overhead_seconds{api=...}` (empty when absent,
    e.g. a proxy from before the histogram existed)."""
    found: dict[float, float] = {}
    for match in _BUCKET.finditer(exposition):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("api") == api:
            found[float(labels["le"])] = float(match["value"])
    return found


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over what was observed between two scrapes (linear within a
    bucket); None when nothing was."""
    counts = sorted((bound, after[bound] - before.get(bound, 0.0)) for bound in after)
    if not counts or counts[-1][1] <= 0:
        return None
    rank = q * counts[-1][1]
    lower, below = 0.0, 0.0
    for bound, cumulative in counts:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower  # past the last finite bucket: its bound is all that is known
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower
