"""`baton serve` survives its workers and its Redis: kill -9 under load, restart, Ctrl-C.

One real `baton serve` (workers prefill-0, decode-1, decode-2; real Redis, real gRPC), its API
on 0.0.0.0 behind a key given in $BATON_API_KEY, under a steady load of streaming completions
from the official `openai` client. A decode worker and then the prefill worker are killed with
SIGKILL: the cluster keeps serving, only requests in flight on the killed decode worker may
fail (each with a clean error, none hangs), the worker comes back under the same id and serves
again. Redis is killed five times in a row: nothing is lost. Then a terminal's Ctrl-C, twice:
SIGINT to the whole foreground process group stops everything and frees the port.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from openai import APIError, OpenAI
from redis import Redis

from baton.router.registry import WorkerInfo
from baton.services.redis_server import free_port

pytestmark = pytest.mark.slow

CONCURRENCY = 4
INTER_TOKEN_S = 3.0
API_KEY = "sk-supervision-test-key"


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    url: str
    log_dir: Path
    redis_url: str = ""

    def children(self) -> dict[int, list[bytes]]:
        """pid → argv of every live child of this serve."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.proc.pid:
                found[int(entry.name)] = argv
        return found

    def worker_pid(self, worker_id: str) -> int:
        """The live child of this serve running `baton worker --worker-id worker_id`."""
        for pid, argv in self.children().items():
            flag = b"--worker-id"
            if flag in argv and argv[argv.index(flag) + 1] == worker_id.encode():
                return pid
        raise LookupError(worker_id)

    def redis_pid(self) -> int:
        return next(p for p, argv in self.children().items() if b"redis-server" in argv[0])

    def readies(self, role: str, index: int) -> int:
        log = self.log_dir / f"worker-{role}-{index}.log"
        return log.read_text(errors="replace").count("BATON_WORKER_READY")

    def worker(self, worker_id: str) -> WorkerInfo:
        with Redis.from_url(self.redis_url) as r:
            raw = r.get(f"baton:worker:{worker_id}")
        assert raw, worker_id
        return WorkerInfo.from_json(raw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    port = free_port()
    log_dir = tmp_path_factory.mktemp("serve")
    cmd = [
        sys.executable, "-m", "baton.services.cli", "serve",
        "--num-prefill", "1", "--num-decode", "2", "--port", str(port),
        "--device", "cpu", "--dtype", "float32", "--kv-cache-memory-mb", "96",
        "--remote-prefill-min-tokens", "4", "--log-dir", str(log_dir),
        "--first-token-timeout-s", "20", "--inter-token-timeout-s", str(INTER_TOKEN_S),
        "--host", "0.0.0.0",
    ]  # fmt: skip
    out = open(log_dir / "serve.out", "wb")  # noqa: SIM115 (closed at teardown)
    env = dict(os.environ, BATON_API_KEY=API_KEY)
    # Its own process group, like a shell's foreground job: Ctrl-C goes to the whole group.
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    s = Serve(proc, f"http://127.0.0.1:{port}", log_dir)
    try:
        deadline = time.monotonic() + 300
        while b"baton is serving" not in (log_dir / "serve.out").read_bytes():
            assert proc.poll() is None, (log_dir / "serve.out").read_text()
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.5)
        gateway_log = (log_dir / "gateway.log").read_text()
        s.redis_url = _environ(s.worker_pid("decode-1"))["BATON_REDIS_URL"]
        assert "gateway for" in gateway_log
        yield s
    finally:
        if proc.poll() is None:  # a failed test: the workers die with serve (PDEATHSIG)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        out.close()


