"""Fuzzing the gateway's two POST routes over real HTTP: nothing a client sends is a 5xx.

One SmolLM2 engine (fp32, CPU, a short context so no request runs long) behind a real uvicorn
server built as `baton gateway` builds it (http_limits.server_config), so the HTTP layer is
fuzzed too. Bodies come from the served /openapi.json (a small schema-to-strategy converter
below: hypothesis-jsonschema does not run on current hypothesis), from arbitrary JSON (wrong
types, huge numbers, NaN and Infinity tokens, unicode), deep nesting, random bytes, and random
headers over a raw socket. Every reply must be below 500, every 4xx OpenAI's error JSON, every
stream free of server errors; afterwards the server is healthy, answers a normal chat, and the
engine is idle with its block invariants intact.

Hypothesis runs derandomized with bounded examples, so CI sees the same inputs every run.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import h11
import httpx
import jsonschema
import openai
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_openapi

from baton.services.gateway.app import build_app
from baton.services.gateway.http_limits import server_config
from baton.services.gateway.limits import GatewayLimits
from baton.services.gateway.protocol import ChatCompletionRequest, CompletionRequest
from baton.services.local_backend import LocalBackend
from baton.services.redis_server import free_port

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 64
"""Short, so that no fuzzed request can generate for long on a CPU."""
LIMITS = GatewayLimits(header_timeout_s=2.0, body_timeout_s=2.0)
ROUTES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
ERROR_KEYS = {"message", "type", "param", "code"}


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@dataclass
class Server:
    url: str
    port: int
    backend: LocalBackend
    model: str
    client: httpx.Client
    openapi: dict[str, Any]


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    backend = LocalBackend.create(dtype="float32", max_model_len=MAX_MODEL_LEN)
    app = build_app(backend, backend.tokenizer, backend.model_id, MAX_MODEL_LEN, limits=LIMITS)
    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, LIMITS, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").status_code == 200  # also starts the engine thread
        openapi = client.get("/openapi.json").json()
        try:
            yield Server(url, port, backend, backend.model_id, client, openapi)
        finally:
            server.should_exit = True
            thread.join(10)


# ---- the oracle -----------------------------------------------------------------------------


def check_reply(status: int, content_type: str, body: bytes) -> None:
    """No 5xx; a 4xx is OpenAI's error JSON; a 200 is JSON, or SSE with no server error."""
    assert status < 500, body[:500]
    if status >= 400:
        error = json.loads(body)["error"]
        assert set(error) == ERROR_KEYS and isinstance(error["message"], str), body[:500]
        return
    assert status == 200, body[:500]
    if not content_type.startswith("text/event-stream"):
        json.loads(body)
        return
    for line in body.splitlines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            event = json.loads(line[len(b"data: ") :])
            assert event.get("error", {}).get("type") != "server_error", line[:500]


def post(srv: Server, path: str, content: bytes) -> None:
    resp = srv.client.post(path, content=content, headers={"Content-Type": "application/json"})
    check_reply(resp.status_code, resp.headers.get("content-type", ""), resp.content)


