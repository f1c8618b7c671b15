"""The fault drill's cluster and load (scripts/fault_drill.py): a real `baton serve`, its
children found through /proc, and a steady load of streaming requests that records each
outcome."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import redis

from baton.router.registry import WorkerInfo
from baton.services.cluster_auth import CLUSTER_TOKEN_ENV, REDIS_URL_ENV

WORKER_IDS = ("prefill-0", "prefill-1", "decode-2", "decode-3")
NUM_THREADS = 8
MAX_TOKENS = 16
CLIENT_TIMEOUT_S = 60.0
"""The load's and the probes' client timeout: a request silent this long counts as hung."""
MAX_CONCURRENT = 64
HEADER_TIMEOUT_S = 10.0
"""The gateway's default --header-timeout-s (serve is started without the flag)."""
RECOVERY_TIMEOUT_S = 240.0
MIN_PROBES = 5
OK_AFTER_RECOVERY = 4
"""Requests that must succeed, started after the fault healed, before it counts as healed."""
STOP_TIMEOUT_S = 60.0
WORK_COUNTER = {
    "decode": "baton:generation_tokens_total",
    "prefill": "baton:prefix_cache_queries_total",  # prompt_tokens counts Generate calls only
}
LONG_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable metal "
    "type, oil-based inks and a screw press were combined in one workshop; within fifty years "
    "printers had spread across Europe, books became cheaper, and literacy rose. Summarize:"
)


# ---- the cluster ------------------------------------------------------------------------------


class Serve:
    """One `baton serve` subprocess in its own session, and what /proc and Redis say about it."""

    def __init__(self, log_dir: Path, port: int, api_key: str) -> None:
        self.log_dir, self.port, self.api_key = log_dir, port, api_key
        self.url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable, "-m", "baton.services.cli", "serve",
            "--num-prefill", "2", "--num-decode", "2", "--device", "cpu", "--dtype", "float32",
            "--kv-cache-memory-mb", "96", "--port", str(port), "--log-dir", str(log_dir),
            "--inter-token-timeout-s", "5", "--max-concurrent-requests", str(MAX_CONCURRENT),
        ]  # fmt: skip
        self.out_path = log_dir / "serve.out"
        self._out = open(self.out_path, "wb")  # noqa: SIM115 (closed in stop)
        env = dict(os.environ, BATON_API_KEY=api_key)
        self.proc = subprocess.Popen(
            cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.redis_url = ""
        self.token = ""

    def wait_serving(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while b"baton is serving" not in self.out_path.read_bytes():
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited:\n{self.out_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("serve did not start")
            time.sleep(0.5)
        environ = _environ(self.worker_pid("decode-2"))
        self.redis_url, self.token = environ[REDIS_URL_ENV], environ[CLUSTER_TOKEN_ENV]

    def children(self) -> dict[int, list[bytes]]:
        """pid → argv of every live child of serve."""
        return {pid: argv for pid, (ppid, argv) in _procs().items() if ppid == self.proc.pid}

    def worker_pid(self, worker_id: str) -> int:
        for pid, argv in self.children().items():
            if (
                b"--worker-id" in argv
                and argv[argv.index(b"--worker-id") + 1] == worker_id.encode()
            ):
                return pid
        raise LookupError(worker_id)

    def redis_pid(self) -> int | None:
        return next((p for p, argv in self.children().items() if b"redis-server" in argv[0]), None)

    def readies(self, worker_id: str) -> int:
        log = self.log_dir / f"worker-{worker_id}.log"
        return log.read_text(errors="replace").count("BATON_WORKER_READY")

    def registry(self) -> dict[str, WorkerInfo]:
        with redis.Redis.from_url(self.redis_url, socket_timeout=5) as r:
            keys = list(r.scan_iter(match="baton:worker:*"))
            values = r.mget(keys) if keys else []
        infos = {}
        for raw in values:
            with contextlib.suppress(ValueError, TypeError):
                info = WorkerInfo.from_json(raw)
                infos[info.worker_id] = info
        return infos

    def stop(self) -> dict[str, Any]:
        """Ctrl-C as a terminal sends it (SIGINT to the group), SIGKILL after STOP_TIMEOUT_S."""
        family = _descendants(self.proc.pid)
        redis_port = int(self.redis_url.rsplit(":", 1)[1].split("/")[0]) if self.redis_url else 0
        t0 = time.monotonic()
        killed = False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            code = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            killed = True
            for pid in [self.proc.pid, *family]:  # each child leads its own session
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            code = self.proc.wait(10)
        stop_s = time.monotonic() - t0
        self._out.close()
        time.sleep(1.0)  # orphans, if any, are re-parented and reaped meanwhile
        left = [pid for pid in family if _alive(pid)]
        return {
            "exit_code": code,
            "stop_s": round(stop_s, 1),
            "sigkill_needed": killed,
            "processes_before": len(family),
            "processes_left": left,
            "port_free": _port_free(self.port),
            "redis_port_free": _port_free(redis_port) if redis_port else None,
        }


def _procs() -> dict[int, tuple[int, list[bytes]]]:
    """pid → (ppid, argv) of every live process (zombies have an empty argv)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                found[int(entry.name)] = (ppid, argv)
    return found


def _descendants(root: int) -> list[int]:
    procs, found, frontier = _procs(), [], [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, (ppid, _) in procs.items() if ppid == parent]
        found += kids
        frontier += kids
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _counter(metrics_address: str, name: str) -> float:
    """The sum of a Prometheus counter on a worker's /metrics (0 when unreachable)."""
    try:
        with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name))


def _work(serve: Serve) -> dict[str, dict[str, float]]:
    """What each worker did since it last started: the evidence that prompts were prefilled
    remotely (prefill workers' lookups, KV handoffs on both sides)."""
    names = {
        "generation_tokens": "baton:generation_tokens_total",
        "prefix_cache_query_tokens": "baton:prefix_cache_queries_total",
        "kv_handoffs": "baton:kv_transfer_bytes_count",
    }
    return {
        wid: {key: _counter(info.metrics_address, name) for key, name in names.items()}
        for wid, info in sorted(serve.registry().items())
    }


# ---- the load ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    api: str
    start: float
    end: float
    kind: str
    """"ok", "hung", "HTTP <status>", "SSE error (<code>)", "connection error", "truncated"."""
    detail: str = ""


@dataclass
class Load:
    """NUM_THREADS threads of streaming chat and completions; every outcome recorded."""

    url: str
    api_key: str
    model: str = ""
    outcomes: list[Outcome] = field(default_factory=list)
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for i in range(NUM_THREADS):
            self.threads.append(threading.Thread(target=self._run, args=(i,), daemon=True))
            self.threads[-1].start()
        return self

    def _run(self, i: int) -> None:
        client = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.api_key, timeout=CLIENT_TIMEOUT_S, max_retries=0
        )
        n = 0
        while not self.stop.is_set():
            n += 1
            api = "chat" if (i + n) % 2 else "completion"
            # Two of three prompts are over 32 tokens (remote prefill), one is short (local).
            # The unique head keeps the prefix cache from covering them.
            prompt = f"Request {i}-{n}. " + (LONG_TEXT if n % 3 else "Say hello.")
            with self.lock:
                self.in_flight += 1
            start = time.monotonic()
            kind, detail, wait_s = _request(client, self.model, api, prompt)
            with self.lock:
                self.in_flight -= 1
                self.outcomes.append(Outcome(api, start, time.monotonic(), kind, detail))
            if wait_s:
                self.stop.wait(wait_s)

    def ok_started_after(self, t: float) -> int:
        with self.lock:
            return sum(o.kind == "ok" and o.start >= t for o in self.outcomes)

    def wait_ok_after(self, t: float, count: int, timeout_s: float) -> bool:
        return _wait(lambda: self.ok_started_after(t) >= count, timeout_s)

    def snapshot(self) -> list[Outcome]:
        with self.lock:
            return list(self.outcomes)

    def finish(self) -> int:
        """Stops the threads; the number still stuck after two client timeouts (hung)."""
        self.stop.set()
        deadline = time.monotonic() + 2 * CLIENT_TIMEOUT_S
        for t in self.threads:
            t.join(max(deadline - time.monotonic(), 0.1))
        return sum(t.is_alive() for t in self.threads)


