"""POST /v1/messages/count_tokens: Anthropic's token counting, answered by the proxy itself.

OpenRouter serves no count_tokens, and counting costs nothing anywhere, so nothing goes upstream,
nothing is reserved and no ledger row is written. The request is checked like a Messages request
(client key, the key's model list, a model that exists here, a well-formed body) and answered
with the prompt's typical size: four UTF-8 bytes of its text a token, images at their typical
size (`proxy.core.apis.messages.measure_prompt`). That is an estimate, as Anthropic's own count
is documented to be; the proxy's budget reservations use the prompt's upper bound instead.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.core.apis.base import check_model
from proxy.core.apis.messages import MessagesApi, check_messages
from proxy.core.routing import UnknownModel
from proxy.http.api import model_not_found
from proxy.http.appkeys import RUNTIME
from proxy.http.body import read_body

ROUTE = "/v1/messages/count_tokens"
MESSAGES = MessagesApi()  # stateless: how a Messages request authenticates and is measured
JSON = "application/json"


async def count_tokens(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME].current
    client = runtime.policy.keys.authenticate(MESSAGES.authorization(request.headers))
    body = await read_body(request, runtime.config.max_body_bytes, runtime.config.server.body_timeout_s)
    check_model(body)
    check_messages(body)
    model = body["model"]
    client.check_model(model)
    features = MESSAGES.features(body, request.headers)
    try:
        runtime.policy.router.resolve(model, features)  # a model this proxy does not serve is a 404
    except UnknownModel as exc:
        raise model_not_found(exc, runtime) from None
    return web.Response(body=orjson.dumps({"input_tokens": features.prompt_estimate}), content_type=JSON)
