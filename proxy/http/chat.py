"""Thin HTTP handlers: parse once, route, run, answer. Domain errors become
OpenAI's error JSON in `proxy.http.errors`, in one place."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from typing import Any

import orjson
from aiohttp import web

from proxy.cache.replay import StreamAssembler
from proxy.core.admission import Admission, admit
from proxy.core.breakers import BlockView
from proxy.core.budget import Reservation
from proxy.core.errors import ModelNotFound, ProxyError
from proxy.core.explain import explain
from proxy.core.features import RequestFeatures, extract_features
from proxy.core.policy import Policy
from proxy.core.record import Attempt, RequestRecord, Usage
from proxy.core.routing import Plan, Target, UnknownModel
from proxy.core.sse import StreamMeter
from proxy.http.appkeys import RUNTIME
from proxy.http.body import read_body
from proxy.http.cached import answer_hit, key_for, store
from proxy.http.errors import header_value
from proxy.http.inflight import InFlight
from proxy.money.accounting import Accountant
from proxy.ops.metrics import Gauges
from proxy.ops.runtime import Runtime, SharedState
from proxy.upstream.client import OpenedStream, UpstreamClient, open_stream
from proxy.upstream.executor import Answer
from proxy.upstream.relay import relay

log = logging.getLogger("orproxy")
REQUEST_ID = re.compile(r"^[\w.:\-]{1,128}$", re.ASCII)
JSON = "application/json"


class ChatHandler:
    """POST /v1/chat/completions. Everything the config decides comes from the snapshot the
    request acquired; this object holds only the long-lived state it was built with."""

    def __init__(
        self, state: SharedState, accountant: Accountant, gauges: Gauges, inflight: InFlight | None = None
    ) -> None:
        self._breakers = state.breakers
        self._ratelimits = state.ratelimits
        self._accountant = accountant
        self._gauges = gauges
        self._inflight = inflight if inflight is not None else InFlight()
        self._ids = random.Random()  # request ids need to be unique, not secret: no syscall per request
        self._background: set[asyncio.Task[Any]] = set()  # cache writes after the answer went out

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self._gauges.in_flight += 1
        try:
            return await self._chat(request)
        finally:
            self._gauges.in_flight -= 1

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        runtimes = request.app[RUNTIME]
        runtime = runtimes.acquire()
        try:
            return await self._serve(request, runtime)
        finally:
            runtimes.release(runtime)

    async def _serve(self, request: web.Request, runtime: Runtime) -> web.StreamResponse:
        policy = runtime.policy
        started = time.monotonic()
        request_id = self._request_id(request)
        try:
            client_key = policy.keys.authenticate(request.headers.get("Authorization"))
            body = await read_body(request, runtime.config.max_body_bytes, runtime.config.server.body_timeout_s)
        except ProxyError as exc:
            exc.request_id = request_id
            refused = RequestRecord(
                request_id,
                self._accountant.now(),
                "",
                None,
                False,
                status=exc.status,
                error=exc.code,
                latency_s=time.monotonic() - started,
            )
            self._accountant.observe_refusal(refused, policy)
            raise
        model_name = body["model"]
        features = extract_features(body, request.headers)
        record = RequestRecord(
            request_id,
            self._accountant.now(),
            model_name,
            None,
            features.stream,
            key_name=client_key.name,
            prompt_estimate=features.prompt_estimate,
        )
        reservation = None
        owned = False  # the upstream work runs in a task of its own, which books the request itself
        plan: Plan | None = None
        downgrade: str | None = None
        try:
            client_key.check_model(model_name)
            admission = self._admit(runtime, client_key.name, model_name, features)
            plan, reservation, downgrade = admission.plan, admission.reservation, admission.downgrade
            record.virtual_model, record.downgrade = plan.chain_owner, admission.downgrade
            cache = runtime.cache
            cache_key = key_for(cache, body, request.headers, plan, policy.router, runtime.config.direct_upstream)
            if cache_key is not None and cache is not None:
                hit = await cache.get(cache_key)
                if hit is not None:
                    headers = _proxy_headers(request_id, plan, [], admission.downgrade)
                    response = answer_hit(request, hit, record, headers, features.stream)
                    record.latency_s = time.monotonic() - started
                    await self._accountant.settle(record, reservation, policy)
                    return response
            if features.stream:
                opening = self._own(request, runtime.executor.run(plan, body, open_stream, client_key.name), record)
                try:
                    streamed = await asyncio.shield(opening)
                except asyncio.CancelledError:  # the client left before the stream opened
                    owned = True
                    self._own(request, self._abandon_stream(opening, record, reservation, policy, started), record)
                    raise
                headers = self._answered(record, request_id, plan, streamed.target, streamed.attempts, admission)
                if cache_key is not None:
                    headers["x-proxy-cache"] = "miss"
                assembler = StreamAssembler() if cache_key is not None else None

                async def finish() -> None:
                    record.latency_s = time.monotonic() - started
                    await self._accountant.settle(record, reservation, policy)
                    completion = assembler.completion() if assembler is not None else None
                    if completion is not None and cache is not None and cache_key is not None:
                        store(cache, cache_key, record, completion, self._accountant.now(), self._background)

                secrets = runtime.executor.secrets
                return await relay(request, streamed.result, headers, record, started, finish, assembler, secrets)
            answering = self._answer(runtime, plan, body, record, admission, reservation, started)
            owned = True
            try:
                raw, payload, headers = await asyncio.shield(self._own(request, answering, record))
            except asyncio.CancelledError:  # the client left: the task still books what the answer costs
                record.client_gone = True
                raise
            if cache_key is not None:
                headers["x-proxy-cache"] = "miss"
            if cache_key is not None and cache is not None:
                store(cache, cache_key, record, payload, self._accountant.now(), self._background)
            return web.Response(body=raw, status=200, content_type=JSON, headers=headers)
        except ProxyError as exc:
            if plan is not None:
                _failed(record, exc, plan, downgrade)
            else:
                record.status, record.error = exc.status, exc.code
                exc.request_id = request_id
            raise
        finally:
            if not record.settled and not owned:  # failures, refusals and hang-ups are booked too
                record.latency_s = time.monotonic() - started
                await self._accountant.settle(record, reservation, policy, wait=False)

    def _own(self, request: web.Request, work: Any, record: RequestRecord) -> asyncio.Task[Any]:
        """Run upstream work in a task the app owns, holding the config snapshot until it ends:
        a client hang-up cancels the handler's wait, never the upstream call or its booking."""
        runtimes = request.app[RUNTIME]
        runtime = runtimes.acquire()

        async def held() -> Any:
            try:
                return await work
            finally:
                runtimes.release(runtime)

        return self._inflight.start(held(), name=f"upstream:{record.request_id}")

    async def _answer(
        self,
        runtime: Runtime,
        plan: Plan,
        body: dict[str, Any],
        record: RequestRecord,
        admission: Admission,
        reservation: Reservation | None,
        started: float,
    ) -> tuple[bytes, dict[str, Any], dict[str, str]]:
        """A non-streamed answer, booked once it is in (or has failed) whether or not the client
        is still there: the ledger row is committed before the handler may answer."""
        cancelled = False
        try:
            answer = await runtime.executor.run(plan, body, _complete, record.key_name)
            headers = self._answered(record, record.request_id, plan, answer.target, answer.attempts, admission)
            raw, payload = answer.result
            _fill_from_payload(record, payload)
            return raw, payload, headers
        except ProxyError as exc:
            _failed(record, exc, plan, admission.downgrade)  # before the booking below: its row lists the attempts
            raise
        except asyncio.CancelledError:  # shutdown gave up on it: booked at the reservation's worst case
            cancelled = record.abandoned = True
            raise
        finally:
            await self._book(record, reservation, runtime.policy, started, wait=not cancelled)

    async def _abandon_stream(
        self,
        opening: asyncio.Task[Answer[OpenedStream]],
        record: RequestRecord,
        reservation: Reservation | None,
        policy: Policy,
        started: float,
    ) -> None:
        """The client left while the stream was being opened. Once it opens, close it (the upstream
        stops generating) and book the prompt, with the generation id the upstream gave in its
        `X-Generation-Id` header, so reconciliation can fetch what it really billed."""
        record.client_gone = True
        cancelled = False
        try:
            answer = await opening
            opened, target = answer.result, answer.target
            record.model, record.upstream, record.attempts = target.model, target.upstream, answer.attempts
            record.generation_id = opened.response.headers.get("X-Generation-Id")
            opened.response.close()
            if opened.first is not None:  # the text of the first read was generated: it is billed
                meter = StreamMeter(record, started)
                for data in opened.first.events:
                    meter.see(data, time.monotonic())
        except ProxyError as exc:
            record.error = exc.code
        except asyncio.CancelledError:
            cancelled = record.abandoned = True
            raise
        finally:
            await self._book(record, reservation, policy, started, wait=not cancelled)

    async def _book(
        self, record: RequestRecord, reservation: Reservation | None, policy: Policy, started: float, *, wait: bool
    ) -> None:
        if record.client_gone:
            record.status, record.error = 499, "client_disconnected"
        elif record.abandoned:
            record.status, record.error = 503, "shutdown"
        record.latency_s = time.monotonic() - started
        await self._accountant.settle(record, reservation, policy, wait=wait)

    @staticmethod
    def _answered(
        record: RequestRecord,
        request_id: str,
        plan: Plan,
        target: Target,
        attempts: list[Attempt],
        admission: Admission,
    ) -> dict[str, str]:
        """Note who answered on the record; the proxy headers of the answer."""
        record.model, record.upstream, record.attempts = target.model, target.upstream, attempts
        headers = _proxy_headers(request_id, plan, attempts, admission.downgrade)
        record.route = headers["x-proxy-route"]
        record.status = 200
        return headers

    def _blocked(self, runtime: Runtime, now: float, client: str | None) -> BlockView | None:
        open_breakers = self._breakers.active(now, client)
        limited = self._ratelimits.active(now)
        if runtime.keyless or open_breakers or limited:
            return BlockView(runtime.keyless, open_breakers, limited)
        return None

    def _admit(self, runtime: Runtime, key: str | None, model: str, features: RequestFeatures) -> Admission:
        now = self._accountant.now()
        try:
            return admit(runtime.policy, key, model, features, self._blocked(runtime, now, key), now)
        except UnknownModel as exc:
            raise _model_not_found(exc, runtime) from None

    async def explain(self, request: web.Request) -> web.Response:
        """POST /v1/route/explain: the decision for a chat body, nothing sent upstream or reserved."""
        runtime = request.app[RUNTIME].current
        client_key = runtime.policy.keys.authenticate(request.headers.get("Authorization"))
        body = await read_body(request, runtime.config.max_body_bytes, runtime.config.server.body_timeout_s)
        client_key.check_model(body["model"])
        now = self._accountant.now()
        try:
            decision = explain(
                runtime.policy,
                body,
                request.headers,
                key=client_key.name,
                blocked=self._blocked(runtime, now, client_key.name),
                now=now,
            )
        except UnknownModel as exc:
            raise _model_not_found(exc, runtime) from None
        return web.Response(body=orjson.dumps(decision), content_type=JSON)

    def _request_id(self, request: web.Request) -> str:
        """The client's X-Request-ID when it is sane, else a time-ordered id (48 bits of milliseconds,
        80 random bits): ordered ids append to the ledger's request-id index instead of touching a
        random page of it per row, which halves the ledger's write cost."""
        given = request.headers.get("X-Request-ID")
        if given and REQUEST_ID.match(given):
            return given
        return f"{time.time_ns() // 1_000_000:012x}{self._ids.getrandbits(80):020x}"