def _request(client: openai.OpenAI, model: str, api: str, prompt: str) -> tuple[str, str, float]:
    """One streaming request: (kind, detail, seconds to wait before the next)."""
    finish = None
    try:
        if api == "chat":
            messages: list[Any] = [{"role": "user", "content": prompt}]
            stream: Any = client.chat.completions.create(
                model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
            )
        else:
            stream = client.completions.create(
                model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
            )
        for chunk in stream:
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
    except openai.APITimeoutError:
        return "hung", f"no answer for {CLIENT_TIMEOUT_S:.0f} s", 0.0
    except openai.RateLimitError as e:
        retry = float(e.response.headers.get("retry-after") or 1)
        return "HTTP 429", str(e)[:200], retry
    except openai.APIStatusError as e:
        return f"HTTP {e.status_code}", str(e)[:200], 0.5
    except openai.APIConnectionError as e:
        return "connection error", repr(e.__cause__ or e)[:200], 0.5
    except openai.APIError as e:  # an SSE error event after the 200
        body = e.body if isinstance(e.body, dict) else {}
        code = body.get("code") or body.get("type") or "?"
        return f"SSE error ({code})", str(e)[:200], 0.0
    if finish in ("stop", "length"):
        return "ok", "", 0.0
    return "truncated", f"stream ended with finish_reason={finish}", 0.0


def _wait(cond: Callable[[], bool], timeout_s: float, step_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if cond():
                return True
        time.sleep(step_s)
    return False


# ---- faults -----------------------------------------------------------------------------------
