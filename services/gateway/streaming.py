"""One backend request as the client sees it: token ids in, text deltas and finish reasons out.

The worker streams token ids; the gateway owns the text. Each of a request's n sequences gets an
IncrementalDetokenizer, which also matches stop strings: when one hits, the gateway aborts that
sequence on the backend ("<id>#<index>", or the whole id when n == 1) and treats it as finished,
without waiting for the backend to confirm, so a slow or lost abort never stalls the client.
A Generation ends when all its sequences have finished; closing it early (client gone) closes
the backend stream, which aborts the request everywhere (Backend contract).

It also records the request-level Prometheus series: TTFT (and its split from the worker), the
inter-token latency, e2e latency, token counts and successes by finish reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse

from baton.proto import worker_pb2 as pb
from baton.services.engine.detokenizer import IncrementalDetokenizer
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.sequence_ids import sequence_id
from baton.services.engine.tokenizer import Tokenizer
from baton.services.gateway.backend import Backend, BackendError
from baton.services.gateway.errors import ClientDisconnected
from baton.services.metrics import Metrics

T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"


def sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


@dataclass
class Choice:
    """One output sequence, in the order the API numbers them (prompt-major, then sequence)."""

    index: int
    abort_id: str
    detok: IncrementalDetokenizer
    num_tokens: int = 0
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class ChoiceDelta:
    """What one backend message changed in one choice."""

    choice: Choice
    text: str
    logprobs: list[pb.TokenLogprob]
    finish_reason: str | None


class Generation:
    """One prompt's GenerateRequest and its n choices; iterate deltas() once.

    start() pulls the first message before anything is sent to the client, so that a backend
    that cannot take the request fails the HTTP request with its own status (429/503/400)
    instead of a 200 followed by an error event.
    """

    def __init__(
        self,
        backend: Backend,
        request: pb.GenerateRequest,
        params: SamplingParams,
        tokenizer: Tokenizer,
        first_index: int,
        metrics: Metrics | None,
        arrival_s: float,
    ) -> None:
        self.backend = backend
        self.request = request
        self.metrics = metrics
        self.arrival_s = arrival_s
        """time.monotonic() when the gateway received the HTTP request."""
        prompt = list(request.prompt_token_ids)
        n = params.n
        self.choices = [
            Choice(
                first_index + i,
                sequence_id(request.request_id, i, n),
                IncrementalDetokenizer(tokenizer, prompt, params),
            )
            for i in range(n)
        ]
        self.num_prompt_tokens = len(prompt)
        self.num_cached_tokens = 0
        self._backend = backend
        self._request_id = request.request_id
        self._stream = backend.generate(request)
        self._first: pb.GenerateResponse | None = None
        self.route = ""
        """The backend's routing decision (the x-baton-route header), once started."""
        self._last_token_s: float | None = None
        self._recorded = False

    @property
    def num_generated_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.choices)

    async def start(self) -> None:
        try:
            self._first = await anext(self._stream)
        except StopAsyncIteration:
            raise BackendError("the backend ended the stream without a response") from None
        self.route = self._backend.route(self._request_id)

    async def aclose(self) -> None:
        """Close the backend stream (aborting the request if it is unfinished); idempotent."""
        self._record_end()
        await _aclose(self._stream)

    async def deltas(self) -> AsyncIterator[list[ChoiceDelta]]:
        """Per backend message, the choices it changed; ends once every choice finished."""
        try:
            if self._first is None:
                await self.start()
            msg: pb.GenerateResponse | None = self._first
            self._first = None
            while msg is not None:
                deltas, to_abort = self._apply(msg)
                if to_abort:
                    await self.backend.abort(to_abort)
                if deltas:
                    yield deltas
                if self.finished:
                    break
                msg = await anext(self._stream, None)
            if not self.finished:
                raise BackendError("the backend stream ended before every sequence finished")
        finally:
            # Closing the backend stream before the request is over aborts it (client gone).
            await self.aclose()

    def _apply(self, msg: pb.GenerateResponse) -> tuple[list[ChoiceDelta], list[str]]:
        now = time.monotonic()
        if msg.num_prompt_tokens:
            self.num_prompt_tokens = msg.num_prompt_tokens
            self.num_cached_tokens = msg.num_cached_tokens
        if any(d.token_ids for d in msg.sequences):
            self._record_token(now, msg)
        deltas: list[ChoiceDelta] = []
        to_abort: list[str] = []
        for d in msg.sequences:
            if d.index >= len(self.choices):
                raise BackendError(f"the backend sent sequence {d.index} of {len(self.choices)}")
            choice = self.choices[d.index]
            if choice.finished:
                continue  # ended here by a stop string; the backend's abort is on its way
            choice.num_tokens += len(d.token_ids)
            choice.logprobs.extend(d.logprobs)
            stop = choice.detok.update(list(d.token_ids))
            if stop is None and d.finish_reason:
                stop = choice.detok.flush()  # withheld partial characters: the text is final
            if stop is not None:
                choice.finish_reason, choice.stop_reason = "stop", stop
                if not d.finish_reason:
                    to_abort.append(choice.abort_id)
            elif d.finish_reason == "abort":
                raise BackendError(f"the backend aborted sequence {d.index}")
            elif d.finish_reason:
                choice.finish_reason = d.finish_reason
                if d.HasField("stop_token_id"):
                    choice.stop_reason = d.stop_token_id
            text = choice.detok.get_next_output_text(choice.finished, delta=True)
            if text or d.logprobs or choice.finished:
                deltas.append(ChoiceDelta(choice, text, list(d.logprobs), choice.finish_reason))
        return deltas, to_abort

    # ---- metrics -------------------------------------------------------------------------

    def _record_token(self, now: float, msg: pb.GenerateResponse) -> None:
        m = self.metrics
        if m is not None:
            if self._last_token_s is None:
                m.time_to_first_token.observe(now - self.arrival_s)
                if msg.HasField("ttft"):
                    m.ttft_routing.observe(msg.ttft.routing_s)
                    m.ttft_prefill.observe(msg.ttft.prefill_s)
                    m.ttft_transfer.observe(msg.ttft.transfer_s)
                    m.ttft_first_decode.observe(msg.ttft.first_decode_s)
            else:
                m.inter_token_latency.observe(now - self._last_token_s)
        self._last_token_s = now

    def _record_end(self) -> None:
        m = self.metrics
        if m is None or self._recorded:
            return
        self._recorded = True
        m.e2e_request_latency.observe(time.monotonic() - self.arrival_s)
        m.prompt_tokens.inc(self.num_prompt_tokens)
        m.generation_tokens.inc(self.num_generated_tokens)
        for c in self.choices:
            m.request_success(c.finish_reason or "abort").inc()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Items of several streams as they come (several prompts in one completions request).

    Closing the merged stream cancels the pending reads, which closes each stream inside
    (and so aborts its backend request).
    """
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    pending: dict[asyncio.Future[T], AsyncIterator[T]] = {
        asyncio.ensure_future(anext(s)): s for s in streams
    }
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                stream = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(stream))] = stream
                yield item
    finally:
        for task, stream in pending.items():
            if not task.done():
                task.cancel()  # the cancellation runs through the stream and closes it
            elif not task.cancelled() and task.exception() is None:
                await _aclose(stream)  # parked at a yield, holding an item nobody will take


async def _aclose(stream: AsyncIterator[object]) -> None:
    """Close an async generator typed as an AsyncIterator (Backend.generate's type)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with suppress(Exception):  # e.g. "already running": its own cancellation closes it
            await aclose()


async def run_to_end(request: Request, generations: list[Generation]) -> None:
    """Run generations to the end for a whole (non-streaming) response, or until the client
    leaves; either way every backend stream is closed on return."""

    async def drain() -> None:
        async for _ in merge([g.deltas() for g in generations]):
            pass

    try:
        await until_disconnect(request, drain())
    finally:
        await close_all(generations)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await work, but cancel it and raise ClientDisconnected if the client goes away first.

    FastAPI never cancels a handler whose client left; without this a non-streaming request (or
    a stream still waiting for its first token) would keep its worker busy for nobody. The body
    has been read already, so the next ASGI message can only be the disconnect.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise ClientDisconnected()
        return task.result()
    finally:
        task.cancel()  # no-op when done; else its cancellation closes the backend stream
        watcher.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def start_all(request: Request, generations: list[Generation]) -> None:
    """Start every generation (first message in), or none: on failure, close those started."""

    async def start() -> None:
        results = await asyncio.gather(*(g.start() for g in generations), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await close_all(generations)
            raise errors[0]

    try:
        await until_disconnect(request, start())
    except ClientDisconnected:
        await close_all(generations)
        raise


async def close_all(generations: list[Generation]) -> None:
    for g in generations:
        await g.aclose()


def event_stream(
    body: AsyncGenerator[bytes, None], generations: list[Generation]
) -> StreamingResponse:
    """An SSE response whose backend requests are closed however the response ends.

    When the client disconnects, Starlette cancels the task that iterates `body`; if that
    happened while `body` was parked at a yield (inside send), nothing would close it until
    garbage collection. The background task runs after the response in every case and closes
    the body and the backend streams (a no-op for those already finished).
    """

    async def close() -> None:
        with suppress(Exception):
            await body.aclose()
        await close_all(generations)

    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", **route_headers(generations)},
        background=BackgroundTask(close),
    )


ROUTE_HEADER = "x-baton-route"


def route_headers(generations: list[Generation]) -> dict[str, str]:
    """The x-baton-route header: each started generation's routing decision, comma-separated
    (one per prompt of a batched completion); none when the backend routes nothing."""
    routes = [g.route for g in generations if g.route]
    return {ROUTE_HEADER: ", ".join(routes)} if routes else {}