def _model_not_found(exc: UnknownModel, runtime: Runtime) -> ModelNotFound:
    return ModelNotFound(
        f"The model '{exc.requested[:200]}' does not exist on this proxy. Valid virtual "
        f"models: {', '.join(exc.valid)}"
        + (", or any OpenRouter slug such as anthropic/claude-3-haiku." if runtime.config.allow_direct_models else "."),
        param="model",
    )


async def _complete(client: UpstreamClient, payload: bytes, model: str) -> tuple[bytes, dict[str, Any]]:
    response = await client.post(payload, stream=False, model=model)
    return await client.read_json(response)


def _failed(record: RequestRecord, exc: ProxyError, plan: Plan, downgrade: str | None) -> None:
    """A request that got no answer: the record and the error say what was tried, as a success's do."""
    record.status, record.error = exc.status, exc.code
    exc.request_id = record.request_id
    record.attempts = list(exc.attempts)
    exc.proxy_headers = _proxy_headers(record.request_id, plan, record.attempts, downgrade)
    exc.proxy_headers.pop("x-proxy-model", None)  # nobody answered
    record.route = exc.proxy_headers["x-proxy-route"]


def _fill_from_payload(record: RequestRecord, payload: dict[str, Any]) -> None:
    record.usage = Usage.from_payload(payload.get("usage"))
    record.note_origin(payload)


