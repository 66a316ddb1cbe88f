"""Hostile input: whatever a client sends, the proxy answers in OpenAI's error JSON with a 4xx, makes
no 5xx of its own, and logs no traceback.

The proxy runs in a thread (its own event loop, real sockets, the emulator as its upstream) so that
plain blocking clients can drive it: hypothesis generates the requests, and http.client and raw
sockets send them byte for byte (header values that are not UTF-8 included).
FUZZ_EXAMPLES sets the number of generated requests (2,000 by default; 10,000 for a long run).
"""

from __future__ import annotations

import gzip
import http.client
import logging
import os
import socket
import sqlite3
import zlib
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.http.server import EveryFewSeconds, GuardedServer
from tests.support.gateway import proxy_config_text
from tests.support.threaded import Served, threaded_proxy

CLIENT_KEY = "fuzz-client-key"
ADMIN_KEY = "fuzz-admin-key"
KEYS = """
keys:
  - {name: fuzzer, key_env: FUZZ_CLIENT_KEY}
admin: {key_env: FUZZ_ADMIN_KEY}
server: {body_timeout_s: 5}
"""
ROUTES = [
    "/v1/chat/completions",
    "/api/v1/chat/completions",
    "/v1/route/explain",
    "/v1/models",
    "/healthz",
    "/metrics",
    "/admin/spend",
    "/admin/status",
    "/admin/reload",
    "/admin/unblock",
]
PROXY_HEADERS = ("x-request-id", "x-proxy-attempts", "x-proxy-route")


