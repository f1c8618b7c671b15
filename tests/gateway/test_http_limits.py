"""GatewayLimits at the HTTP front: admission (429), head size (431), head and body deadlines
(408 / disconnect), the body cap under load (413), $BATON_API_KEY, the gateway flags.

One SmolLM2 engine (fp32, CPU) behind one real uvicorn server built as `baton gateway` builds
it (http_limits.server_config), with short deadlines; apps with other limits or keys are
mounted beside the default one. The HTTP-level cases talk over raw sockets, so what goes on
the wire is exactly what the test wrote, and read replies with h11.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h11
import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Mount

from baton.services.cli import build_parser
from baton.services.config_cli import from_namespace
from baton.services.gateway.app import build_app, max_body_bytes
from baton.services.gateway.http_limits import server_config
from baton.services.gateway.limits import GatewayLimits
from baton.services.gateway.main import api_keys_from_env
from baton.services.local_backend import LocalBackend
from baton.services.redis_server import free_port

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256
HEADER_TIMEOUT_S = 1.5  # long enough for 256 clients of one starved process to send
BODY_TIMEOUT_S = 1.5
LIMITS = GatewayLimits(header_timeout_s=HEADER_TIMEOUT_S, body_timeout_s=BODY_TIMEOUT_S)
LIMITED = GatewayLimits(max_concurrent_requests=2, retry_after_s=7)
SINGLE_KEY = "sk-single-key"
HANG_S = 20.0
"""Socket timeout: only a hang detector, far above any deadline under test."""
LONG_STREAM = {"prompt": "Tell me a long story.", "max_tokens": 200, "ignore_eos": True}


@dataclass
class Server:
    url: str
    port: int
    backend: LocalBackend
    model: str


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    backend = LocalBackend.create(dtype="float32", max_model_len=MAX_MODEL_LEN)
    tok, model = backend.tokenizer, backend.model_id

    def app_over(**kwargs: Any) -> Any:
        return build_app(backend, tok, model, MAX_MODEL_LEN, **kwargs)

    keys = api_keys_from_env({"BATON_API_KEY": f"  {SINGLE_KEY} "})
    root = Starlette(
        routes=[
            Mount("/limited", app_over(limits=LIMITED)),
            Mount("/keyed", app_over(api_keys=keys, limits=LIMITS)),
            Mount("/", app_over(limits=LIMITS)),
        ]
    )
    port = free_port()
    server = uvicorn.Server(server_config(root, "127.0.0.1", port, LIMITS, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/health").status_code == 200  # also starts the engine thread
    try:
        yield Server(url, port, backend, model)
    finally:
        server.should_exit = True
        thread.join(10)


# ---- raw HTTP -------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def _connect(srv: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.settimeout(HANG_S)
    return sock


def _read_reply(sock: socket.socket, method: str = "POST") -> Reply | None:
    """The next response on sock, parsed by h11; None when the server closed without one."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "t")]))  # state only
    conn.send(h11.EndOfMessage())
    status, headers, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                conn.receive_data(sock.recv(65536))
            except ConnectionResetError:
                conn.receive_data(b"")
            continue
        if isinstance(event, h11.ConnectionClosed):
            return None
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return Reply(status, headers, body)


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed its side (waits up to HANG_S for it)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _assert_openai_error(status: int, body: bytes, expected: int) -> dict[str, Any]:
    assert status == expected, body
    error = httpx.Response(status, content=body).json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return dict(error)


def _head(path: str = "/health", method: str = "GET", extra: bytes = b"") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n".encode() + extra + b"\r\n"


# ---- admission ------------------------------------------------------------------------------


def _rejected(srv: Server, prefix: str) -> float:
    text = httpx.get(f"{srv.url}{prefix}/metrics", timeout=HANG_S).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "baton:request_rejected_total"
        and s.labels.get("reason") == "max_concurrent_requests"
    )


def test_requests_over_the_admission_limit_get_429_with_retry_after(srv: Server) -> None:
    base = f"{srv.url}/limited/v1"
    rejected_before = _rejected(srv, "/limited")
    with httpx.Client(timeout=HANG_S) as c1, httpx.Client(timeout=HANG_S) as c2:
        body = {**LONG_STREAM, "max_tokens": 64, "stream": True}
        with (
            c1.stream("POST", f"{base}/completions", json=body) as s1,
            c2.stream("POST", f"{base}/completions", json=body) as s2,
        ):
            lines = [s1.iter_lines(), s2.iter_lines()]
            for it in lines:  # both admitted and streaming: the limit (2) is reached
                assert next(line for line in it if line.startswith("data: "))
            with httpx.Client(timeout=HANG_S) as c:
                chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
                for resp in (
                    c.post(f"{base}/completions", json={"prompt": "hi", "max_tokens": 1}),
                    c.post(f"{base}/chat/completions", json={**chat, "stream": True}),
                ):
                    err = _assert_openai_error(resp.status_code, resp.content, 429)
                    assert err["type"] == "rate_limit_error"
                    assert resp.headers["retry-after"] == "7"
                    assert resp.headers["x-request-id"]
                # What is not a generation request is not counted.
                assert c.get(f"{srv.url}/limited/health").status_code == 200
                assert c.get(f"{base}/models").status_code == 200
            client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model=srv.model, prompt="hi", max_tokens=1)
            # The admitted streams run to their end regardless.
            for it in lines:
                assert any('"finish_reason":"length"' in line for line in it)
    assert _rejected(srv, "/limited") == rejected_before + 3
    out = openai.OpenAI(base_url=base, api_key="x", max_retries=0).completions.create(
        model=srv.model, prompt="hi", max_tokens=2
    )
    assert out.usage.completion_tokens == 2


