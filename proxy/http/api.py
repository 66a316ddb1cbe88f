"""The one request pipeline every client API runs through: authenticate, read, route, admit, run
the chain, relay or answer, settle. What differs between APIs (how a body is checked and measured,
where it goes upstream, how usage is reported and streams are read) is the `Api` object's
(`proxy.core.apis`). Domain errors become the API's error JSON in `proxy.http.errors`, in one place."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from proxy.cache.replay import StreamAssembler
from proxy.core.admission import Admission
from proxy.core.apis import Api
from proxy.core.breakers import BlockView, CircuitBreakers
from proxy.core.budget import Reservation
from proxy.core.errors import ModelNotFound, ProxyError
from proxy.core.features import RequestFeatures
from proxy.core.overhead import Overhead
from proxy.core.policy import Policy
from proxy.core.ratelimits import RateLimits
from proxy.core.record import Attempt, RequestRecord
from proxy.core.routing import Plan, Target, UnknownModel
from proxy.http.appkeys import RUNTIME
from proxy.http.body import read_body
from proxy.http.cached import answer_hit, key_for, store
from proxy.http.inflight import InFlight
from proxy.http.overhead import OVERHEAD
from proxy.http.proxy_headers import failed, proxy_headers
from proxy.money.accounting import Accountant
from proxy.ops.metrics import Gauges
from proxy.ops.runtime import Runtime, SharedState
from proxy.upstream.client import OpenedStream, UpstreamClient, open_stream
from proxy.upstream.executor import Answer
from proxy.upstream.relay import relay

log = logging.getLogger("orproxy")
REQUEST_ID = re.compile(r"^[\w.:\-]{1,128}$", re.ASCII)
JSON = "application/json"


class ApiHandler:
    """POST of one API (`/v1/chat/completions`, ...). Everything the config decides comes from the
    snapshot the request acquired; this object holds only the long-lived state it was built with."""

    def __init__(
        self,
        api: Api,
        state: SharedState,
        accountant: Accountant,
        gauges: Gauges,
        inflight: InFlight | None = None,
    ) -> None:
        self._api = api
        self._complete = functools.partial(_complete, path=api.path, content_key=api.content_key)
        self._open = functools.partial(open_stream, path=api.path)
        self._breakers = state.breakers
        self._ratelimits = state.ratelimits
        self._spend = state.spend
        self._accountant = accountant
        self._gauges = gauges
        self._inflight = inflight if inflight is not None else InFlight()
        self._ids = random.Random()  # request ids need to be unique, not secret: no syscall per request
        self._background: set[asyncio.Task[Any]] = set()  # cache writes after the answer went out

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self._gauges.in_flight += 1
        try:
            return await self._handle(request)
        finally:
            self._gauges.in_flight -= 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        runtimes = request.app[RUNTIME]
        runtime = runtimes.acquire()
        try:
            return await self._serve(request, runtime)
        finally:
            runtimes.release(runtime)

    async def _serve(self, request: web.Request, runtime: Runtime) -> web.StreamResponse:
        policy, api = runtime.policy, self._api
        started = time.monotonic()
        overhead = request.get(OVERHEAD)  # told of the upstream waits, for x-proxy-overhead-ms
        request_id = self._request_id(request)
        try:
            client_key = policy.keys.authenticate(api.authorization(request.headers))
            body = await read_body(request, runtime.config.max_body_bytes, runtime.config.server.body_timeout_s)
            api.check(body)
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
                api=api.name,
            )
            self._accountant.observe_refusal(refused, policy)
            raise
        model_name = body["model"]
        features = api.features(body, request.headers)
        record = RequestRecord(
            request_id,
            self._accountant.now(),
            model_name,
            None,
            features.stream,
            key_name=client_key.name,
            prompt_estimate=features.prompt_estimate,
            api=api.name,
        )
        reservation = None
        owned = False  # the upstream work runs in a task of its own, which books the request itself
        plan: Plan | None = None
        downgrade: str | None = None
        try:
            client_key.check_model(model_name)
            admission = await self._admit(runtime, client_key.name, model_name, features)
            plan, reservation, downgrade = admission.plan, admission.reservation, admission.downgrade
            record.virtual_model, record.downgrade = plan.chain_owner, admission.downgrade
            cache = runtime.cache if api.cacheable else None
            cache_key = key_for(cache, body, request.headers, plan, policy.router, runtime.config.direct_upstream)
            if cache_key is not None and cache is not None:
                hit = await cache.get(cache_key)
                if hit is not None:
                    headers = proxy_headers(request_id, plan, [], admission.downgrade)
                    response = answer_hit(request, hit, record, headers, features.stream)
                    record.latency_s = time.monotonic() - started
                    await self._accountant.settle(record, reservation, policy)
                    return response
            if features.stream:
                forwarded = api.upstream_headers(request.headers)
                open_ = self._open if forwarded is None else functools.partial(self._open, headers=forwarded)
                running = runtime.executor.run(plan, body, open_, client_key.name, api, overhead)
                opening = self._own(request, running, record)
                try:
                    streamed = await asyncio.shield(opening)
                except asyncio.CancelledError:  # the client left before the stream opened
                    owned = True
                    abandon = self._abandon_stream(opening, record, reservation, policy, started, body)
                    self._own(request, abandon, record)
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

                meter = api.meter(record, started, body)
                secrets = runtime.executor.secrets
                return await relay(
                    request,
                    streamed.result,
                    headers,
                    meter,
                    finish,
                    api=api,
                    record=record,
                    assembler=assembler,
                    secrets=secrets,
                    overhead=overhead,
                )
            forwarded = api.upstream_headers(request.headers)
            answering = self._answer(runtime, plan, body, record, admission, reservation, started, forwarded, overhead)
            owned = True
            try:
                raw, payload, headers, commit = await asyncio.shield(self._own(request, answering, record))
            except asyncio.CancelledError:  # the client left: the task still books what the answer costs
                record.client_gone = True
                raise
            if cache_key is not None:
                headers["x-proxy-cache"] = "miss"
            response = web.Response(body=raw, status=200, content_type=JSON, headers=headers)  # while it commits
            if commit is not None:  # its ledger row is committed before the answer goes out
                await self._accountant.committed(record, commit)
            if cache_key is not None and cache is not None:
                store(cache, cache_key, record, payload, self._accountant.now(), self._background)
            return response
        except ProxyError as exc:
            if plan is not None:
                failed(record, exc, plan, downgrade)
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
        forwarded: dict[str, str] | None = None,
        overhead: Overhead | None = None,
    ) -> tuple[bytes, dict[str, Any], dict[str, str], asyncio.Future[None] | None]:
        """A non-streamed answer, booked once it is in (or has failed) whether or not the client
        is still there. An answer comes with its ledger row's commit, which the handler waits for
        before it answers (awaited there, not here: one hand-over between tasks less); a failure's
        row is committed here, before the error is raised."""
        cancelled = False
        try:
            complete = self._complete if forwarded is None else functools.partial(self._complete, headers=forwarded)
            answer = await runtime.executor.run(plan, body, complete, record.key_name, self._api, overhead)
            headers = self._answered(record, record.request_id, plan, answer.target, answer.attempts, admission)
            raw, payload = answer.result
            record.usage = self._api.usage(payload)
            record.note_origin(payload)
            commit = await self._queue_booking(record, reservation, runtime.policy, started)
            return raw, payload, headers, commit
        except ProxyError as exc:
            failed(record, exc, plan, admission.downgrade)  # before the booking below: its row lists the attempts
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
        body: dict[str, Any],
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
                meter = self._api.meter(record, started, body)
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
        commit = await self._queue_booking(record, reservation, policy, started)
        if wait and commit is not None:
            await self._accountant.committed(record, commit)

    async def _queue_booking(
        self, record: RequestRecord, reservation: Reservation | None, policy: Policy, started: float
    ) -> asyncio.Future[None] | None:
        """Book the request (once); the future of its ledger row's commit."""
        if record.settled:  # booked already (an answer's booking, then `_answer`'s `finally`)
            return None
        if record.client_gone:
            record.status, record.error = 499, "client_disconnected"
        elif record.abandoned:
            record.status, record.error = 503, "shutdown"
        record.latency_s = time.monotonic() - started
        return await self._accountant.book(record, reservation, policy)

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
        headers = proxy_headers(request_id, plan, attempts, admission.downgrade)
        record.route = headers["x-proxy-route"]
        record.status = 200
        return headers

    def _blocked(self, runtime: Runtime, now: float, client: str | None) -> BlockView | None:
        return blocked(self._breakers, self._ratelimits, runtime, self._api, now, client)

    async def _admit(self, runtime: Runtime, key: str | None, model: str, features: RequestFeatures) -> Admission:
        now = self._accountant.now()
        try:
            return await self._spend.admit(runtime.policy, key, model, features, self._blocked(runtime, now, key), now)
        except UnknownModel as exc:
            raise model_not_found(exc, runtime) from None

    def _request_id(self, request: web.Request) -> str:
        """The client's X-Request-ID when it is sane, else a time-ordered id (48 bits of milliseconds,
        80 random bits): ordered ids append to the ledger's request-id index instead of touching a
        random page of it per row, which halves the ledger's write cost."""
        given = request.headers.get("X-Request-ID")
        if given and REQUEST_ID.match(given):
            return given
        return f"{time.time_ns() // 1_000_000:012x}{self._ids.getrandbits(80):020x}"


def blocked(
    breakers: CircuitBreakers, ratelimits: RateLimits, runtime: Runtime, api: Api, now: float, client: str | None
) -> BlockView | None:
    """What routing must skip for this client's request: upstreams without a key or that do not
    speak the API (per snapshot), open breakers and exhausted rate limits (live)."""
    static = runtime.static_blocks[api.name]
    open_breakers = breakers.active(now, client)
    limited = ratelimits.active(now)
    if static or open_breakers or limited:
        return BlockView(static, open_breakers, limited)
    return None


def model_not_found(exc: UnknownModel, runtime: Runtime) -> ModelNotFound:
    return ModelNotFound(
        f"The model '{exc.requested[:200]}' does not exist on this proxy. Valid virtual "
        f"models: {', '.join(exc.valid)}"
        + (", or any OpenRouter slug such as anthropic/claude-3-haiku." if runtime.config.allow_direct_models else "."),
        param="model",
    )


async def _complete(
    client: UpstreamClient,
    payload: bytes,
    model: str,
    *,
    path: str,
    content_key: str,
    headers: Mapping[str, str] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    response = await client.post(payload, stream=False, model=model, path=path, headers=headers)
    return await client.read_json(response, content_key)