def _proxy_headers(request_id: str, plan: Plan, attempts: list[Attempt], downgrade: str | None) -> dict[str, str]:
    headers = {
        "x-request-id": request_id,
        "x-proxy-virtual-model": header_value(plan.requested),
        "x-proxy-attempts": str(len(attempts)),
        "x-proxy-route": header_value(route_header(plan, attempts), 2048),
    }
    if attempts:
        headers["x-proxy-model"] = attempts[-1].target.model
    if downgrade:
        headers["x-proxy-downgrade"] = downgrade
    return headers


def route_header(plan: Plan, attempts: list[Attempt]) -> str:
    """e.g. `auto>cheap: mistralai/mistral-7b-instruct=http_503,http_503 meta-llama/llama-3.1-8b-instruct=ok`."""
    outcomes: dict[str, list[str]] = {}
    for attempt in attempts:
        outcomes.setdefault(str(attempt.target), []).append(attempt.outcome)
    head = plan.head()
    tried = " ".join(f"{target}={','.join(results)}" for target, results in outcomes.items())
    skipped = "".join(f" {target}=skipped:{block.reason}" for target, block in plan.skipped)
    return f"{head}: {tried}{skipped}"


async def list_models(request: web.Request) -> web.Response:
    """With client keys configured, a key is needed, and the list holds only what it may use."""
    runtime = request.app[RUNTIME].current
    client = runtime.policy.keys.authenticate(request.headers.get("Authorization"))
    body = runtime.models_by_key.get(client.name, runtime.models_body) if client.name else runtime.models_body
    return web.Response(body=body, content_type=JSON)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type=JSON)