def bounded(body: Any) -> Any:
    """body with its generation lengths and choice counts cut to 2 where they are numbers, so a
    valid request finishes quickly; whatever else the fuzzer chose stays."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for key in ("max_tokens", "max_completion_tokens", "n", "best_of", "min_tokens"):
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 2:
            body[key] = 2
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 2
    return body


# ---- strategies -----------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()  # NaN and ±Infinity included: json.dumps writes them as bare tokens
    | st.text()
)


def _containers(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)


JSON_VALUES = st.recursive(SCALARS, _containers, max_leaves=12)

SCHEMA_KEYWORDS = {
    "$ref", "anyOf", "const", "enum", "type", "items", "minItems", "maxItems", "properties",
    "required", "additionalProperties", "title", "default", "description",
}  # fmt: skip


def from_schema(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid under schema, for the JSON Schema subset pydantic writes (and no more: an
    unknown keyword fails loudly, so a new kind of field is noticed here)."""
    unknown = set(schema) - SCHEMA_KEYWORDS
    assert not unknown, f"the fuzzer does not know the schema keywords {unknown}"
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        return st.deferred(lambda: from_schema(defs[name], defs))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    simple: dict[str | None, st.SearchStrategy[Any]] = {
        None: JSON_VALUES,
        "null": st.none(),
        "boolean": st.booleans(),
        "integer": st.integers(),
        "number": st.integers() | st.floats(allow_nan=False, allow_infinity=False),
        "string": st.text(max_size=40),
    }
    if kind in simple:
        return simple[kind]
    if kind == "array":
        items = from_schema(schema.get("items", {}), defs)
        low = schema.get("minItems", 0)
        return st.lists(items, min_size=low, max_size=max(low, schema.get("maxItems", 4)))
    assert kind == "object", schema
    props = {k: from_schema(v, defs) for k, v in schema.get("properties", {}).items()}
    required = set(schema.get("required", ()))
    known = st.fixed_dictionaries(
        {k: v for k, v in props.items() if k in required},
        optional={k: v for k, v in props.items() if k not in required},
    )
    extra = schema.get("additionalProperties", False)
    if isinstance(extra, dict):
        extras = st.dictionaries(st.text(max_size=8), from_schema(extra, defs), max_size=3)
        return st.builds(lambda a, b: {**b, **a}, known, extras)
    if extra is True and not props:
        return st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3)
    return known


def _request_schema(openapi: Mapping[str, Any], path: str) -> dict[str, Any]:
    body = openapi["paths"][path]["post"]["requestBody"]
    return dict(body["content"]["application/json"]["schema"])


def _field_names(openapi: Mapping[str, Any]) -> list[str]:
    schemas = openapi["components"]["schemas"]
    return sorted({k for m in ROUTES.values() for k in schemas[m.__name__]["properties"]})


def deep(depth: int, opener: str) -> bytes:
    closer = {"[": "]", '{"a":': "}"}[opener]
    return b'{"prompt": ' + (opener * depth + "1" + closer * depth).encode() + b"}"


def many_digits(num_digits: int) -> bytes:
    """An integer past Python's int_max_str_digits (4300) once num_digits is large enough."""
    return b'{"prompt": "a", "n": 1' + b"0" * num_digits + b"}"


def lone_surrogate(hex_digits: str) -> bytes:
    """A JSON escape of a UTF-16 surrogate alone (no text can hold it)."""
    return b'{"prompt": "\\u' + hex_digits.encode() + b'"}'


# ---- the schema -----------------------------------------------------------------------------


def test_openapi_json_is_valid_and_describes_both_request_bodies(srv: Server) -> None:
    validate_openapi(srv.openapi)
    schemas = srv.openapi["components"]["schemas"]
    for path, model in ROUTES.items():
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        assert _request_schema(srv.openapi, path) == ref
        jsonschema.Draft202012Validator.check_schema(schemas[model.__name__])
        assert {"model", "stream", "max_tokens"} <= set(schemas[model.__name__]["properties"])
    assert srv.client.get("/docs").status_code == 404  # docs_url stays None


# ---- fuzzing --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(ROUTES))
def test_bodies_from_the_served_schema(srv: Server, path: str) -> None:
    schemas = srv.openapi["components"]["schemas"]
    ref = _request_schema(srv.openapi, path)
    validator = jsonschema.Draft202012Validator({**ref, "components": srv.openapi["components"]})

    @fuzz_settings(60)
    @given(from_schema(ref, schemas), st.booleans())
    def run(body: dict[str, Any], served_model: bool) -> None:
        if served_model:  # else a random name: mostly the 404 for an unknown model
            body["model"] = srv.model
        body = bounded(body)
        validator.validate(body)  # the converter writes only what the schema allows ...
        ROUTES[path].model_validate(body)  # ... and the schema promises only what is parsed
        post(srv, path, json.dumps(body).encode())

    run()