def test_a_client_that_leaves_frees_its_admission_slot(srv: Server) -> None:
    base = f"{srv.url}/limited/v1"
    for _ in range(3):  # more times than there are slots: each departure must free one
        with (
            httpx.Client(timeout=HANG_S) as c,
            c.stream("POST", f"{base}/completions", json={**LONG_STREAM, "stream": True}) as r,
        ):
            assert next(line for line in r.iter_lines() if line.startswith("data: "))
        # A non-streaming request whose client gives up counts until it is aborted too.
        with httpx.Client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
            c.post(f"{base}/completions", json=LONG_STREAM)
    deadline = time.monotonic() + HANG_S
    with httpx.Client(timeout=HANG_S) as c:
        while True:
            ok = c.post(f"{base}/completions", json={"prompt": "hi", "max_tokens": 1})
            if ok.status_code == 200:
                break
            # The server notices a departure on its next read: allow it a moment.
            assert ok.status_code == 429 and time.monotonic() < deadline, ok.text
            time.sleep(0.05)


def test_256_concurrent_requests_under_the_default_limit_all_finish(srv: Server) -> None:
    async def run() -> list[int]:
        pool = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=pool) as c:
            body = {"prompt": "Count: 1, 2,", "max_tokens": 1}
            replies = await asyncio.gather(
                *(c.post("/v1/completions", json=body) for _ in range(256))
            )
        return [r.status_code for r in replies]

    assert asyncio.run(run()) == [200] * 256


# ---- the request head -----------------------------------------------------------------------


def test_a_100_kb_header_is_refused_with_431(srv: Server) -> None:
    big = b"X-Big: " + b"a" * 100_000 + b"\r\n"
    with _connect(srv) as sock:  # the whole head in one write: h11 alone would take it
        sock.sendall(_head(extra=big))
        reply = _read_reply(sock, "GET")
        assert reply is not None
        err = _assert_openai_error(reply.status, reply.body, 431)
        assert err["code"] == "request_header_fields_too_large"
        assert _closed(sock)
    with _connect(srv) as sock:  # dribbled: refused once the incomplete head passes the cap
        data = _head(extra=big)
        for i in range(0, len(data), 8192):
            sock.sendall(data[i : i + 8192])
            if select.select([sock], [], [], 0.01)[0]:
                break
        reply = _read_reply(sock, "GET")
        assert reply is not None
        _assert_openai_error(reply.status, reply.body, 431)
    with _connect(srv) as sock:  # under the cap: served
        sock.sendall(_head(extra=b"X-Big: " + b"a" * 60_000 + b"\r\n"))
        reply = _read_reply(sock, "GET")
        assert reply is not None and reply.status == 200


@pytest.mark.parametrize("after_a_request", [False, True], ids=["first", "kept-alive"])
def test_a_dribbled_head_is_cut_off_at_the_header_timeout(
    srv: Server, after_a_request: bool
) -> None:
    head = _head("/v1/completions", "POST", b"X-Slow: " + b"a" * 1000)
    with _connect(srv) as sock:
        if after_a_request:  # the deadline restarts with the first byte of the next head
            sock.sendall(_head())
            reply = _read_reply(sock, "GET")
            assert reply is not None and reply.status == 200
        start = time.monotonic()
        answered = False
        for byte in head:  # slowloris: a byte every 50 ms keeps the connection busy
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            if select.select([sock], [], [], 0.05)[0]:
                answered = True
                break
        assert answered, "the server let a head dribble for the whole test"
        assert time.monotonic() - start >= HEADER_TIMEOUT_S
        reply = _read_reply(sock)
        assert reply is not None
        assert _assert_openai_error(reply.status, reply.body, 408)["code"] == "request_timeout"
        assert _closed(sock)


def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(srv: Server) -> None:
    with _connect(srv) as sock:
        start = time.monotonic()
        assert _closed(sock)
        assert time.monotonic() - start >= HEADER_TIMEOUT_S


def test_a_slow_head_within_the_timeout_and_an_idle_keep_alive_are_served(srv: Server) -> None:
    head = _head()
    with _connect(srv) as sock:
        sock.sendall(head[:10])
        time.sleep(HEADER_TIMEOUT_S * 0.4)
        sock.sendall(head[10:])
        reply = _read_reply(sock, "GET")
        assert reply is not None and reply.status == 200
        # Between requests uvicorn's keep-alive timeout (5 s) applies, not the head's deadline.
        time.sleep(HEADER_TIMEOUT_S * 2)
        sock.sendall(head)
        reply = _read_reply(sock, "GET")
        assert reply is not None and reply.status == 200


