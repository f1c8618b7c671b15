"""The gateway's OpenAI API, with the official `openai` client as the oracle (and httpx for errors).

One SmolLM2 engine (fp32, CPU) behind one uvicorn server for the whole module. Extra apps are
mounted on the same server (same event loop, which the engine's thread reports to): one with
API keys, and two over fake backends that fail the way an overloaded or empty cluster does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Mount

from baton.proto import worker_pb2 as pb
from baton.services.gateway.app import build_app
from baton.services.gateway.backend import (
    Backend,
    BackendError,
    BackendOverloaded,
    BackendUnavailable,
)
from baton.services.local_backend import LocalBackend
from baton.services.redis_server import free_port

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 512
API_KEY = "sk-test-key"
PARIS = [{"role": "user", "content": "What is the capital of France?"}]


class FailingBackend(Backend):
    """A cluster that cannot take requests: generate raises before the first message."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        raise self.error
        yield pb.GenerateResponse()  # unreachable: makes this an async generator

    async def abort(self, request_ids: list[str]) -> None:
        pass

    async def ready(self) -> bool:
        return False


class BreakingBackend(FailingBackend):
    """Streams one token, then fails: the client already has its 200 and sees an SSE error."""

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        yield pb.GenerateResponse(
            request_id=request.request_id,
            sequences=[pb.SequenceDelta(index=0, token_ids=[504])],
            num_prompt_tokens=len(request.prompt_token_ids),
        )
        raise self.error


