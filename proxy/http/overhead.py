"""`x-proxy-overhead-ms` on every answer of a wrapped route, and the overhead histogram.

The outermost wrapper of an API's route: it starts the request's `Overhead` (kept on the request,
where the handler hands it to the executor and the relay) and, once the handler has the answer,
sets the header on a response not sent yet (answers and errors alike). A stream's header was set
by the relay just before its headers went out; its histogram figure adds the work after that.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.core.overhead import HEADER, Overhead, milliseconds

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OVERHEAD = web.RequestKey("overhead", Overhead)  # the request's Overhead, in the request's own mapping


def timed(handler: Handler, observe: Callable[[float], None] | None = None) -> Handler:
    """Publish the overhead of `handler`'s answers; `observe` (the histogram, per API) is told each."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        overhead = request[OVERHEAD] = Overhead(time.perf_counter())
        response = await handler(request)
        now = time.perf_counter()
        if response.prepared:  # a stream: its header is out already
            seconds = overhead.total(now)
        else:
            seconds = overhead.until(now)
            response.headers[HEADER] = milliseconds(seconds)
        if observe is not None:
            observe(seconds)
        return response

    return wrapped
