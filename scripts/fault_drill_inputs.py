"""The fault drill's bad inputs and strangers (scripts/fault_drill.py runs them): former 500s,
huge bodies and heads, slowloris, an admission burst, invalid requests, gRPC without the
cluster token, Redis without its password, a forged registry entry."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import redis
from fault_drill_cluster import (
    CLIENT_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    MAX_CONCURRENT,
    MIN_PROBES,
    WORKER_IDS,
    Load,
    Serve,
)

from baton.proto import worker_pb2 as pb
from baton.proto import worker_pb2_grpc as pbg
from baton.router.registry import WorkerInfo, worker_key
from baton.services.cluster_auth import TOKEN_METADATA_KEY


@dataclass
class Row:
    input: str
    expected: str
    tried: int = 0
    as_expected: int = 0
    n5xx: int = 0
    seen: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def count(self, seen: str, ok: bool, server_error: bool = False) -> None:
        self.tried += 1
        self.as_expected += ok
        self.n5xx += server_error
        self.seen[seen] += 1

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "seen": dict(self.seen)}


class Inputs:
    def __init__(self, serve: Serve, load: Load, quick: bool) -> None:
        self.serve, self.load, self.quick = serve, load, quick
        self.rows: list[Row] = []
        self.model = load.model
        auth = {"Authorization": f"Bearer {serve.api_key}"}
        self.http = httpx.Client(base_url=serve.url, headers=auth, timeout=CLIENT_TIMEOUT_S)
        self.burst_window = (0.0, 0.0)

    def row(self, name: str, expected: str) -> Row:
        print(f"[drill] input: {name}", flush=True)
        self.rows.append(Row(name, expected))
        return self.rows[-1]

    def post(self, row: Row, path: str, expect: int, times: int = 1, **kwargs: Any) -> None:
        for _ in range(times):
            try:
                status = self.http.post(path, **kwargs).status_code
            except httpx.HTTPError as e:
                row.count(type(e).__name__, False)
                continue
            row.count(str(status), status == expect, status >= 500)

    def run_all(self) -> list[Row]:
        """Every group in turn; a group the drill itself fails on becomes a row saying so."""
        reps = 2 if self.quick else 3
        groups: list[Callable[[], None]] = [
            lambda: self.former_500s(reps),
            lambda: self.big_body(reps),
            lambda: self.big_head(reps),
            self.slowloris,
            self.admission_burst,
            lambda: self.invalid(reps),
            self.grpc_without_token,
            self.redis_without_password,
            lambda: self.forged_entry(4.0 if self.quick else 8.0),
        ]
        for group in groups:
            try:
                group()
            except Exception as e:  # the drill's own failure, reported
                self.rows.append(Row("(drill error)", "-", notes=[f"{type(e).__name__}: {e}"]))
        self.http.close()
        return self.rows

    def former_500s(self, reps: int) -> None:
        chat, comp, json_type = (
            "/v1/chat/completions",
            "/v1/completions",
            {"Content-Type": "application/json"},
        )
        surrogate = b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % (
            self.model.encode()
        )
        row = self.row("former 500: lone surrogate \\ud800 in a chat message", "400")
        self.post(row, chat, 400, reps, content=surrogate, headers=json_type)
        row = self.row("former 500: 100,000-deep JSON array as the body", "400")
        deep = b"[" * 100_000 + b"]" * 100_000
        self.post(row, chat, 400, reps, content=deep, headers=json_type)
        row = self.row("former 500: completions prompt [-1]", "400")
        self.post(row, comp, 400, reps, json={"model": self.model, "prompt": [-1], "max_tokens": 4})

    def big_body(self, reps: int) -> None:
        row = self.row("5 MB body (Content-Length, and chunked)", "413; /health stays fast")
        huge = b'{"prompt": "' + b"a" * (5 * 1024**2) + b'"}'
        baseline = _health_latencies(self.serve.url, lambda: time.sleep(3.0))
        json_type = {"Content-Type": "application/json"}

        def send() -> None:
            for _ in range(reps):
                self.post(row, "/v1/completions", 413, content=huge, headers=json_type)
                chunks = (huge[i : i + 65536] for i in range(0, len(huge), 65536))
                self.post(row, "/v1/completions", 413, content=chunks, headers=json_type)

        during = _health_latencies(self.serve.url, send)
        row.notes.append(
            f"/health max {max(during, default=0):.0f} ms during ({len(during)} probes), "
            f"{max(baseline, default=0):.0f} ms before"
        )

    def big_head(self, reps: int) -> None:
        row = self.row("100 KB header", "431")
        head = (
            b"GET /v1/models HTTP/1.1\r\nHost: drill\r\n"
            + f"Authorization: Bearer {self.serve.api_key}\r\n".encode()
            + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n"
        )  # fmt: skip
        for _ in range(reps):
            status = _raw_status(self.serve.port, head)
            row.count(str(status), status == 431, status is not None and status >= 500)

    def slowloris(self, num_conns: int = 3) -> None:
        limit_s = HEADER_TIMEOUT_S + 2.0
        row = self.row(
            f"slowloris ({num_conns} connections, one header line a second)",
            f"dropped within {HEADER_TIMEOUT_S:g} s (+2 s slack)",
        )
        with futures.ThreadPoolExecutor(num_conns) as pool:
            results = list(pool.map(lambda _: _slowloris(self.serve.port), range(num_conns)))
        for dropped_s, status in results:
            seen = f"dropped after {dropped_s:.1f} s" + (f" with {status}" if status else "")
            row.count(seen, dropped_s <= limit_s, status is not None and status >= 500)

    def admission_burst(self, num: int = 200) -> None:
        row = self.row(
            f"{num} concurrent requests over --max-concurrent-requests {MAX_CONCURRENT}",
            "200 or 429 with Retry-After; some 429; no 5xx",
        )
        body = {"model": self.model, "prompt": "Say hello.", "max_tokens": 4, "temperature": 0}
        t0 = time.monotonic()
        results = asyncio.run(_burst(self.serve.url, self.serve.api_key, body, num))
        self.burst_window = (t0, time.monotonic() + 2.0)
        for status, retry_after in results:
            ok = status == 200 or (status == 429 and retry_after is not None)
            label = f"{status}" + (" with Retry-After" if status == 429 and retry_after else "")
            row.count(label, ok, isinstance(status, int) and status >= 500)
        if not row.seen.get("429 with Retry-After"):
            row.notes.append("no 429 seen: the limit was never reached")
            row.as_expected = 0

    def invalid(self, reps: int) -> None:
        chat, comp = "/v1/chat/completions", "/v1/completions"
        hi = [{"role": "user", "content": "hi"}]
        row = self.row("invalid JSON", "400")
        bad = b'{"model": "x", "messages": ['
        self.post(row, chat, 400, reps, content=bad, headers={"Content-Type": "application/json"})
        row = self.row("wrong types (temperature, messages, max_tokens, prompt)", "400")
        for body, path in (
            ({"model": self.model, "messages": hi, "temperature": "hot"}, chat),
            ({"model": self.model, "messages": "hi"}, chat),
            ({"model": self.model, "prompt": "hi", "max_tokens": "ten"}, comp),
            ({"model": self.model, "prompt": {"a": 1}}, comp),
        ):
            self.post(row, path, 400, json=body)
        row = self.row("n=1000", "400")
        self.post(row, comp, 400, reps, json={"model": self.model, "prompt": "hi", "n": 1000})
        row = self.row("max_tokens=-1", "400")
        self.post(
            row, comp, 400, reps, json={"model": self.model, "prompt": "hi", "max_tokens": -1}
        )
        row = self.row("unknown model", "404")
        self.post(row, chat, 404, reps, json={"model": "gpt-17", "messages": hi})
        for name, headers in (
            ("no API key", {}),
            ("wrong API key", {"Authorization": "Bearer nope"}),
        ):
            row = self.row(name, "401")
            with httpx.Client(base_url=self.serve.url, headers=headers, timeout=30) as c:
                for _ in range(reps):
                    for method, path in (("GET", "/v1/models"), ("POST", comp)):
                        body = {"model": self.model, "prompt": "hi"}
                        try:
                            status = c.request(method, path, json=body).status_code
                        except httpx.HTTPError as e:
                            row.count(type(e).__name__, False)
                            continue
                        row.count(str(status), status == 401, status >= 500)

    def grpc_without_token(self) -> None:
        workers = self.serve.registry()
        row = self.row(
            "raw gRPC without the cluster token (Generate, Prefill, Abort, GetLoadStats; "
            "no token and a wrong one; every worker)",
            "UNAUTHENTICATED",
        )
        control = self.row("raw gRPC Health without a token; GetLoadStats with it (control)", "OK")
        for wid in WORKER_IDS:
            with grpc.insecure_channel(workers[wid].address) as channel:
                stub = pbg.WorkerStub(channel)
                for call in _guarded_calls(stub).values():
                    for metadata in ((), ((TOKEN_METADATA_KEY, "not-the-token"),)):
                        code = _grpc_code(call, metadata)
                        row.count(code.name, code == grpc.StatusCode.UNAUTHENTICATED, _5xx(code))
                health = _grpc_code(stub.Health, pb.HealthRequest(), timeout=10)
                control.count(health.name, health == grpc.StatusCode.OK, _5xx(health))
                md = ((TOKEN_METADATA_KEY, self.serve.token),)
                stats = _grpc_code(
                    stub.GetLoadStats, pb.LoadStatsRequest(), metadata=md, timeout=10
                )
                control.count(stats.name, stats == grpc.StatusCode.OK, _5xx(stats))

    def redis_without_password(self) -> None:
        row = self.row(
            "Redis without its password (and with a wrong one)", "NOAUTH (AuthenticationError)"
        )
        url = self.serve.redis_url
        host, port = url.rsplit("@", 1)[1].split("/")[0].rsplit(":", 1)
        with redis.Redis(host=host, port=int(port), socket_timeout=5) as anonymous:
            for attempt in (
                anonymous.ping,
                lambda: anonymous.keys("baton:*"),
                lambda: anonymous.get(worker_key("decode-2")),
                lambda: anonymous.set(worker_key("decode-evil"), "{}"),
                lambda: anonymous.config_get("requirepass"),
            ):
                row.count(*_redis_refused(attempt))
        with redis.Redis(host=host, port=int(port), password="guess", socket_timeout=5) as wrong:
            row.count(*_redis_refused(wrong.ping))
        for command in (b"PING\r\n", b"KEYS baton:*\r\n"):  # the server's own words
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(command)
                reply = sock.recv(4096).decode(errors="replace").strip()
            row.count(
                f"raw {command.split()[0].decode()}: {reply[:40]}", reply.startswith("-NOAUTH")
            )

    def forged_entry(self, hold_s: float) -> None:
        row = self.row(
            "forged registry entries (Redis password, no valid proof; unsigned and signed with "
            "a wrong token) pointing at an impostor",
            "the impostor gets 0 calls",
        )
        impostor = _Impostor()
        server = grpc.server(futures.ThreadPoolExecutor(4))
        pbg.add_WorkerServicer_to_server(impostor, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        real = self.serve.registry()["decode-2"]
        forged = [
            WorkerInfo(
                worker_id=wid, address=f"127.0.0.1:{port}", role="decode", model=real.model,
                num_kv_blocks=real.num_kv_blocks * 100,  # "idle and huge": the router's favourite
                block_size=real.block_size, transport=real.transport, started_unix_s=time.time(),
            )
            for wid in ("decode-zz", "decode-zy")
        ]  # fmt: skip
        forged[1] = forged[1].signed("a-token-of-our-own")
        t0 = time.monotonic()
        with redis.Redis.from_url(self.serve.redis_url) as r:
            try:
                while time.monotonic() - t0 < hold_s:
                    for info in forged:
                        r.set(worker_key(info.worker_id), info.to_json(), px=3000)
                    time.sleep(0.5)
            finally:
                r.delete(*[worker_key(f.worker_id) for f in forged])
                server.stop(0)
        during = [o for o in self.load.snapshot() if o.end >= t0]
        for _ in forged:
            row.count(f"{len(impostor.calls)} calls", not impostor.calls)
        row.n5xx = sum(o.kind.startswith("HTTP 5") for o in during)
        row.notes.append(
            f"{sum(o.kind == 'ok' for o in during)} load requests completed in the {hold_s:g} s, "
            f"{sum(o.kind != 'ok' for o in during)} failed; impostor calls: {impostor.calls}"
        )


def _health_latencies(url: str, during: Callable[[], None]) -> list[float]:
    """/health latencies (ms), probed back to back while `during` runs (and at least
    MIN_PROBES times, the first started before `during`)."""
    done = threading.Event()
    started = threading.Event()
    latencies: list[float] = []

    def probe() -> None:
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as c:
            while not done.is_set() or len(latencies) < MIN_PROBES:
                started.set()
                t = time.perf_counter()
                with contextlib.suppress(httpx.HTTPError):
                    c.get(f"{url}/health")
                latencies.append((time.perf_counter() - t) * 1000)
                time.sleep(0.02)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    started.wait(5.0)
    try:
        during()
    finally:
        done.set()
        prober.join(CLIENT_TIMEOUT_S)
    return latencies


def _raw_status(port: int, data: bytes) -> int | None:
    """The status of the reply to raw bytes (None: closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S) as sock:
        reply = b""
        try:
            sock.sendall(data)
            while b"\r\n" not in reply:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    parts = reply.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def _slowloris(port: int) -> tuple[float, int | None]:
    """Seconds until the gateway dropped a connection that sends a header line a second."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: drill\r\n")
            for i in range(int(CLIENT_TIMEOUT_S)):
                readable, _, _ = select.select([sock], [], [], 1.0)
                if readable:
                    reply = sock.recv(65536)
                    parts = reply.split(b" ", 2)
                    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
                    return time.monotonic() - t0, status
                sock.sendall(f"X-Drip-{i}: a\r\n".encode())
        except (ConnectionResetError, BrokenPipeError):
            pass
    return time.monotonic() - t0, None


async def _burst(url: str, api_key: str, body: dict[str, Any], num: int) -> list[tuple[Any, Any]]:
    limits = httpx.Limits(max_connections=num + 10, max_keepalive_connections=0)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=CLIENT_TIMEOUT_S, limits=limits
    ) as c:

        async def one() -> tuple[Any, Any]:
            try:
                r = await c.post("/v1/completions", json=body)
            except httpx.TimeoutException:
                return "hung", None
            except httpx.HTTPError as e:
                return type(e).__name__, None
            return r.status_code, r.headers.get("retry-after")

        return await asyncio.gather(*(one() for _ in range(num)))


def _guarded_calls(stub: pbg.WorkerStub) -> dict[str, Callable[[Any], Any]]:
    return {
        "Generate": lambda md: list(
            stub.Generate(
                pb.GenerateRequest(request_id="drill", prompt_token_ids=[1, 2]),
                metadata=md,
                timeout=10,
            )
        ),
        "Prefill": lambda md: stub.Prefill(
            pb.PrefillRequest(request_id="drill"), metadata=md, timeout=10
        ),
        "Abort": lambda md: stub.Abort(
            pb.AbortRequest(request_ids=["drill"]), metadata=md, timeout=10
        ),
        "GetLoadStats": lambda md: stub.GetLoadStats(
            pb.LoadStatsRequest(), metadata=md, timeout=10
        ),
    }


def _grpc_code(call: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.StatusCode:
    """The status a call ends with (OK when it answers)."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as e:
        code: grpc.StatusCode = e.code()
        return code
    return grpc.StatusCode.OK


