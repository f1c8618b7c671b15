"""Run sessions against a server at one request rate (or a sweep of rates) and collect records.

Each session waits for its arrival offset, then for a concurrency slot (--max-concurrency, as
vllm's semaphore), then sends its turns one after another. A conversation's turn carries the
whole history, including the replies actually received; a failed turn ends its conversation.
--max-duration bounds the run: sessions not yet started are not sent and requests still in
flight end with error kind "deadline".
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from baton.loadgen.arrivals import arrival_offsets_s
from baton.loadgen.client import ClientConfig, request_body, send_request
from baton.loadgen.records import RequestRecord, Session


@dataclass(frozen=True)
class RunConfig:
    """How requests arrive and what bounds the run."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    max_duration_s: float | None = None
    seed: int = 0
    progress: bool = True
    initial_test: bool = True
    """Send one short request first and stop with its error if it fails (as vllm does)."""


@dataclass
class RunResult:
    """One rate's outcome: the records (in completion order) and the run's wall time."""

    records: list[RequestRecord]
    duration_s: float
    num_requests: int
    """Requests the workload held (conversation turns included)."""
    num_not_sent: int = 0
    request_rate: float = math.inf
    sessions: Sequence[Session] = field(default_factory=list)


def _http_client(cfg: ClientConfig, run: RunConfig) -> httpx.AsyncClient:
    # httpx allows 100 connections by default, which would cap concurrency silently;
    # trust_env=False keeps proxy variables from routing benchmark traffic anywhere else.
    limits = httpx.Limits(max_connections=run.max_concurrency, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), limits=limits, trust_env=False)


async def check_server(cfg: ClientConfig, session: Session) -> str:
    """ "" if one short request of the workload succeeds, else its error."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), trust_env=False) as http:
        turn = session.turns[0]
        body = request_body(cfg, turn.prompt, min(turn.output_len, 4))
        rec = await send_request(http, cfg, body, run_start=time.perf_counter())
    return "" if rec.success else f"{rec.error_kind}: {rec.error}"


async def run_sessions(cfg: ClientConfig, run: RunConfig, sessions: Sequence[Session]) -> RunResult:
    """Send every session on its schedule; return when all ended or the run's bound hit."""
    if all(s.arrival_s is not None for s in sessions):
        offsets = [float(s.arrival_s or 0.0) for s in sessions]
    else:
        offsets = arrival_offsets_s(len(sessions), run.request_rate, run.burstiness, run.seed)
    total = sum(len(s.turns) for s in sessions)
    records: list[RequestRecord] = []
    not_sent = 0
    slots = asyncio.Semaphore(run.max_concurrency) if run.max_concurrency else None
    bar = tqdm(total=total, disable=not run.progress, file=sys.stderr, unit="req")

    async with _http_client(cfg, run) as http:
        t0 = time.perf_counter()
        deadline = t0 + run.max_duration_s if run.max_duration_s else None

        async def one_session(index: int, session: Session) -> None:
            nonlocal not_sent
            delay = offsets[index] - (time.perf_counter() - t0)
            if deadline is not None:
                delay = min(delay, deadline - time.perf_counter())
            if delay > 0:
                await asyncio.sleep(delay)
            async with slots if slots is not None else contextlib.nullcontext():
                history: list[dict[str, str]] = []
                for j, turn in enumerate(session.turns):
                    if deadline is not None and time.perf_counter() >= deadline:
                        not_sent += len(session.turns) - j
                        return
                    prompt: str | list[int] | list[dict[str, str]] = turn.prompt
                    if cfg.chat:
                        history.append({"role": "user", "content": str(turn.prompt)})
                        prompt = list(history)
                    rec = await send_request(
                        http,
                        cfg,
                        request_body(cfg, prompt, turn.output_len),
                        run_start=t0,
                        prompt_len=turn.prompt_len,
                        run_deadline=deadline,
                    )
                    rec.session, rec.turn = index, j
                    records.append(rec)
                    bar.update(1)
                    if not rec.success:
                        not_sent += len(session.turns) - j - 1
                        return
                    history.append({"role": "assistant", "content": rec.text})

        await asyncio.gather(*(one_session(i, s) for i, s in enumerate(sessions)))
        duration = time.perf_counter() - t0
    bar.close()
    return RunResult(
        records=records,
        duration_s=duration,
        num_requests=total,
        num_not_sent=not_sent,
        request_rate=run.request_rate,
        sessions=sessions,
    )


def run_rate(cfg: ClientConfig, run: RunConfig, sessions: Sequence[Session]) -> RunResult:
    """One rate, with the initial check first; raises RuntimeError if the check fails."""
    if run.initial_test and sessions:
        error = asyncio.run(check_server(cfg, sessions[0]))
        if error:
            raise RuntimeError(f"initial test request failed: {error}")
    return asyncio.run(run_sessions(cfg, run, sessions))


def run_sweep(
    cfg: ClientConfig,
    run: RunConfig,
    rates: Sequence[float],
    build_sessions: Callable[[int], Sequence[Session]],
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Each rate in turn. Rate k draws its prompts with seed + k: reusing one rate's prompts
    at the next would turn the second run into prefix-cache hits."""
    results = []
    for k, rate in enumerate(rates):
        sessions = build_sessions(run.seed + k)
        step = RunConfig(
            request_rate=rate,
            burstiness=run.burstiness,
            max_concurrency=run.max_concurrency,
            max_duration_s=run.max_duration_s,
            seed=run.seed + k,
            progress=run.progress,
            initial_test=run.initial_test and k == 0,
        )
        result = run_rate(cfg, step, sessions)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