@pytest.mark.parametrize("path", list(ROUTES))
def test_arbitrary_json_and_wrong_types(srv: Server, path: str) -> None:
    fields = _field_names(srv.openapi)
    valid = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}]},
        "/v1/completions": {"prompt": "Hi"},
    }[path]
    wrong_types = st.builds(
        lambda over: {**valid, "max_tokens": 2, **over},
        st.dictionaries(st.sampled_from(fields), JSON_VALUES, min_size=1, max_size=4),
    )

    @fuzz_settings(60)
    @given(wrong_types | JSON_VALUES)
    def run(body: Any) -> None:
        post(srv, path, json.dumps(bounded(body)).encode())

    run()


@pytest.mark.parametrize("path", list(ROUTES))
def test_random_bytes_deep_nesting_and_huge_numbers(srv: Server, path: str) -> None:
    raw = (
        st.binary(max_size=300)
        | st.builds(deep, st.integers(1, 50_000), st.sampled_from(["[", '{"a":']))
        | st.builds(many_digits, st.integers(1, 20_000))
        | st.builds(lone_surrogate, st.from_regex(r"\A[dD][89a-fA-F][0-9a-f]{2}\Z"))
    )

    @fuzz_settings(30)
    @given(raw)
    def run(body: bytes) -> None:
        post(srv, path, body)

    run()


HEADER_NAMES = st.from_regex(r"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}\Z").filter(
    lambda n: n.lower() not in {"content-length", "transfer-encoding", "connection", "host"}
)
HEADERS = st.lists(
    st.tuples(
        HEADER_NAMES
        | st.sampled_from(["Content-Type", "Authorization", "X-Request-Id", "Expect", "Accept"]),
        st.binary(max_size=40) | st.sampled_from([b"application/json", b"100-continue", b""]),
    ),
    max_size=6,
)


def _read_reply(sock: socket.socket) -> tuple[int, str, bytes] | None:
    """The response on sock, parsed by h11; None when the server closed without one."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("Host", "t")]))  # state only
    conn.send(h11.EndOfMessage())
    status, content_type, body = 0, "", b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                conn.receive_data(sock.recv(65536))
            except ConnectionResetError:
                conn.receive_data(b"")
        elif isinstance(event, h11.ConnectionClosed):
            return None
        elif isinstance(event, h11.Response):
            status = event.status_code
            content_type = dict(event.headers).get(b"content-type", b"").decode()
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, content_type, body


def test_random_headers_over_a_raw_socket(srv: Server) -> None:
    # Valid for either route (each ignores the other's field): the headers are what varies.
    body = json.dumps(
        {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    ).encode()

    @fuzz_settings(60)
    @given(st.sampled_from(list(ROUTES)), HEADERS)
    def run(path: str, headers: list[tuple[str, bytes]]) -> None:
        head = f"POST {path} HTTP/1.1\r\nHost: t\r\n".encode()
        head += b"".join(name.encode() + b": " + value + b"\r\n" for name, value in headers)
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
            sock.sendall(head + body)
            reply = _read_reply(sock)
        assert reply is not None, "the server closed without a reply"
        check_reply(*reply)

    run()


# ---- afterwards -----------------------------------------------------------------------------


def test_afterwards_the_server_is_healthy_and_the_engine_idle(srv: Server) -> None:
    assert srv.client.get("/health").status_code == 200
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=60)
    out = client.chat.completions.create(
        model=srv.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert out.choices[0].message.content and out.usage.completion_tokens > 0
    engine = srv.backend.engine
    deadline = time.monotonic() + 30
    while engine.num_streams or srv.backend.call_threadsafe(lambda core: core.has_unfinished()):
        assert time.monotonic() < deadline, f"still busy: {engine.num_streams} streams"
        time.sleep(0.05)
    srv.backend.call_threadsafe(lambda core: core.check_integrity(expect_idle=True))
