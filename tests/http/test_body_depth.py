"""The nesting check on request bodies, as a table: the limit exactly, whatever the containers."""

from __future__ import annotations

import orjson
import pytest

from proxy.core.errors import InvalidRequest
from proxy.http.body import MAX_DEPTH, check_depth


def chain(depth: int, kinds: str) -> object:
    """`depth` nested containers (the body counts as 1), alternating the kinds given ('d', 'l')."""
    node: object = "leaf"
    for level in range(depth):
        node = {"k": node, "s": "]]]}}}"} if kinds[level % len(kinds)] == "d" else [1, node, "[[["]
    return node


@pytest.mark.parametrize("kinds", ["d", "l", "dl", "ld"])
@pytest.mark.parametrize(("depth", "refused"), [(1, False), (MAX_DEPTH, False), (MAX_DEPTH + 1, True), (200, True)])
def test_the_limit_is_exact_for_any_mix_of_containers(kinds: str, depth: int, refused: bool) -> None:
    body = {"model": "m", "x": chain(depth - 1, kinds)}  # the body itself is level 1
    raw = orjson.dumps(body)  # brackets inside strings too: the walk reads the parsed body
    if refused:
        with pytest.raises(InvalidRequest, match="nested deeper"):
            check_depth(orjson.loads(raw), raw)
    else:
        check_depth(orjson.loads(raw), raw)


def test_a_wide_body_is_not_deep() -> None:
    body = {"tools": [{"function": {"parameters": {"properties": {f"p{i}": {"type": "string"}}}}} for i in range(500)]}
    raw = orjson.dumps(body)
    check_depth(orjson.loads(raw), raw)  # thousands of brackets, six levels
