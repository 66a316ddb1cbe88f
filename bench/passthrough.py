"""The honest baseline: a bare aiohttp pass-through (no parsing, routing or accounting).

python bench/passthrough.py --port P --upstream http://127.0.0.1:E/api/v1/chat/completions --api-key K
Same loop (uvloop), no access log, one process, one shared ClientSession: what the proxy is measured against.
"""

import argparse

import aiohttp
import uvloop
from aiohttp import web

UPSTREAM, SESSION = web.AppKey("upstream", str), web.AppKey("session", aiohttp.ClientSession)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    async with request.app[SESSION].post(request.app[UPSTREAM], data=body) as upstream:
        if not upstream.content_type.startswith("text/event-stream"):  # decided by the answer: no body parsing
            return web.Response(body=await upstream.read(), status=upstream.status, content_type=upstream.content_type)
        response = web.StreamResponse(status=upstream.status, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():  # relay the bytes as they come
            await response.write(chunk)
        await response.write_eof()
        return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--api-key", default="bench-key")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}", "Content-Type": "application/json"}

    async def session(app: web.Application):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000), headers=headers) as s:
            app[SESSION] = s
            yield

    app = web.Application()
    app[UPSTREAM] = args.upstream
    app.cleanup_ctx.append(session)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
