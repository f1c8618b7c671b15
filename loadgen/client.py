"""One streamed request → one `RequestRecord`: TTFT, every inter-chunk gap, usage, errors.

Times come from `time.perf_counter` around the httpx stream: TTFT ends at the first chunk that
carries content (chat's role-only first chunk does not count), each later content chunk adds
one ITL gap (a chunk may carry several tokens; vllm counts the same way), and lengths come from
the server's usage chunk (`stream_options.include_usage`), never from counting chunks, unless
the server sends no usage. Failures are classified, not raised: http_<status>, timeout (the
request's own bound), deadline (the run's bound), connection, stream_error.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from baton.loadgen.records import RequestRecord

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"


@dataclass(frozen=True)
class ClientConfig:
    """How requests are addressed and sampled."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = COMPLETIONS_ENDPOINT
    model: str = ""
    api_key: str = ""
    timeout_s: float = 600.0
    """Bound on one request, from send to the last byte."""
    temperature: float = 0.0
    ignore_eos: bool = False
    """Ask for exactly max_tokens tokens (vLLM's extension)."""
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    @property
    def chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def request_body(
    cfg: ClientConfig, prompt: str | list[int] | list[dict[str, str]], max_tokens: int
) -> dict[str, Any]:
    """The JSON body for the configured endpoint: `prompt` is messages for chat."""
    body: dict[str, Any] = {
        "model": cfg.model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": cfg.temperature,
    }
    if cfg.chat:
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        body["messages"] = prompt
        body["max_completion_tokens"] = max_tokens
    else:
        body["prompt"] = prompt
        body["max_tokens"] = max_tokens
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    return body


def _content(chunk: Mapping[str, Any], chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if not chat:
        return str(choices[0].get("text") or "")
    delta = choices[0].get("delta") or {}
    return str(delta.get("content") or delta.get("reasoning_content") or "")


def _error_message(body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
        if isinstance(err, Mapping):
            return str(err.get("message", err))
        return str(err or body[:200].decode(errors="replace"))
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")


class _StreamError(Exception):
    pass


async def _read_stream(
    resp: httpx.Response, cfg: ClientConfig, rec: RequestRecord, sent: float
) -> None:
    """Fills rec's timings, text and usage from an SSE body; raises _StreamError."""
    last = sent
    parts: list[str] = []
    num_chunks = 0
    done = False
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators and ": keep-alive" comments
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(data)
        except ValueError as e:
            raise _StreamError(f"bad JSON in stream: {data[:80]!r}") from e
        if chunk.get("error"):
            raise _StreamError(_error_message(data.encode()))
        usage = chunk.get("usage")
        if usage:
            rec.usage_reported = True
            rec.prompt_len = int(usage.get("prompt_tokens") or 0)
            rec.output_len = int(usage.get("completion_tokens") or 0)
            details = usage.get("prompt_tokens_details") or {}
            rec.cached_tokens = int(details.get("cached_tokens") or 0)
        text = _content(chunk, cfg.chat)
        if text:
            now = time.perf_counter()
            if num_chunks == 0:
                rec.ttft_s = now - sent
            else:
                rec.itl_s.append(now - last)
            last = now
            num_chunks += 1
            parts.append(text)
    if not done:
        raise _StreamError("stream ended without [DONE]")
    rec.e2el_s = time.perf_counter() - sent
    rec.text = "".join(parts)
    if not rec.usage_reported:
        rec.output_len = num_chunks


async def send_request(
    http: httpx.AsyncClient,
    cfg: ClientConfig,
    body: Mapping[str, Any],
    *,
    run_start: float,
    prompt_len: int = 0,
    run_deadline: float | None = None,
) -> RequestRecord:
    """Stream one request; never raises for a failed request (only for cancellation).

    run_start is the run's perf_counter origin; run_deadline a perf_counter time at which the
    run ends and this request with it (error kind "deadline").
    """
    rec = RequestRecord(prompt_len=prompt_len)
    sent = time.perf_counter()
    rec.start_s = sent - run_start
    budget = cfg.timeout_s
    if run_deadline is not None:
        budget = min(budget, run_deadline - sent)
    try:
        async with asyncio.timeout(max(budget, 0.0)):
            async with http.stream(
                "POST", cfg.base_url.rstrip("/") + cfg.endpoint, json=body, headers=cfg.headers()
            ) as resp:
                if resp.status_code != 200:
                    rec.error_kind = f"http_{resp.status_code}"
                    rec.error = _error_message(await resp.aread())
                else:
                    await _read_stream(resp, cfg, rec, sent)
                    rec.success = True
    except TimeoutError:
        hit_run_bound = run_deadline is not None and time.perf_counter() >= run_deadline - 1e-3
        rec.error_kind = "deadline" if hit_run_bound and budget < cfg.timeout_s else "timeout"
        rec.error = f"no complete response after {budget:.1f} s"
    except httpx.TimeoutException as e:
        rec.error_kind, rec.error = "timeout", f"{type(e).__name__}: {e}"
    except httpx.TransportError as e:
        rec.error_kind, rec.error = "connection", f"{type(e).__name__}: {e}"
    except _StreamError as e:
        rec.error_kind, rec.error = "stream_error", str(e)
    if not rec.success:
        rec.e2el_s = time.perf_counter() - sent
    return rec