def _5xx(code: grpc.StatusCode) -> bool:
    """gRPC's server-error codes, counted in the 5xx column."""
    return code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS)


def _redis_refused(attempt: Callable[[], Any]) -> tuple[str, bool]:
    try:
        attempt()
    except redis.AuthenticationError as e:
        return f"AuthenticationError ({str(e)[:40]})", True
    except redis.ResponseError as e:
        return f"ResponseError ({str(e)[:40]})", "NOAUTH" in str(e)
    except redis.RedisError as e:
        return type(e).__name__, False
    return "answered", False


class _Impostor(pbg.WorkerServicer):  # type: ignore[misc]
    """A worker lookalike on loopback: records every call it gets."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def Generate(self, request: Any, context: Any) -> Iterator[Any]:
        self.calls.append("Generate")
        yield pb.GenerateResponse(request_id=request.request_id)

    def Prefill(self, request: Any, context: Any) -> Any:
        self.calls.append("Prefill")
        return pb.PrefillResponse()

    def Abort(self, request: Any, context: Any) -> Any:
        self.calls.append("Abort")
        return pb.AbortResponse()

    def GetLoadStats(self, request: Any, context: Any) -> Any:
        self.calls.append("GetLoadStats")
        return pb.LoadStats(worker_id="decode-zz")

    def Health(self, request: Any, context: Any) -> Any:
        self.calls.append("Health")
        return pb.HealthResponse(status="serving", worker_id="decode-zz", role="decode")


# ---- report -----------------------------------------------------------------------------------
