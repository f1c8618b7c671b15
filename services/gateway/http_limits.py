"""GatewayLimits enforced: admission, body and head deadlines, head size (limits.py says what).

Each limit sits where what it limits can be seen:
- ASGI middlewares over the app. `AdmissionMiddleware` counts the generation requests in
  flight and answers those over the limit with 429; `BodyTimeoutMiddleware` bounds the wait
  for each part of a request body (408).
- `LimitedH11Protocol`, uvicorn's h11 protocol with two additions for what happens before
  there is a request to hand the app. A deadline on the request head: uvicorn's
  timeout_keep_alive runs only between requests, so a client that connects and sends nothing,
  or dribbles a head a byte at a time, is never timed out (slowloris). And a cap on the whole
  head: h11 refuses an *incomplete* head over its buffer limit, but takes a complete head of
  any size that arrives in one read (up to 256 KiB on loopback), and uvicorn answers every
  protocol error with a plain-text 400; here an oversize head gets 431, and every protocol
  error OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ClassVar

import h11
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from baton.services.gateway.errors import (
    APIError,
    bad_request,
    error_json,
    header_too_large,
    plain_error_response,
    request_timeout,
    too_many_requests,
)
from baton.services.gateway.limits import GatewayLimits

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
"""The routes admission counts: the ones that hold a worker's capacity while they run."""


def route_path(scope: Scope) -> str:
    """The path inside the app, without the prefix it is mounted under (Starlette's Mount
    keeps the full path and moves the prefix into root_path)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


# ---- ASGI: admission and the body deadline


class AdmissionMiddleware:
    """At most `max_concurrent_requests` generation requests in flight; 429 beyond.

    A request counts from its arrival until the app returns: for a stream, when the stream
    ends or its client leaves (Starlette's StreamingResponse returns then). The count is only
    touched on the event loop's thread, so it needs no lock.
    """

    def __init__(self, app: ASGIApp, limits: GatewayLimits, on_reject: Callable[[], Any]) -> None:
        self.app = app
        self.limit = limits.max_concurrent_requests
        self.retry_after_s = limits.retry_after_s
        self.on_reject = on_reject
        self.num_in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or route_path(scope) not in GENERATION_PATHS
        ):
            await self.app(scope, receive, send)
            return
        if self.num_in_flight >= self.limit:
            self.on_reject()
            refusal = plain_error_response(too_many_requests(self.limit, self.retry_after_s))
            await refusal(scope, receive, send)
            return
        self.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.num_in_flight -= 1


class BodyTimeoutMiddleware:
    """A request body whose next part takes longer than `body_timeout_s` ends in 408.

    Only while body is still due: once its last part is in, receive() is left alone, since
    then it waits for the client's disconnect for as long as a response streams.
    """

    def __init__(self, app: ASGIApp, limits: GatewayLimits) -> None:
        self.app = app
        self.timeout_s = limits.body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_due = True

        async def receive_in_time() -> Message:
            nonlocal body_due
            if not body_due:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                # Raised into the handler reading the body: errors.py renders it, and its
                # Connection: close makes uvicorn drop the connection after the 408.
                raise request_timeout(
                    f"The request body stalled for more than {self.timeout_s:g} s."
                ) from None
            body_due = message["type"] == "http.request" and bool(message.get("more_body"))
            return message

        await self.app(scope, receive_in_time, send)


# ---- HTTP/1.1: the request head


def head_bytes(request: h11.Request) -> int:
    """The size of the head h11 parsed `request` from (to a few bytes: h11 strips spaces)."""
    line = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers) + 2


class HeadLimitedConnection(h11.Connection):
    """h11's server side, with a cap on a whole request head, however it arrived, and the
    last protocol error kept for the response (uvicorn only logs that there was one)."""

    def __init__(self, max_head_bytes: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self.max_head_bytes = max_head_bytes
        self.error: h11.RemoteProtocolError | None = None

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as e:
            self.error = e
            raise
        if isinstance(event, h11.Request) and head_bytes(event) > self.max_head_bytes:
            # The request is parsed, so h11 lets a response follow; uvicorn sends it.
            self.error = h11.RemoteProtocolError("request head too large", error_status_hint=431)
            raise self.error
        return event


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head and a cap on its size.

    The deadline runs from the connection's start (a client that never sends a byte) and from
    the first byte of each later head; it stops when the head is complete. Between requests
    uvicorn's own keep-alive timeout applies. Set the class attributes in a subclass
    (`h11_protocol`): uvicorn builds one instance per connection from the class.
    """

    max_header_bytes: ClassVar[int] = GatewayLimits.max_header_bytes
    header_timeout_s: ClassVar[float] = GatewayLimits.header_timeout_s

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_conn = HeadLimitedConnection(self.max_header_bytes)
        self.conn = self.head_conn
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        # After every read: a head in progress keeps (or starts) its deadline; a complete one
        # stops it until the first byte of the next.
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()
        elif self.head_timer is None and self.conn.trailing_data[0]:
            self._arm_head_timer()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to every h11 error; answer with the status h11 hints at instead.
        error = self.head_conn.error
        if error is not None and error.error_status_hint == 431:
            self.send_error(header_too_large(self.max_header_bytes))
        else:
            # h11's words name the fault; cut, since they may quote the client's bytes
            self.send_error(bad_request(f"Invalid HTTP request: {str(error or msg)[:200]}"))

    def send_error(self, err: APIError) -> None:
        """err in OpenAI's error JSON, then close the connection."""
        body = error_json(err)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        reason = STATUS_PHRASES[err.status_code]
        events = (
            h11.Response(status_code=err.status_code, headers=headers, reason=reason),
            h11.Data(data=body),
            h11.EndOfMessage(),
        )
        try:
            for event in events:
                data = self.conn.send(event)
                if data:
                    self.transport.write(data)
        except h11.LocalProtocolError:
            pass  # a response is already under way: closing is all that is left
        self.transport.close()

    def _arm_head_timer(self) -> None:
        self.head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:
            timeout = f"{self.header_timeout_s:g} s"
            self.send_error(request_timeout(f"The request head took more than {timeout}."))
        else:
            self.transport.close()  # nothing was asked: nobody to answer


def h11_protocol(limits: GatewayLimits) -> type[LimitedH11Protocol]:
    """The protocol class for uvicorn's `http=`, with limits' head size and deadline."""

    class Protocol(LimitedH11Protocol):
        max_header_bytes = limits.max_header_bytes
        header_timeout_s = limits.header_timeout_s

    return Protocol


def server_config(
    app: ASGIApp, host: str, port: int, limits: GatewayLimits, log_level: str = "warning"
) -> uvicorn.Config:
    """uvicorn's Config for the gateway: h11 with limits' head size and deadline, and no
    WebSockets (the gateway serves none, so an upgrade request stays plain HTTP)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=h11_protocol(limits),
        ws="none",
        h11_max_incomplete_event_size=limits.max_header_bytes,
        log_level=log_level,
        timeout_graceful_shutdown=5,
    )