@dataclass
class Gateway:
    url: str
    backend: LocalBackend
    model: str
    client: openai.OpenAI

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Until the engine has no streams and no requests; then check its block invariants."""
        engine = self.backend.engine
        deadline = time.monotonic() + timeout_s
        # Ask the engine thread itself: AsyncEngine.stats() is only refreshed by a step, and
        # an abort leaves the engine idle without another one.
        busy = lambda core: core.has_unfinished()
        while engine.num_streams or self.backend.call_threadsafe(busy):
            assert time.monotonic() < deadline, f"still busy: {engine.num_streams} streams"
            time.sleep(0.05)
        self.backend.call_threadsafe(lambda core: core.check_integrity(expect_idle=True))


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    backend = LocalBackend.create(dtype="float32", max_model_len=MAX_MODEL_LEN)
    tok, model = backend.tokenizer, backend.model_id

    def app_over(b: Backend, **kwargs: Any) -> Any:
        return build_app(b, tok, model, backend.max_model_len, **kwargs)

    root = Starlette(
        routes=[
            Mount("/keyed", app_over(backend, api_keys=[API_KEY])),
            Mount("/overloaded", app_over(FailingBackend(BackendOverloaded("queues full", 3)))),
            Mount("/unavailable", app_over(FailingBackend(BackendUnavailable("no workers", 2)))),
            Mount("/broken", app_over(BreakingBackend(BackendError("worker lost")))),
            Mount("/buggy", app_over(FailingBackend(RuntimeError("a bug")))),
            Mount("/", app_over(backend)),
        ]
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(root, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/health").status_code == 200  # also starts the engine thread
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    gateway = Gateway(url, backend, model, client)
    try:
        yield gateway
        gateway.wait_idle()
    finally:
        server.should_exit = True
        thread.join(10)


def _chat(gw: Gateway, **kwargs: Any) -> Any:
    kwargs.setdefault("messages", PARIS)
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 16)
    return gw.client.chat.completions.create(model=gw.model, **kwargs)


# ---- the openai client ----------------------------------------------------------------------


def test_chat_answers_and_stream_matches(gw: Gateway) -> None:
    whole = _chat(gw, max_tokens=24)
    text = whole.choices[0].message.content
    assert "Paris" in text
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(_chat(gw, max_tokens=24, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.id == chunks[0].id for c in chunks)


def test_completions_text_and_token_ids_agree(gw: Gateway) -> None:
    prompt = "The capital of France is"
    by_text = gw.client.completions.create(
        model=gw.model, prompt=prompt, max_tokens=8, temperature=0
    )
    ids = gw.backend.tokenizer.encode(prompt)
    by_ids = gw.client.completions.create(model=gw.model, prompt=ids, max_tokens=8, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.choices[0].text.strip()
    assert by_text.usage.prompt_tokens == len(ids) == by_ids.usage.prompt_tokens
    echoed = gw.client.completions.create(
        model=gw.model, prompt=prompt, max_tokens=8, temperature=0, echo=True
    )
    assert echoed.choices[0].text == prompt + by_text.choices[0].text
    # Several prompts in one request: choices are numbered prompt-major, streams interleave.
    texts: dict[int, str] = {0: "", 1: "", 2: "", 3: ""}
    finished = set()
    for chunk in gw.client.completions.create(
        model=gw.model, prompt=[prompt, "The sky is"], n=2, max_tokens=4, seed=3, stream=True
    ):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason is not None:
                finished.add(c.index)
    assert finished == {0, 1, 2, 3} and all(texts.values())


def test_include_usage_reports_cached_tokens(gw: Gateway) -> None:
    prompt = "Here is a long story about a lighthouse keeper named Ada. " * 6
    usages = []
    for _ in range(2):
        chunks = list(
            gw.client.completions.create(
                model=gw.model,
                prompt=prompt,
                max_tokens=4,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        last = chunks[-1]
        assert last.choices == [] and last.usage is not None
        assert all(c.usage is None for c in chunks[:-1])
        usages.append(last.usage)
    first, second = usages
    assert second.prompt_tokens == first.prompt_tokens > 64
    assert second.completion_tokens == 4
    assert second.prompt_tokens_details.cached_tokens > 0
    assert second.prompt_tokens_details.cached_tokens % 16 == 0  # whole blocks only


def test_n_with_seed_is_reproducible(gw: Gateway) -> None:
    def run() -> list[str]:
        out = _chat(gw, n=2, seed=1234, temperature=1.0, max_tokens=8)
        assert sorted(c.index for c in out.choices) == [0, 1]
        return [c.message.content for c in sorted(out.choices, key=lambda c: c.index)]

    first = run()
    assert run() == first


def test_stop_strings_end_sequences(gw: Gateway) -> None:
    out = _chat(gw, stop=["Paris"], max_tokens=24)
    choice = out.choices[0]
    assert "Paris" not in choice.message.content
    assert choice.message.content.startswith("The capital of France is")
    assert choice.finish_reason == "stop"
    chunks = list(_chat(gw, stop=["Paris"], max_tokens=24, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    # n = 2: each sequence is aborted alone on the backend when its own stop string hits.
    many = gw.client.completions.create(
        model=gw.model, prompt="Once upon a time", n=2, seed=5, stop=["e"], max_tokens=32
    )
    for c in many.choices:
        assert "e" not in c.text
        assert c.finish_reason == "stop"
    gw.wait_idle()


def test_logprobs_shapes(gw: Gateway) -> None:
    chat = _chat(gw, logprobs=True, top_logprobs=2, max_tokens=4)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob <= 0 and entry.bytes
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-4  # greedy picks the top

    comp = gw.client.completions.create(
        model=gw.model, prompt="The sky is", max_tokens=4, temperature=0, logprobs=2
    )
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == comp.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs)


def test_max_completion_tokens_wins(gw: Gateway) -> None:
    out = _chat(gw, max_tokens=50, max_completion_tokens=3, temperature=1.0, seed=7)
    assert out.usage.completion_tokens == 3
    assert out.choices[0].finish_reason == "length"


def test_models_lists_the_model(gw: Gateway) -> None:
    models = gw.client.models.list()
    assert [m.id for m in models.data] == [gw.model]


# ---- errors (httpx) ---------------------------------------------------------------------------


def _assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers.get("x-request-id")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return dict(error)


def test_invalid_requests_are_400s_naming_the_param(gw: Gateway) -> None:
    chat = f"{gw.url}/v1/chat/completions"
    comp = f"{gw.url}/v1/completions"
    base = {"model": gw.model, "messages": PARIS}
    with httpx.Client(timeout=30) as c:
        bad_json = c.post(chat, content=b'{"model": "x", "messages": [', headers=_json())
        assert "JSON" in _assert_error(bad_json, 400)["message"]
        bad_utf8 = c.post(chat, content=b'{"model": "\xff\xfe"}', headers=_json())
        assert "UTF-8" in _assert_error(bad_utf8, 400)["message"]
        _assert_error(c.post(chat, json={**base, "temperature": "hot"}), 400, "temperature")
        _assert_error(c.post(chat, json={**base, "top_p": 7}), 400, "top_p")
        _assert_error(c.post(chat, json={**base, "messages": []}), 400, "messages")
        neg = c.post(chat, json={**base, "max_completion_tokens": -1})
        _assert_error(neg, 400, "max_completion_tokens")
        _assert_error(c.post(comp, json={"prompt": "hi", "max_tokens": -5}), 400, "max_tokens")
        _assert_error(c.post(comp, json={"prompt": [10**9]}), 400)  # outside the vocabulary
        _assert_error(c.post(comp, json={"prompt": [[1], "mixed"]}), 400, "prompt")
        tools = [{"type": "function", "function": {"name": "f"}}]
        _assert_error(c.post(chat, json={**base, "tools": tools}), 400, "tools")
        long_prompt = {"model": gw.model, "prompt": [17] * MAX_MODEL_LEN}
        err = _assert_error(c.post(comp, json=long_prompt), 400, "prompt")
        assert err["code"] == "context_length_exceeded" and "context length" in err["message"]
        missing = c.post(chat, json={**base, "model": "gpt-17"})
        assert _assert_error(missing, 404, "model")["code"] == "model_not_found"
        _assert_error(c.get(f"{gw.url}/v1/nothing-here"), 404)


def test_inputs_that_once_gave_500s_are_400s(gw: Gateway) -> None:
    chat = f"{gw.url}/v1/chat/completions"
    comp = f"{gw.url}/v1/completions"
    with httpx.Client(timeout=30) as c:
        # a lone surrogate, as JSON may escape it (the tokenizer cannot take it)
        surrogate = b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}'
        err = _assert_error(c.post(chat, content=surrogate, headers=_json()), 400)
        assert "surrogate" in err["message"]
        deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        assert (
            "nested" in _assert_error(c.post(comp, content=deep, headers=_json()), 400)["message"]
        )
        for ids in ([-1], [1, -7], [2**32 + 5]):  # protobuf's uint32 would refuse them
            err = _assert_error(c.post(comp, json={"prompt": ids, "echo": True}), 400, "prompt")
            assert "vocabulary" in err["message"]
        _assert_error(c.post(comp, json={"prompt": [[3, -1]]}), 400, "prompt")
    _completes(gw)


def test_a_body_over_the_cap_gets_413_and_the_gateway_stays_responsive(gw: Gateway) -> None:
    from baton.services.gateway.app import max_body_bytes

    cap = max_body_bytes(MAX_MODEL_LEN)
    huge = b'{"prompt": "' + b"a" * (5 * 1024**2) + b'"}'
    assert len(huge) > cap
    comp = f"{gw.url}/v1/completions"
    health: list[int] = []

    def probe() -> None:
        with httpx.Client(timeout=30) as c:
            health.extend(c.get(f"{gw.url}/health").status_code for _ in range(5))

    prober = threading.Thread(target=probe)
    with httpx.Client(timeout=60) as c:
        prober.start()
        err = _assert_error(c.post(comp, content=huge, headers=_json()), 413)
        assert err["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: the cap applies as it streams
            for i in range(0, len(huge), 1 << 16):
                yield huge[i : i + (1 << 16)]

        _assert_error(c.post(comp, content=chunks(), headers=_json()), 413)
        # under the cap but long: parsed and tokenized off the event loop, then refused (400)
        long = {"model": gw.model, "prompt": "word " * (cap // 16)}
        _assert_error(c.post(comp, json=long), 400, "prompt")
    prober.join(60)
    assert health == [200] * 5
    _completes(gw)


def _completes(gw: Gateway) -> None:
    out = gw.client.completions.create(model=gw.model, prompt="Hello", max_tokens=3)
    assert out.choices[0].text


def _json() -> dict[str, str]:
    return {"Content-Type": "application/json"}


def test_api_keys(gw: Gateway) -> None:
    url = f"{gw.url}/keyed/v1"
    body = {"model": gw.model, "messages": PARIS, "max_tokens": 2, "temperature": 0}
    with httpx.Client(timeout=30) as c:
        _assert_error(c.post(f"{url}/chat/completions", json=body), 401)
        wrong = {"Authorization": "Bearer nope"}
        _assert_error(c.post(f"{url}/chat/completions", json=body, headers=wrong), 401)
        _assert_error(c.get(f"{url}/models", headers=wrong), 401)
        assert c.get(f"{gw.url}/keyed/health").status_code == 200  # probes need no key
    keyed = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0)
    out = keyed.chat.completions.create(model=gw.model, messages=PARIS, max_tokens=2)
    assert out.usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="bad", max_retries=0).models.list()


def test_backend_failures_map_to_429_503_500(gw: Gateway) -> None:
    body = {"messages": PARIS, "max_tokens": 2}
    with httpx.Client(timeout=30) as c:
        for prefix, status, retry in (("overloaded", 429, "3"), ("unavailable", 503, "2")):
            for stream in (False, True):
                url = f"{gw.url}/{prefix}/v1/chat/completions"
                resp = c.post(url, json={**body, "stream": stream})
                _assert_error(resp, status)
                assert resp.headers["retry-after"] == retry
            assert c.get(f"{gw.url}/{prefix}/health").status_code == 503
        assert c.get(f"{gw.url}/health").status_code == 200
        broken = c.post(f"{gw.url}/broken/v1/chat/completions", json=body)
        assert "worker lost" in _assert_error(broken, 500)["message"]
        # A bug: a generic 500 (no internals), still with the error shape and X-Request-Id.
        buggy = c.post(f"{gw.url}/buggy/v1/chat/completions", json=body)
        assert _assert_error(buggy, 500)["type"] == "server_error"
    # After the 200 went out, a failure arrives as an SSE error event, which the client raises.
    client = openai.OpenAI(base_url=f"{gw.url}/broken/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError, match="worker lost"):
        list(client.chat.completions.create(model=gw.model, messages=PARIS, stream=True))


def test_request_id_is_echoed_or_made(gw: Gateway) -> None:
    body = {"model": gw.model, "messages": PARIS, "max_tokens": 2, "temperature": 0}
    with httpx.Client(timeout=30) as c:
        ok = c.post(f"{gw.url}/v1/chat/completions", json=body, headers={"X-Request-Id": "t-42"})
        assert ok.status_code == 200
        assert ok.headers["x-request-id"] == "t-42"
        assert ok.json()["id"] == "chatcmpl-t-42"
        made = c.get(f"{gw.url}/v1/models")
        assert len(made.headers["x-request-id"]) >= 16
        bad = c.post(f"{gw.url}/v1/completions", json={}, headers={"X-Request-Id": "t-43"})
        assert bad.status_code == 400 and bad.headers["x-request-id"] == "t-43"


# ---- concurrency, disconnects, metrics --------------------------------------------------------


def test_good_stream_survives_a_burst_of_bad_requests(gw: Gateway) -> None:
    expected = _chat(gw, max_tokens=20).choices[0].message.content
    result: list[str] = []

    def stream() -> None:
        chunks = _chat(gw, max_tokens=20, stream=True)
        result.append("".join(c.choices[0].delta.content or "" for c in chunks))

    thread = threading.Thread(target=stream)
    thread.start()
    bad_bodies: list[Callable[[], dict[str, Any]]] = [
        lambda: {"messages": PARIS, "temperature": -1},
        lambda: {"messages": PARIS, "n": "two"},
        lambda: {"messages": "hello"},
        lambda: {"model": "nope", "messages": PARIS},
    ]
    with httpx.Client(timeout=30) as c:
        for i in range(24):
            resp = c.post(f"{gw.url}/v1/chat/completions", json=bad_bodies[i % 4]())
            assert resp.status_code in (400, 404)
    thread.join(60)
    assert result == [expected]


def _metric_samples(gw: Gateway) -> dict[tuple[str, str | None], float]:
    text = httpx.get(f"{gw.url}/metrics", timeout=30).text
    return {
        (s.name, s.labels.get("finished_reason")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_client_disconnect_aborts_the_request(gw: Gateway) -> None:
    gw.wait_idle()
    aborted_before = _metric_samples(gw).get(("baton:request_success_total", "abort"), 0.0)
    body = {"prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True}
    with (
        httpx.Client(timeout=30) as c,
        c.stream("POST", f"{gw.url}/v1/completions", json={**body, "stream": True}) as resp,
    ):
        assert resp.status_code == 200
        events = 0
        for line in resp.iter_lines():
            events += line.startswith("data: ")
            if events == 2:
                break
    gw.wait_idle(timeout_s=5)
    # The client gives up before the first token: the response headers wait for it, and a
    # 300-token prompt takes longer than 20 ms to prefill.
    long_body = {**body, "prompt": "Tell me a long story. " * 50, "stream": True}
    with (
        httpx.Client(timeout=httpx.Timeout(30, read=0.02)) as c,
        pytest.raises(httpx.ReadTimeout),
        c.stream("POST", f"{gw.url}/v1/completions", json=long_body) as r,
    ):
        r.read()
    gw.wait_idle(timeout_s=5)
    # Non-streaming: the client gives up while the request runs.
    with httpx.Client(timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post(f"{gw.url}/v1/completions", json=body)
    gw.wait_idle(timeout_s=5)
    # Each of the three ended as an abort, not by running to max_tokens unheard.
    aborted = _metric_samples(gw)[("baton:request_success_total", "abort")]
    assert aborted == aborted_before + 3


def test_metrics_after_requests(gw: Gateway) -> None:
    _chat(gw, max_tokens=4)
    samples = _metric_samples(gw)
    assert samples[("baton:time_to_first_token_seconds_count", None)] > 0
    assert samples[("baton:inter_token_latency_seconds_count", None)] > 0
    assert samples[("baton:e2e_request_latency_seconds_count", None)] > 0
    assert samples[("baton:ttft_prefill_seconds_count", None)] > 0
    assert samples[("baton:request_success_total", "length")] > 0
    assert samples[("baton:generation_tokens_total", None)] > 0
