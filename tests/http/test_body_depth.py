"""The nesting check on request bodies, as a table: the limit exactly, whatever the containers."""

from __future__ import annotations

import orjson
import pytest

from proxy.core.errors import InvalidRequest
from proxy.http.body import MAX_DEPTH, check_depth


def chain(depth: int, kinds: str, leaf: object = "leaf") -> object:
    """`depth` nested containers (the body counts as 1), alternating the kinds given ('d', 'l'),
    around `leaf` (a container counts as one more level, even empty)."""
    node = leaf
    for level in range(depth):
        node = {"k": node, "s": "]]]}}}"} if kinds[level % len(kinds)] == "d" else [1, node, "[[["]
    return node


@pytest.mark.parametrize("kinds", ["d", "l", "dl", "ld"])
@pytest.mark.parametrize(("depth", "refused"), [(1, False), (MAX_DEPTH, False), (MAX_DEPTH + 1, True), (200, True)])
@pytest.mark.parametrize("leaf", ["leaf", [], {}, None])
def test_the_limit_is_exact_for_any_mix_of_containers(kinds: str, depth: int, refused: bool, leaf: object) -> None:
    if isinstance(leaf, list | dict):  # an empty container is the deepest level
        body = {"model": "m", "x": chain(depth - 2, kinds, leaf)} if depth > 1 else {}
    else:
        body = {"model": "m", "x": chain(depth - 1, kinds, leaf)}  # the body itself is level 1
    raw = orjson.dumps(body)  # brackets inside strings too: the walk reads the parsed body
    if refused:
        with pytest.raises(InvalidRequest, match="nested deeper"):
            check_depth(orjson.loads(raw))
    else:
        check_depth(orjson.loads(raw))


def test_a_wide_body_is_not_deep() -> None:
    body = {"tools": [{"function": {"parameters": {"properties": {f"p{i}": {"type": "string"}}}}} for i in range(500)]}
    raw = orjson.dumps(body)
    check_depth(orjson.loads(raw))  # thousands of brackets, six levels