class Tracebacks(logging.Handler):
    """Every record with a traceback or at ERROR, from any logger, while the module's server runs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.bad: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.bad.append(record)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("fuzz")
    text = proxy_config_text("{emulator}") + KEYS
    tracebacks = Tracebacks()
    logging.getLogger().addHandler(tracebacks)
    try:
        with threaded_proxy(text, tmp, env={"FUZZ_CLIENT_KEY": CLIENT_KEY, "FUZZ_ADMIN_KEY": ADMIN_KEY}) as server:
            yield server
    finally:
        logging.getLogger().removeHandler(tracebacks)
    assert not tracebacks.bad, "\n".join(f"{r.name}: {r.getMessage()}" for r in tracebacks.bad[:5])
    # The server is stopped and the ledger flushed: every request it booked has a real status.
    with sqlite3.connect(tmp / "ledger.sqlite3") as db:
        zero = db.execute("SELECT count(*) FROM requests WHERE status = 0").fetchone()[0]
    assert zero == 0, f"{zero} ledger rows have status 0"


@pytest.fixture
def no_tracebacks(caplog) -> Iterator[None]:
    caplog.set_level(logging.WARNING)
    yield
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, "\n".join(f"{r.name}: {r.getMessage()}" for r in bad[:5])


def send(port: int, method: str, path: str, headers: list[tuple[str, bytes]], body: bytes) -> tuple[int, Any, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", "proxy.test")
        for name, value in headers:
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def check_answer(status: int, headers: Any, body: bytes, schemas) -> None:
    assert status < 500, (status, body[:300])
    if status >= 400:
        assert headers.get("Content-Type", "").startswith("application/json"), (status, body[:200])
        schemas.validate("ErrorResponse", orjson.loads(body))
        for name in PROXY_HEADERS:
            assert headers.get(name), (name, status, body[:200])


# ---------------------------------------------------------------- the triggers the attack run found

CHAT = {"model": "cheap", "messages": [{"role": "user", "content": "hi"}]}


def nested(depth: int) -> bytes:
    return orjson.dumps(CHAT)[:-1] + b',"x":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("depth", [65, 255, 300, 1024, 5000])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/route/explain"])
def test_deep_nesting_is_a_400(served, schemas, no_tracebacks, path, depth):
    status, headers, body = send(served.port, "POST", path, auth(), nested(depth))
    check_answer(status, headers, body, schemas)
    assert status == 400 and orjson.loads(body)["error"]["code"] in ("too_deep", None)


def test_a_666_byte_body_nested_318_deep_is_a_400(served, schemas, no_tracebacks):
    raw = b'{"model":"cheap","messages":' + b"[" * 318 + b"]" * 318 + b"}"
    assert len(raw) <= 666
    status, headers, body = send(served.port, "POST", "/v1/chat/completions", auth(), raw)
    check_answer(status, headers, body, schemas)
    assert status == 400


def test_moderate_nesting_still_serves(served, schemas, no_tracebacks):
    status, _, body = send(served.port, "POST", "/v1/chat/completions", auth(), nested(40))
    assert status == 200, body


@pytest.mark.parametrize("path", ["/v1/route/explain", "/v1/chat/completions"])
def test_a_header_that_is_not_utf8_is_a_400(served, schemas, no_tracebacks, path):
    headers = [*auth(), ("X-Task-Type", b"code\xff\xfe"), ("Content-Type", b"application/json")]
    status, answer_headers, body = send(served.port, "POST", path, headers, orjson.dumps(CHAT))
    check_answer(status, answer_headers, body, schemas)
    assert status == 400 and orjson.loads(body)["error"]["code"] == "invalid_header"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/metrics", "/admin/status"])
def test_a_key_that_is_not_utf8_is_a_401(served, schemas, no_tracebacks, path):
    headers = [("Authorization", b"Bearer \xff\xfe\x80key")]
    status, answer_headers, body = send(served.port, "GET", path, headers, b"")
    check_answer(status, answer_headers, body, schemas)
    assert status in (401, 405)


@pytest.mark.parametrize(
    "coding, payload, expected",
    [
        ("gzip", b"this is not gzip", 400),
        ("gzip", gzip.compress(orjson.dumps(CHAT))[:40], 400),  # cut short
        ("deflate", b"\x78\x9c garbage", 400),
        ("compress", orjson.dumps(CHAT), 415),
        ("gzip, gzip", gzip.compress(gzip.compress(orjson.dumps(CHAT))), 415),
        ("br", b"\x0b\x02\x80hi\x03", 400),
        ("gzip", gzip.compress(orjson.dumps(CHAT)), 200),
        ("deflate", zlib.compress(orjson.dumps(CHAT)), 200),
        ("identity", orjson.dumps(CHAT), 200),
    ],
    # Named, not by their bytes: gzip stamps the time, so the bytes differ from one collection to the next.
    ids=[
        "not-gzip",
        "gzip-cut",
        "deflate-garbage",
        "compress",
        "gzip-twice",
        "br-garbage",
        "gzip",
        "deflate",
        "identity",
    ],
)
def test_content_encoding_is_decoded_or_refused(served, schemas, no_tracebacks, coding, payload, expected):
    headers = [*auth(), ("Content-Encoding", coding.encode()), ("Content-Type", b"application/json")]
    status, answer_headers, body = send(served.port, "POST", "/v1/chat/completions", headers, payload)
    check_answer(status, answer_headers, body, schemas)
    assert status == expected, body


def test_a_gzip_bomb_is_refused_by_size(served, schemas, no_tracebacks):
    bomb = gzip.compress(b'{"model":"cheap","messages":[{"role":"user","content":"' + b"x" * 50_000_000 + b'"}]}')
    headers = [*auth(), ("Content-Encoding", b"gzip")]
    status, answer_headers, body = send(served.port, "POST", "/v1/chat/completions", headers, bomb)
    check_answer(status, answer_headers, body, schemas)
    assert status == 413


# ---------------------------------------------------------------- protocol errors aiohttp's parser refuses

PROTOCOL_CASES = {
    "oversized header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9_000 + b"\r\n\r\n",
    "oversized request line": b"GET /" + b"a" * 9_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "too many headers": b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(300)) + b"\r\n",
    "bad content-length": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "negative content-length": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "two content-lengths": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
    b"Content-Length: 2\r\n\r\nab",
    "bad chunked": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n",
    "connect": b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
    "options star": b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "absolute form": b"GET http://elsewhere.example/v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "bad method": b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad version": b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    "tls on the plain port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    "header without colon": b"GET /healthz HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n",
    "space before colon": b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n",
    "nul in header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "bare LF": b"GET /healthz HTTP/1.1\nHost: x\n\n",
}


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:  # a kept-alive connection: the answer came whole before it
            pass
    return b"".join(chunks)


@pytest.mark.parametrize("case", list(PROTOCOL_CASES))
def test_protocol_errors_are_answered_in_openai_json(served, schemas, no_tracebacks, case):
    answer = raw_exchange(served.port, PROTOCOL_CASES[case])
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert 400 <= status < 500, answer[:300]
    assert headers["content-type"].startswith("application/json"), answer[:300]
    if headers.get("transfer-encoding") != "chunked":
        schemas.validate("ErrorResponse", orjson.loads(body))
    for name in PROXY_HEADERS:
        assert headers.get(name), (name, answer[:300])


def test_a_flood_of_malformed_requests_logs_one_line_at_most(served, caplog):
    caplog.set_level(logging.WARNING, logger="orproxy")
    guard = served.runner.server
    assert isinstance(guard, GuardedServer)
    before = guard.protocol_errors
    for _ in range(50):
        raw_exchange(served.port, PROTOCOL_CASES["bad content-length"])
    assert guard.protocol_errors - before == 50
    lines = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert len(lines) <= 1, [r.getMessage() for r in lines]  # one a window, and the window may have begun earlier
    assert all(not r.exc_info for r in caplog.records)


def test_the_log_line_says_how_many_were_held_back(caplog):
    clock = [100.0]
    line = EveryFewSeconds(10.0, lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="orproxy"):
        for _ in range(50):
            line("refused a malformed request: %s", "x")
            clock[0] += 0.1
        clock[0] += 10
        line("refused a malformed request: %s", "y")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "refused a malformed request: x",
        "refused a malformed request: y (49 more like it in the last 10 s)",
    ]


# ---------------------------------------------------------------- generated requests

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=30,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]), "content": json_value}
)
FIELDS = ["model", "messages", "stream", "max_tokens", "tools", "tool_choice", "response_format", "metadata",
          "temperature", "provider", "n", "stream_options", "stop"]  # fmt: skip
chat_body = st.fixed_dictionaries(
    {
        "model": st.one_of(
            st.sampled_from(["cheap", "auto", "quality", "balanced", "code", "openai/gpt-4o-mini", "no/such-model"]),
            st.text(max_size=40),
            json_value,
        ),
        "messages": st.one_of(st.lists(message, min_size=1, max_size=3), json_value),
    },
    optional={name: json_value for name in FIELDS[2:]} | {"stream": st.booleans()},
)


def deep_body(depth: int) -> bytes:
    return nested(depth)


body_bytes = st.one_of(
    chat_body.map(orjson.dumps),
    json_value.map(orjson.dumps),
    st.integers(1, 1200).map(deep_body),
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    chat_body.map(lambda b: gzip.compress(orjson.dumps(b))),
)
header_value = st.one_of(
    st.binary(max_size=40).filter(lambda b: not any(c in b for c in b"\r\n\x00")),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(str.encode),
)
NAMED_HEADERS = ["Authorization", "X-Task-Type", "X-Request-ID", "X-Proxy-Cache", "Content-Type", "Accept",
                 "Content-Encoding", "Accept-Encoding", "Expect", "Connection"]  # fmt: skip
header = st.one_of(
    st.tuples(
        st.sampled_from(NAMED_HEADERS),
        header_value,
    ),
    st.tuples(st.from_regex(r"\AX-[A-Za-z0-9-]{1,20}\Z"), header_value),
    st.sampled_from(
        [
            ("Authorization", f"Bearer {CLIENT_KEY}".encode()),
            ("Authorization", f"Bearer {ADMIN_KEY}".encode()),
            ("Content-Encoding", b"gzip"),
            ("Content-Type", b"application/json"),
        ]
    ),
)
path = st.one_of(
    st.sampled_from(ROUTES),
    st.tuples(st.sampled_from(ROUTES), st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=20)).map(
        lambda pair: pair[0] + "?" + pair[1].replace("#", "")
    ),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=30).map(lambda t: "/" + t.replace("#", "")),
)
method = st.sampled_from(["GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))


def auth() -> list[tuple[str, bytes]]:
    return [("Authorization", f"Bearer {CLIENT_KEY}".encode())]


@pytest.mark.slow  # 2,000 requests through a real proxy and emulator: about 30 s
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(method=method, path=path, headers=st.lists(header, max_size=6), body=body_bytes)
def test_generated_requests_get_no_5xx_and_openai_shaped_refusals(served, schemas, method, path, headers, body):
    status, answer_headers, answer = send(served.port, method, path, headers, body)
    if method == "HEAD":
        assert status < 500
        return
    check_answer(status, answer_headers, answer, schemas)
