"""The client measures what a server does: a fake OpenAI server streams on a known schedule.

The server sends its first token TTFT_S after the request and one chunk every ITL_S after
that (absolute times, so its own sleeps do not drift), with a usage chunk. The measured
medians must match the schedule within a tolerance that survives a noisy 2-core machine.
Arrival tests use seeded samples only, no clock.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import statistics
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from baton.loadgen.arrivals import arrival_offsets_s, interarrival_s, parse_rates
from baton.loadgen.client import ClientConfig, request_body, send_request
from baton.loadgen.metrics import summarize, tpot_s
from baton.loadgen.records import Session, Turn
from baton.loadgen.runner import RunConfig, run_sessions

TTFT_S = 0.200
ITL_S = 0.030
TOL_S = 0.015


class FakeServer:
    """Streams max_tokens tokens on the schedule; counts requests in flight; keeps bodies."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak_in_flight = 0
        self.bodies: list[dict[str, Any]] = []
        self.app = FastAPI()
        self.app.post("/v1/completions")(self._completions)
        self.app.post("/v1/chat/completions")(self._chat)
        self.app.get("/v1/models")(lambda: {"data": [{"id": "fake-model"}]})

    async def _completions(self, request: Request) -> Any:
        return await self._serve(request, chat=False)

    async def _chat(self, request: Request) -> Any:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, chat: bool) -> Any:
        t0 = time.perf_counter()
        body = await request.json()
        self.bodies.append(body)
        model = body.get("model")
        if model == "overloaded":
            return JSONResponse({"error": {"message": "busy"}}, status_code=429)
        n = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        per_chunk = int(body.get("tokens_per_chunk", 1))
        ttft = float(body.get("ttft_s", TTFT_S))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

        async def events() -> AsyncIterator[str]:
            try:
                if chat:  # role-only first chunk, as OpenAI sends: not a token
                    yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
                num_chunks = math.ceil(n / per_chunk)
                for k in range(num_chunks):
                    due = t0 + ttft + k * ITL_S
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                    text = "".join(f"t{k * per_chunk + j} " for j in range(per_chunk))
                    if model == "broken" and k == 2:
                        yield _sse({"error": {"message": "worker died"}})
                        break
                    choice = {"delta": {"content": text}} if chat else {"text": text}
                    yield _sse({"choices": [{"index": 0, **choice}]})
                usage = {"prompt_tokens": 7, "completion_tokens": n}
                yield _sse({"choices": [], "usage": usage})
                yield "data: [DONE]\n\n"
            finally:
                self.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeServer, str]]:
    server = FakeServer()
    port = _free_port()
    uv = uvicorn.Server(
        uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert uv.started
    yield server, f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(10)


def _send(url: str, body: dict[str, Any], chat: bool = False, timeout_s: float = 30.0):
    cfg = ClientConfig(
        base_url=url,
        endpoint="/v1/chat/completions" if chat else "/v1/completions",
        model=str(body.pop("model", "fake-model")),
        timeout_s=timeout_s,
        extra_body=body,
    )

    async def go():  # type: ignore[no-untyped-def]
        async with httpx.AsyncClient(trust_env=False) as http:
            return await send_request(
                http, cfg, request_body(cfg, "hello", int(body.get("n", 12))), run_start=0.0
            )

    return asyncio.run(go())


@pytest.mark.parametrize("chat", [False, True])
def test_ttft_and_itl_match_the_server_schedule(fake: tuple[FakeServer, str], chat: bool) -> None:
    _, url = fake
    recs = [_send(url, {"n": 12}, chat=chat) for _ in range(3)]
    assert all(r.success for r in recs), [r.error for r in recs]
    assert statistics.median(r.ttft_s for r in recs) == pytest.approx(TTFT_S, abs=TOL_S)
    gaps = [g for r in recs for g in r.itl_s]
    assert len(gaps) == 3 * 11  # one gap per content chunk after the first
    assert statistics.median(gaps) == pytest.approx(ITL_S, abs=TOL_S)
    r = recs[0]
    assert (r.prompt_len, r.output_len, r.usage_reported) == (7, 12, True)  # server usage
    assert r.text.startswith("t0 t1 ")
    assert tpot_s(r) == pytest.approx(ITL_S, abs=TOL_S)
    assert r.e2el_s == pytest.approx(TTFT_S + 11 * ITL_S, abs=3 * TOL_S)


def test_several_tokens_per_chunk_tpot_counts_tokens(fake: tuple[FakeServer, str]) -> None:
    _, url = fake
    r = _send(url, {"n": 10, "tokens_per_chunk": 2})
    assert r.success and r.output_len == 10 and len(r.itl_s) == 4  # 5 chunks, 4 gaps
    assert statistics.median(r.itl_s) == pytest.approx(ITL_S, abs=TOL_S)
    # 4 gaps of 30 ms spread over 9 tokens after the first
    assert tpot_s(r) == pytest.approx(4 * ITL_S / 9, abs=TOL_S / 2)


def test_errors_are_classified(fake: tuple[FakeServer, str]) -> None:
    _, url = fake
    busy = _send(url, {"model": "overloaded"})
    assert (busy.success, busy.error_kind, busy.error) == (False, "http_429", "busy")
    broken = _send(url, {"model": "broken"})
    assert (broken.success, broken.error_kind) == (False, "stream_error")
    assert "worker died" in broken.error
    slow = _send(url, {"ttft_s": 5.0}, timeout_s=0.3)
    assert (slow.success, slow.error_kind) == (False, "timeout")
    assert slow.e2el_s == pytest.approx(0.3, abs=0.1)
    gone = _send(f"http://127.0.0.1:{_free_port()}", {})
    assert (gone.success, gone.error_kind) == (False, "connection")


def test_concurrency_limit_is_never_exceeded(fake: tuple[FakeServer, str]) -> None:
    server, url = fake
    server.peak_in_flight = 0
    sessions = [Session((Turn("hi", 1, 4),)) for _ in range(12)]
    cfg = ClientConfig(base_url=url, model="fake-model", extra_body={"ttft_s": 0.05})
    run = RunConfig(max_concurrency=3, progress=False)
    result = asyncio.run(run_sessions(cfg, run, sessions))
    assert len(result.records) == 12 and all(r.success for r in result.records)
    assert server.peak_in_flight == 3  # reached, never passed
    assert summarize(result.records, result.duration_s)["max_concurrent_requests"] <= 3


def test_max_duration_cuts_the_run(fake: tuple[FakeServer, str]) -> None:
    _, url = fake
    sessions = [Session((Turn("hi", 1, 200),)) for _ in range(4)]  # 6 s each
    cfg = ClientConfig(base_url=url, model="fake-model")
    run = RunConfig(request_rate=1.0, max_duration_s=1.5, progress=False, seed=1)
    t0 = time.perf_counter()
    result = asyncio.run(run_sessions(cfg, run, sessions))
    assert time.perf_counter() - t0 < 3.0
    assert all(r.error_kind == "deadline" for r in result.records)
    assert len(result.records) + result.num_not_sent == 4


def test_multi_turn_history_carries_the_replies_received(fake: tuple[FakeServer, str]) -> None:
    server, url = fake
    server.bodies.clear()
    turns = (Turn("first question", 2, 3), Turn("second question", 2, 2))
    cfg = ClientConfig(
        base_url=url,
        endpoint="/v1/chat/completions",
        model="fake-model",
        extra_body={"ttft_s": 0.01},
    )
    result = asyncio.run(run_sessions(cfg, RunConfig(progress=False), [Session(turns)]))
    assert [r.turn for r in result.records] == [0, 1]
    second = server.bodies[-1]["messages"]
    assert second == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "t0 t1 t2 "},
        {"role": "user", "content": "second question"},
    ]


def test_poisson_and_gamma_arrivals_keep_the_mean_rate() -> None:
    n = 20000
    for burstiness in (1.0, 0.5, 4.0):
        gaps = interarrival_s(n, rate=5.0, burstiness=burstiness, seed=42)
        assert gaps.mean() == pytest.approx(0.2, rel=0.03)
        # gamma with shape k has coefficient of variation 1 / sqrt(k)
        cv = gaps.std() / gaps.mean()
        assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    again = interarrival_s(100, rate=5.0, burstiness=1.0, seed=42)
    assert np.array_equal(again, interarrival_s(100, rate=5.0, burstiness=1.0, seed=42))
    offsets = arrival_offsets_s(1000, rate=10.0, seed=3)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert offsets[-1] / 999 == pytest.approx(0.1, rel=0.1)
    assert arrival_offsets_s(5, rate=math.inf) == [0.0] * 5
    assert parse_rates("1,2,4,inf") == [1.0, 2.0, 4.0, math.inf]