# ---- the request body -----------------------------------------------------------------------


def test_a_stalled_body_gets_408_and_the_connection_closes(srv: Server) -> None:
    extra = b"Content-Type: application/json\r\nContent-Length: 1000\r\n"
    with _connect(srv) as sock:
        sock.sendall(_head("/v1/completions", "POST", extra) + b'{"prompt": "')
        reply = _read_reply(sock)
        assert reply is not None
        assert _assert_openai_error(reply.status, reply.body, 408)["code"] == "request_timeout"
        assert reply.headers["x-request-id"]
        assert _closed(sock)


def test_a_body_that_arrives_slowly_but_steadily_is_served(srv: Server) -> None:
    body = b'{"prompt": "The capital of France is", "max_tokens": 2}'
    extra = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
    with _connect(srv) as sock:
        sock.sendall(_head("/v1/completions", "POST", extra))
        for i in range(0, len(body), len(body) // 4 + 1):  # longer in all than the deadline
            time.sleep(BODY_TIMEOUT_S * 0.4)
            sock.sendall(body[i : i + len(body) // 4 + 1])
        reply = _read_reply(sock)
        assert reply is not None and reply.status == 200, reply
        assert httpx.Response(200, content=reply.body).json()["usage"]["completion_tokens"] == 2


def test_a_5_mb_body_gets_413_while_health_answers_within_100_ms(srv: Server) -> None:
    huge = b'{"prompt": "' + b"a" * (5 * 1024**2) + b'"}'
    assert len(huge) > max_body_bytes(MAX_MODEL_LEN)
    latencies_s: list[float] = []
    statuses: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=srv.url, timeout=HANG_S) as c:
            c.get("/health")  # connect first: the bound is on answering, not on connecting
            while not stop.is_set():
                start = time.monotonic()
                statuses.append(c.get("/health").status_code)
                latencies_s.append(time.monotonic() - start)
                time.sleep(0.005)

    def paced() -> Iterator[bytes]:  # no Content-Length: refused as it streams in
        for i in range(0, len(huge), 1 << 16):
            yield huge[i : i + (1 << 16)]
            time.sleep(0.002)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        while not latencies_s:
            time.sleep(0.01)
        before = len(latencies_s)
        with httpx.Client(timeout=HANG_S) as c:
            url = f"{srv.url}/v1/completions"
            headers = {"Content-Type": "application/json"}
            declared = c.post(url, content=huge, headers=headers)
            streamed = c.post(url, content=paced(), headers=headers)
        during = len(latencies_s) - before
    finally:
        stop.set()
        prober.join(HANG_S)
    for resp in (declared, streamed):
        err = _assert_openai_error(resp.status_code, resp.content, 413)
        assert err["code"] == "request_too_large"
    assert during >= 3, "no health probe overlapped the uploads"
    assert set(statuses) == {200}
    assert max(latencies_s) < 0.1, sorted(latencies_s)[-5:]


# ---- keys and flags -------------------------------------------------------------------------


def test_baton_api_key_is_accepted_alone_or_beside_baton_api_keys(srv: Server) -> None:
    assert api_keys_from_env({"BATON_API_KEY": "sk-a"}) == ("sk-a",)
    both = {"BATON_API_KEYS": "sk-a, sk-b", "BATON_API_KEY": "sk-c"}
    assert api_keys_from_env(both) == ("sk-a", "sk-b", "sk-c")
    assert api_keys_from_env({"BATON_API_KEYS": "sk-a", "BATON_API_KEY": "sk-a"}) == ("sk-a",)
    assert api_keys_from_env({"BATON_API_KEY": " "}) == ()
    base = f"{srv.url}/keyed/v1"
    keyed = openai.OpenAI(base_url=base, api_key=SINGLE_KEY, max_retries=0)
    out = keyed.completions.create(model=srv.model, prompt="Hello", max_tokens=2)
    assert out.usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0).models.list()


def test_gateway_flags_build_gateway_limits() -> None:
    args = build_parser().parse_args(
        [
            "gateway",
            "--redis-url=redis://127.0.0.1:1",
            "--max-concurrent-requests=8",
            "--retry-after-s=3",
            "--max-header-bytes=4096",
            "--header-timeout-s=2.5",
            "--body-timeout-s=4",
        ]
    )
    assert from_namespace(GatewayLimits, args) == GatewayLimits(8, 3, 4096, 2.5, 4.0)
    defaults = build_parser().parse_args(["gateway", "--redis-url=redis://127.0.0.1:1"])
    assert from_namespace(GatewayLimits, defaults) == GatewayLimits()
    with pytest.raises(ValueError):
        GatewayLimits(max_concurrent_requests=0)
