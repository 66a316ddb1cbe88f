"""The emulator's own control endpoints (`/_emulator/...`): arm and clear faults, read the
counters, read and forget the recorded requests (their keys redacted).
"""

from __future__ import annotations

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .faults import Fault
from .replies import error_response, json_response
from .state import EMULATOR_STATE


def add_control_routes(router: web.UrlDispatcher) -> None:
    router.add_routes(
        [
            web.get("/_emulator/faults", get_faults),
            web.post("/_emulator/faults", post_fault),
            web.delete("/_emulator/faults", delete_faults),
            web.get("/_emulator/stats", get_stats),
            web.get("/_emulator/requests", get_requests),
            web.delete("/_emulator/requests", delete_requests),
        ]
    )


async def get_faults(request: web.Request) -> web.Response:
    return json_response({"faults": request.app[EMULATOR_STATE].faults.snapshot()})


async def post_fault(request: web.Request) -> web.Response:
    state = request.app[EMULATOR_STATE]
    try:
        fields = orjson.loads(await request.read())
        model = fields.pop("model")
        if not isinstance(model, str):
            raise ValueError('`model` must be a string (a model ID or "*")')
        fault = Fault.from_mapping(fields)
    except (orjson.JSONDecodeError, AttributeError, KeyError, ValueError) as exc:
        return error_response(400, f'Bad fault: {exc}. Send {{"model": ..., <Fault fields>}}')
    state.faults.set(model, fault)
    return json_response({"faults": state.faults.snapshot()})


async def delete_faults(request: web.Request) -> web.Response:
    state = request.app[EMULATOR_STATE]
    state.faults.clear(request.query.get("model"))
    return json_response({"faults": state.faults.snapshot()})


def _redacted(headers: CIMultiDict[str]) -> dict[str, str]:
    return {str(k): ("Bearer [REDACTED]" if k.lower() == "authorization" else v) for k, v in headers.items()}


async def get_requests(request: web.Request) -> web.Response:
    recorded = request.app[EMULATOR_STATE].requests
    return json_response(
        {
            "data": [
                {"path": r.path, "model": r.model, "headers": _redacted(r.headers), "body": r.body} for r in recorded
            ]
        }
    )


async def delete_requests(request: web.Request) -> web.Response:
    request.app[EMULATOR_STATE].requests.clear()
    return json_response({"data": []})


async def get_stats(request: web.Request) -> web.Response:
    state = request.app[EMULATOR_STATE]
    return json_response({**state.stats, "key_usage": state.key_usage})