@dataclass
class Load:
    """CONCURRENCY threads streaming completions until stopped; counts outcomes."""

    url: str
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for i in range(CONCURRENCY):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _run(self, i: int) -> None:
        client = OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, timeout=60.0, max_retries=0)
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                stream = client.completions.create(
                    model=client.models.list().data[0].id,
                    prompt=f"Request {i}-{n}: the history of the printing press begins",
                    max_tokens=12,
                    temperature=0,
                    stream=True,
                )
                text = "".join(c.choices[0].text for c in stream if c.choices)
                assert text
                self.ok += 1
            except APIError as e:  # a clean error: an HTTP status or an SSE error event
                self.failed.append(f"{type(e).__name__}: {e}")

    def wait_for(self, num_ok: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.ok < num_ok:
            assert time.monotonic() < deadline, (self.ok, self.failed)
            time.sleep(0.1)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)
            assert not t.is_alive(), "a request hung"


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _listening(pid: int) -> set[str]:
    """host:port of every TCP socket the process listens on (its fds matched to /proc/net)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                host_hex, port_hex = cols[1].split(":")
                raw = bytes.fromhex(host_hex)  # 32-bit words in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                host = ipaddress.ip_address(words)
                if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped:
                    host = host.ipv4_mapped
                found.add(f"{host}:{int(port_hex, 16)}")
    return found


def _generation_tokens(metrics_address: str) -> float:
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("baton:generation_tokens_total")
    )


def _wait_restarted(
    serve: Serve, role: str, index: int, timeout_s: float = 180.0, min_readies: int = 2
) -> None:
    deadline = time.monotonic() + timeout_s
    while serve.readies(role, index) < min_readies:
        assert serve.proc.poll() is None, (serve.log_dir / "serve.out").read_text()
        assert time.monotonic() < deadline, f"{role}-{index} was not restarted"
        time.sleep(0.5)


def test_killed_workers_are_restarted_and_the_cluster_keeps_serving(serve: Serve) -> None:
    load = Load(serve.url).start()
    load.wait_for(6)
    # ---- a decode worker dies: its in-flight requests at most are lost
    os.kill(serve.worker_pid("decode-1"), signal.SIGKILL)
    failed_before = len(load.failed)
    load.wait_for(load.ok + 8)  # the other decode worker carries on meanwhile
    _wait_restarted(serve, "decode", 1)
    assert len(load.failed) - failed_before <= CONCURRENCY, load.failed
    # the restarted worker re-registered under its id and takes traffic again
    deadline = time.monotonic() + 60
    served = 0.0
    while served == 0.0:
        assert time.monotonic() < deadline, "the restarted decode worker got no traffic"
        load.wait_for(load.ok + 2)
        served = _generation_tokens(serve.worker("decode-1").metrics_address)
    # ---- the prefill worker dies: decode workers prefill locally, nothing is lost
    failed_before = len(load.failed)
    os.kill(serve.worker_pid("prefill-0"), signal.SIGKILL)
    load.wait_for(load.ok + 8)
    _wait_restarted(serve, "prefill", 0)
    load.wait_for(load.ok + 4)
    load.finish()
    assert len(load.failed) == failed_before, load.failed[failed_before:]
    out = (serve.log_dir / "serve.out").read_text()
    assert "worker-decode-1 exited (-9); restarting" in out
    assert "worker-prefill-0 restarted" in out
    assert serve.proc.poll() is None


def test_a_frozen_decode_worker_costs_at_most_its_streams_and_is_probed_back(
    serve: Serve,
) -> None:
    load = Load(serve.url).start()
    load.wait_for(4)
    pid = serve.worker_pid("decode-2")
    metrics = serve.worker("decode-2").metrics_address
    os.kill(pid, signal.SIGSTOP)  # alive to the supervisor, silent to everyone
    try:
        failed_before = len(load.failed)
        load.wait_for(load.ok + 10)  # the other decode worker serves meanwhile
        lost = load.failed[failed_before:]
        assert len(lost) <= CONCURRENCY, lost
        assert all("deadline" in f or "unavailable" in f.lower() for f in lost), lost
    finally:
        os.kill(pid, signal.SIGCONT)
    served = _generation_tokens(metrics)
    deadline = time.monotonic() + 90
    while _generation_tokens(metrics) <= served:  # healthy again once its probe answers
        assert time.monotonic() < deadline, "the thawed worker got no traffic"
        load.wait_for(load.ok + 2)
    load.finish()
    assert serve.proc.poll() is None


def _stream_text(client: OpenAI, prompt: str, chunks: list[str]) -> str:
    """A greedy streamed completion; every chunk's text is appended to chunks as it arrives."""
    stream = client.completions.create(
        model=client.models.list().data[0].id,
        prompt=prompt,
        max_tokens=48,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for c in stream:
        if c.choices:
            chunks.append(c.choices[0].text)
    return "".join(chunks)


def test_a_decode_worker_killed_mid_stream_costs_no_stream(serve: Serve) -> None:
    """SIGKILL of one of two decode workers while 8 greedy streams are mid-decode: all 8 go on
    elsewhere (token replay) and each text equals an undisturbed run's, nothing duplicated."""
    client = OpenAI(base_url=f"{serve.url}/v1", api_key=API_KEY, timeout=120.0, max_retries=0)
    prompts = [f"Story {i}: the lighthouse keeper walked out" for i in range(8)]
    reference = [_stream_text(client, p, []) for p in prompts]
    chunks: list[list[str]] = [[] for _ in prompts]
    texts: list[str | BaseException] = [""] * len(prompts)

    def run(i: int) -> None:
        try:
            texts[i] = _stream_text(client, prompts[i], chunks[i])
        except BaseException as e:  # recorded: the assertion below names it
            texts[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while min(len(c) for c in chunks) < 4:  # every stream is mid-decode
        assert time.monotonic() < deadline, [len(c) for c in chunks]
        time.sleep(0.02)
    os.kill(serve.worker_pid("decode-1"), signal.SIGKILL)
    for t in threads:
        t.join(180)
        assert not t.is_alive(), "a stream hung"
    assert texts == reference  # 8 of 8 complete, each token once and in order
    out = (serve.log_dir / "gateway.log").read_text()
    assert "continues on another worker" in out
    # New requests meanwhile avoid the dead worker (until its restart serves again).
    for p in prompts[:3]:
        r = client.completions.create(
            model=client.models.list().data[0].id, prompt=p, max_tokens=4, temperature=0
        )
        assert r.choices[0].text
    _wait_restarted(serve, "decode", 1, min_readies=3)


def test_only_the_api_is_public_and_no_secret_is_on_a_command_line(serve: Serve) -> None:
    port = int(serve.url.rsplit(":", 1)[1])
    children = serve.children()
    gateway = next(p for p, argv in children.items() if b"gateway" in argv)
    assert f"0.0.0.0:{port}" in _listening(gateway)
    secrets = [API_KEY, _environ(gateway)["BATON_CLUSTER_TOKEN"]]
    secrets.append(serve.redis_url.split("@")[0].rsplit(":", 1)[1])  # the Redis password
    assert all(len(s) >= 16 for s in secrets)
    for pid in [*children, serve.proc.pid]:
        line = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert not any(s.encode() in line for s in secrets), line
        if pid not in (gateway, serve.proc.pid):  # workers and Redis: loopback only
            listening = _listening(pid)
            assert listening and all(a.startswith("127.0.0.1:") for a in listening), listening
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{serve.url}/v1/models", timeout=5)
    assert err.value.code == 401


def test_redis_killed_five_times_in_a_row_loses_nothing(serve: Serve) -> None:
    load = Load(serve.url).start()
    load.wait_for(load.ok + 4)
    failed_before = len(load.failed)
    for _ in range(5):
        old = serve.redis_pid()
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:  # serve brings it back on its port, with its password
            assert time.monotonic() < deadline, "Redis was not restarted"
            with contextlib.suppress(Exception), Redis.from_url(serve.redis_url) as r:
                if r.ping() and serve.redis_pid() != old:
                    break
            time.sleep(0.1)
        load.wait_for(load.ok + 3)  # requests complete while the registry is rebuilt
    deadline = time.monotonic() + 30
    with Redis.from_url(serve.redis_url) as r:
        while len(r.keys("baton:worker:*")) < 3:  # every worker re-registered
            assert time.monotonic() < deadline, r.keys("baton:worker:*")
            time.sleep(0.2)
    load.wait_for(load.ok + 4)
    load.finish()
    assert load.failed[failed_before:] == []
    assert (serve.log_dir / "serve.out").read_text().count("redis-server exited") >= 5


def test_ctrl_c_twice_stops_every_process_and_frees_the_port(serve: Serve) -> None:
    port = int(serve.url.rsplit(":", 1)[1])
    children = [serve.worker_pid(w) for w in ("prefill-0", "decode-1", "decode-2")]
    redis_port = int(serve.redis_url.rsplit(":", 1)[1].split("/")[0])
    os.killpg(serve.proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
    time.sleep(0.5)
    os.killpg(serve.proc.pid, signal.SIGINT)  # impatient: a second Ctrl-C during the drain
    assert serve.proc.wait(90) == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), pid
    for p in (port, redis_port):
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{p}/health", timeout=2)
    assert "stopping" in (serve.log_dir / "serve.out").read_text()


def test_workers_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    """kill -9 of `baton serve` itself: its children, Redis too, get SIGTERM and drain
    (PR_SET_PDEATHSIG)."""
    script = tmp_path / "sleeper.py"
    script.write_text("import time\ntime.sleep(600)\n")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from baton.services.launcher import Cluster, ServeConfig\n"
            f"c = Cluster(ServeConfig(log_dir={str(tmp_path)!r}))\n"
            f"c._spawn('sleeper', [sys.executable, {str(script)!r}])\n"
            "from baton.services.redis_server import RedisServer\n"
            "r = RedisServer(password='pw-for-this-test').start()\n"
            "print(c.children[0].proc.pid, r._proc.pid, flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None
    children = [int(pid) for pid in holder.stdout.readline().split()]
    assert len(children) == 2 and all(Path(f"/proc/{c}").exists() for c in children)
    holder.kill()
    holder.wait(10)
    deadline = time.monotonic() + 10
    for child in children:  # a worker and a Redis
        while Path(f"/proc/{child}").exists() and not _is_zombie(child):
            assert time.monotonic() < deadline, "a child outlived its supervisor"
            time.sleep(0.1)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_child_that_keeps_dying_exhausts_its_restart_budget(tmp_path: Path) -> None:
    from baton.services.launcher import Cluster, ClusterFailed, RestartPolicy, ServeConfig

    policy = RestartPolicy(max_restarts=2, window_s=60.0, backoff_s=0.05, max_backoff_s=0.1)
    cluster = Cluster(ServeConfig(log_dir=str(tmp_path)), policy)
    cluster._spawn("flaky", [sys.executable, "-c", "print('boot'); raise SystemExit(3)"])
    deadline = time.monotonic() + 30
    with pytest.raises(ClusterFailed, match="flaky exited \\(3\\) again after 2 restarts"):
        while time.monotonic() < deadline:
            cluster.supervise()
            time.sleep(0.02)
    # started once, restarted twice (each after its backoff), all into one appended log
    assert (tmp_path / "flaky.log").read_text().count("boot") == 3
    cluster.stop()
