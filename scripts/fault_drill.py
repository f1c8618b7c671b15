"""Fault drill: a real `baton serve` under load, faults injected one after another, bad inputs.

    .venv/bin/python scripts/fault_drill.py [--out DIR] [--quick]

Starts `baton serve` (2 prefill + 2 decode workers, CPU, float32, an API key in $BATON_API_KEY,
--inter-token-timeout-s 5, --max-concurrent-requests 64) in its own session, keeps 8 threads of
streaming chat and completions from the official `openai` client running (max_tokens 16,
temperature 0; most prompts over 32 tokens, so they are prefilled remotely), then:

- inputs (docs/design.md §24, docs/gateway.md): the inputs that once gave 500s, a 5 MB body
  (with /health timed meanwhile), a 100 KB head, slowloris, 200 requests at once over the
  admission limit, invalid requests, keys; raw gRPC to the workers without the cluster token,
  Redis without its password, a forged registry entry pointing at an impostor we run;
- faults (§25), each timed from injection until the cluster is whole again (the restarted
  worker printed BATON_WORKER_READY again, re-registered and does work; requests succeed):
  kill -9 of a decode and a prefill worker, SIGSTOP of a decode worker, Redis killed five times
  in a row, both prefill workers killed at once; last, Ctrl-C (SIGINT to serve's group) with
  the load stopped: no process may be left and the port must be free.

A load request either completes (a finish_reason), fails cleanly (an HTTP status or an SSE error
event) or hangs (nothing for 60 s: the client's timeout). A failure counts toward the fault
whose window it overlaps. 429s the load gets during the admission burst are refusals by design
(the client waits Retry-After and goes on) and are not counted as lost.

Prints two markdown tables and writes them as JSON to OUT/fault_drill.json; the cluster's logs
stay in OUT/fault_drill_logs. Serve is always stopped, even when the drill itself fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import redis

from baton.proto import worker_pb2 as pb
from baton.proto import worker_pb2_grpc as pbg
from baton.router.registry import WorkerInfo, worker_key
from baton.services.cluster_auth import CLUSTER_TOKEN_ENV, REDIS_URL_ENV, TOKEN_METADATA_KEY
from baton.services.redis_server import free_port

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


@dataclass
class Window:
    """One fault, injection to recovery; failures are matched to it afterwards."""

    fault: str
    in_flight: int
    t0: float
    t1: float = 0.0
    recovered_s: float | None = None
    notes: list[str] = field(default_factory=list)


class Drill:
    def __init__(self, serve: Serve, load: Load) -> None:
        self.serve, self.load = serve, load
        self.windows: list[Window] = []
        self.stopped: set[int] = set()
        """Pids we SIGSTOPped and not yet SIGCONTed (continued at teardown whatever happens)."""

    def _open(self, fault: str) -> Window:
        with self.load.lock:
            w = Window(fault, self.load.in_flight, time.monotonic())
        self.windows.append(w)
        print(f"[drill] {fault}", flush=True)
        return w

    def _close(self, w: Window, healed: bool) -> None:
        w.t1 = time.monotonic()
        if healed:
            w.recovered_s = round(w.t1 - w.t0, 1)
        else:
            w.notes.append(f"NOT recovered within {RECOVERY_TIMEOUT_S:.0f} s")
        if self.serve.proc.poll() is not None:
            w.notes.append(f"serve exited ({self.serve.proc.returncode})")
            raise RuntimeError(f"serve exited during {w.fault}")
        self.settle()

    def settle(self) -> None:
        """Every worker registered and requests completing again, then a breath."""
        _wait(lambda: set(WORKER_IDS) <= set(self.serve.registry()), RECOVERY_TIMEOUT_S)
        self.load.wait_ok_after(time.monotonic(), OK_AFTER_RECOVERY, RECOVERY_TIMEOUT_S)
        time.sleep(2.0)

    def _worker_works(self, worker_id: str, since_unix_s: float) -> bool:
        """The restarted worker is registered (a new entry) and has done work since: a decode
        worker streamed tokens, a prefill worker looked prompts up (its engine ran them)."""
        info = self.serve.registry().get(worker_id)
        if info is None or info.started_unix_s < since_unix_s or not info.metrics_address:
            return False
        return _counter(info.metrics_address, WORK_COUNTER[info.role]) > 0

    def kill(self, worker_ids: tuple[str, ...]) -> None:
        readies = {w: self.serve.readies(w) for w in worker_ids}
        pids = [self.serve.worker_pid(w) for w in worker_ids]
        since = time.time()
        w = self._open(f"kill -9 {' + '.join(worker_ids)}")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        healed = _wait(
            lambda: all(self.serve.readies(x) > readies[x] for x in worker_ids), RECOVERY_TIMEOUT_S
        )
        if healed:
            w.notes.append(
                f"re-registered (BATON_WORKER_READY) after {time.monotonic() - w.t0:.1f} s"
            )
            t_ready = time.monotonic()
            healed = _wait(
                lambda: all(self._worker_works(x, since) for x in worker_ids), RECOVERY_TIMEOUT_S
            ) and self.load.wait_ok_after(t_ready, OK_AFTER_RECOVERY, RECOVERY_TIMEOUT_S)
            if healed:
                w.notes.append("restarted worker(s) doing work again")
        self._close(w, healed)

    def freeze(self, worker_id: str, stop_s: float) -> None:
        pid = self.serve.worker_pid(worker_id)
        info = self.serve.registry()[worker_id]
        w = self._open(f"SIGSTOP {worker_id} for {stop_s:g} s, then SIGCONT")
        os.kill(pid, signal.SIGSTOP)
        self.stopped.add(pid)
        try:
            time.sleep(stop_s)
        finally:
            os.kill(pid, signal.SIGCONT)
            self.stopped.discard(pid)
        t_cont = time.monotonic()
        time.sleep(1.0)  # the streams the gateway gave up on are aborted meanwhile
        served = _counter(info.metrics_address, "baton:generation_tokens_total")
        healed = _wait(
            lambda: _counter(info.metrics_address, "baton:generation_tokens_total") > served + 16,
            RECOVERY_TIMEOUT_S,
        ) and self.load.wait_ok_after(t_cont, OK_AFTER_RECOVERY, RECOVERY_TIMEOUT_S)
        if healed:
            w.notes.append(
                f"{worker_id} serving again {time.monotonic() - t_cont:.1f} s after SIGCONT"
            )
        self._close(w, healed)

    def kill_redis(self, times: int, gap_s: float = 3.0) -> None:
        w = self._open(f"kill -9 Redis x{times}, {gap_s:g} s apart")
        back_s = []
        healed = True
        for _ in range(times):
            old = self.serve.redis_pid()
            t_kill = time.monotonic()
            if old is not None:
                os.kill(old, signal.SIGKILL)

            def answers(old: int | None = old) -> bool:
                pid = self.serve.redis_pid()
                with redis.Redis.from_url(self.serve.redis_url, socket_timeout=1) as r:
                    return pid is not None and pid != old and bool(r.ping())

            healed = healed and _wait(answers, 30.0, step_s=0.05)
            back_s.append(time.monotonic() - t_kill)
            time.sleep(max(gap_s - (time.monotonic() - t_kill), 0.0))
        w.notes.append(f"Redis back (with its password) after at most {max(back_s):.1f} s")
        t_last = time.monotonic()
        healed = (
            healed
            and _wait(lambda: set(WORKER_IDS) <= set(self.serve.registry()), RECOVERY_TIMEOUT_S)
            and self.load.wait_ok_after(t_last, OK_AFTER_RECOVERY, RECOVERY_TIMEOUT_S)
        )
        if healed:
            w.notes.append(f"all 4 workers re-registered {time.monotonic() - t_last:.1f} s after")
        self._close(w, healed)

    def window_of(self, o: Outcome, grace_s: float = 5.0) -> Window | None:
        """The fault a failure belongs to: the last injected before it ended, if the request
        began before that fault healed (+ grace_s)."""
        for w in reversed(self.windows):
            if w.t0 <= o.end:
                return w if o.start <= (w.t1 or time.monotonic()) + grace_s else None
        return None

    def rows(self, outcomes: list[Outcome], t_base: float) -> list[dict[str, Any]]:
        """One row per window: requests completed in it, failures that belong to it."""
        rows = []
        for w in self.windows:
            t1 = w.t1 or time.monotonic()
            ok = [o for o in outcomes if o.kind == "ok" and w.t0 <= o.end <= t1]
            bad = [o for o in outcomes if o.kind != "ok" and self.window_of(o) is w]
            kinds = Counter(o.kind for o in bad if o.kind != "hung")
            rows.append(
                {
                    "fault": w.fault,
                    "in_flight_at_injection": w.in_flight,
                    "completed_during": len(ok),
                    "failed_cleanly": sum(kinds.values()),
                    "hung": sum(o.kind == "hung" for o in bad),
                    "recovered_after_s": w.recovered_s,
                    "injected_at_s": round(w.t0 - t_base, 1),
                    "failure_kinds": dict(kinds),
                    "failure_details": sorted({o.detail for o in bad})[:5],
                    "notes": w.notes,
                }
            )
        return rows


# ---- bad inputs -------------------------------------------------------------------------------


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


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _log_excerpts(log_dir: Path, max_lines: int = 12) -> dict[str, list[str]]:
    """Lines that look like trouble, per log file (the last max_lines of them)."""
    marks = ("Traceback", "ERROR", "Error", "CRITICAL", "exited", "restart", "unhealthy")
    found = {}
    for path in sorted(log_dir.glob("*.*")):
        lines = [
            ln[:300]
            for ln in path.read_text(errors="replace").splitlines()
            if any(m in ln for m in marks)
        ]
        if lines:
            found[path.name] = lines[-max_lines:]
    return found


def report(data: dict[str, Any]) -> str:
    faults = [
        [
            r["fault"], r["in_flight_at_injection"], r["completed_during"], r["failed_cleanly"],
            r["hung"], r["recovered_after_s"] if r["recovered_after_s"] is not None else "NO",
            "; ".join([*(f"{k}: {v}" for k, v in r["failure_kinds"].items()), *r["notes"]]),
        ]
        for r in data["faults"]
    ]  # fmt: skip
    down = data.get("teardown")
    if down:
        faults.append(
            [
                "Ctrl-C (SIGINT to serve's group; load stopped first)", 0, "-", "-", "-",
                down["stop_s"],
                f"exit {down['exit_code']}; {len(down['processes_left'])} of "
                f"{down['processes_before']} processes left; port "
                f"{'free' if down['port_free'] else 'STILL TAKEN'}; Redis port "
                f"{'free' if down['redis_port_free'] else 'STILL TAKEN'}"
                + ("; SIGKILL was needed" if down["sigkill_needed"] else ""),
            ]
        )  # fmt: skip
    head = ["fault", "in flight at injection", "completed during", "failed cleanly", "hung"]
    out = [_table([*head, "recovered after s", "notes"], faults), ""]
    inputs = [
        [
            r["input"], r["tried"], r["expected"], r["as_expected"], r["n5xx"],
            "; ".join([", ".join(f"{k} x{v}" for k, v in r["seen"].items()), *r["notes"]]),
        ]
        for r in data["inputs"]
    ]  # fmt: skip
    out += [_table(["input", "tried", "expected outcome", "as expected", "5xx", "seen"], inputs)]
    t = data["totals"]
    out += [
        "",
        f"load held: {t['completed']} requests completed over {t['duration_s']:.0f} s, "
        f"{t['lost']} lost (failed) of which {t['hung']} hung"
        f" (+{t['refused_429_in_burst']} refused with 429 during the admission burst, by design;"
        f" {t['failed_outside_fault_windows']} failed outside any fault window)",
    ]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="output folder")
    p.add_argument("--quick", action="store_true", help="a shorter drill, for a smoke test")
    a = p.parse_args()
    out = Path(a.out)
    log_dir = out / "fault_drill_logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    serve = Serve(log_dir, free_port(), api_key="sk-drill-" + secrets.token_urlsafe(16))
    data: dict[str, Any] = {"quick": a.quick, "faults": [], "inputs": [], "log_dir": str(log_dir)}
    load: Load | None = None
    drill: Drill | None = None
    inputs: Inputs | None = None
    t_start = time.monotonic()
    error = None
    try:
        serve.wait_serving()
        print(f"[drill] serving at {serve.url}; logs in {log_dir}", flush=True)
        model = httpx.get(
            f"{serve.url}/v1/models", headers={"Authorization": f"Bearer {serve.api_key}"}
        ).json()["data"][0]["id"]
        load = Load(serve.url, serve.api_key, model).start()
        t_start = time.monotonic()
        if not load.wait_ok_after(t_start, NUM_THREADS, RECOVERY_TIMEOUT_S):
            raise RuntimeError("the load never got going")
        drill = Drill(serve, load)
        inputs = Inputs(serve, load, a.quick)
        data["inputs"] = [r.to_dict() for r in inputs.run_all()]
        drill.settle()
        drill.kill(("decode-2",))
        drill.kill(("prefill-0",))
        drill.freeze("decode-3", 5.0 if a.quick else 20.0)
        drill.kill_redis(2 if a.quick else 5)
        drill.kill(("prefill-0", "prefill-1"))
    except Exception as e:  # reported; serve is stopped below
        error = f"{type(e).__name__}: {e}"
        print(f"[drill] FAILED: {error}", flush=True)
    finally:
        stuck = load.finish() if load is not None else 0
        duration_s = time.monotonic() - t_start
        if drill is not None:
            for pid in drill.stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        with contextlib.suppress(Exception):
            data["work_since_last_start"] = _work(serve)
        print("[drill] Ctrl-C", flush=True)
        data["teardown"] = serve.stop()
    outcomes = load.snapshot() if load is not None else []
    if drill is not None:
        data["faults"] = drill.rows(outcomes, t_start)
    burst = inputs.burst_window if inputs is not None else (0.0, 0.0)
    in_burst = [o for o in outcomes if o.kind == "HTTP 429" and burst[0] <= o.end <= burst[1]]
    failed = [o for o in outcomes if o.kind != "ok" and not any(o is b for b in in_burst)]
    outside = [o for o in failed if drill is None or drill.window_of(o) is None]
    data["totals"] = {
        "completed": sum(o.kind == "ok" for o in outcomes),
        "duration_s": round(duration_s, 1),
        "lost": len(failed) + stuck,
        "hung": sum(o.kind == "hung" for o in failed) + stuck,
        "threads_stuck_at_the_end": stuck,
        "refused_429_in_burst": len(in_burst),
        "failed_outside_fault_windows": len(outside),
        "outside_kinds": dict(Counter(o.kind for o in outside)),
        "completed_by_api": dict(Counter(o.api for o in outcomes if o.kind == "ok")),
    }
    data["failures"] = [
        {**asdict(o), "start": round(o.start - t_start, 1), "end": round(o.end - t_start, 1)}
        for o in failed
    ]
    data["error"] = error
    data["log_excerpts"] = _log_excerpts(log_dir)
    text = report(data)
    print(text)
    if error:
        print(f"\ndrill error: {error}")
    (out / "fault_drill.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"\nwrote {out / 'fault_drill.json'}")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
