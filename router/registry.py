"""The worker registry on Redis (docs/design.md §3): one key per worker, kept alive by heartbeat.

Each worker writes `baton:worker:<worker_id>` = WorkerInfo as JSON with a TTL (default 6 s) and
rewrites it every TTL/3. A worker that dies simply stops refreshing and its key expires, so the
registry needs no cleanup and survives a Redis restart (the next heartbeat writes it back):
soft state, docs/design.md §4. Load is not stored here; the gateway polls it from workers over gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from dataclasses import asdict, dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, get_args

from redis.exceptions import RedisError

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)

KEY_PREFIX = "baton:worker:"

DEFAULT_TTL_S = 6.0
_MGET_CHUNK = 256

WorkerRole = Literal["prefill", "decode", "mixed"]
ROLES: tuple[str, ...] = get_args(WorkerRole)


def connect(url: str) -> Redis:
    """A registry client (asyncio) whose calls fail within seconds on a frozen or unreachable
    Redis, rather than hold whatever waits on them forever."""
    from redis.asyncio import Redis

    return Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)


def worker_key(worker_id: str) -> str:
    return KEY_PREFIX + worker_id


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker announces about itself; the router's unit of placement."""

    worker_id: str
    address: str
    """gRPC endpoint, host:port."""
    role: WorkerRole
    model: str
    num_kv_blocks: int
    block_size: int
    """Tokens per KV block."""
    transport: str
    """KV connector the worker speaks: "nixl", "mooncake", "tcp"."""
    started_unix_s: float
    metrics_address: str = ""
    """host:port of the worker's Prometheus /metrics endpoint ("" when it has none)."""
    kv_block_bytes: int = 0
    """KV bytes of one block on this worker (all layers, K and V); 0 = unknown, and the
    router's cost model prices a block at its default bytes per token (router/cost_model.py)."""
    proof: str = ""
    """HMAC of every other field under the cluster token (services/cluster_auth.py): what
    tells the gateway this entry was written by one of its own workers."""

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address must be host:port, got {self.address!r}")
        if self.num_kv_blocks < 0 or self.block_size < 1:
            raise ValueError("num_kv_blocks must be >= 0 and block_size >= 1")
        if self.kv_block_bytes < 0:
            raise ValueError(f"kv_block_bytes must be >= 0, got {self.kv_block_bytes}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def _signed_payload(self) -> str:
        fields = asdict(self)
        del fields["proof"]
        return json.dumps(fields, sort_keys=True)

    def signed(self, token: str) -> WorkerInfo:
        """This entry with its proof under `token` ("" : unsigned)."""
        return replace(self, proof=_hmac(token, self._signed_payload()) if token else "")

    def proven(self, token: str) -> bool:
        """Whether the proof holds under `token` (no token: every entry is accepted)."""
        return not token or hmac.compare_digest(_hmac(token, self._signed_payload()), self.proof)

    @classmethod
    def from_json(cls, data: str | bytes) -> WorkerInfo:
        """Parse and validate; raises ValueError on anything malformed."""
        try:
            raw: Any = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"not JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        try:
            info = cls(
                worker_id=_typed(raw, "worker_id", str),
                address=_typed(raw, "address", str),
                role=_typed(raw, "role", str),  # checked in __post_init__
                model=_typed(raw, "model", str),
                num_kv_blocks=_typed(raw, "num_kv_blocks", int),
                block_size=_typed(raw, "block_size", int),
                transport=_typed(raw, "transport", str),
                started_unix_s=float(_typed(raw, "started_unix_s", (int, float))),
                metrics_address=str(raw.get("metrics_address", "")),
                # Absent in entries of workers that predate it: unknown.
                kv_block_bytes=_typed(raw, "kv_block_bytes", int) if "kv_block_bytes" in raw else 0,
                proof=str(raw.get("proof", "")),
            )
        except KeyError as e:
            raise ValueError(f"missing field {e}") from e
        return info


def _hmac(token: str, payload: str) -> str:
    return hmac.new(token.encode(), payload.encode(), hashlib.sha256).hexdigest()


def _typed(raw: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = raw[name]
    # bool is an int subclass; a flag where a count belongs is malformed.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"field {name!r} has type {type(value).__name__}")
    return value


class WorkerRegistration:
    """Keeps one worker's key alive: start() writes it and heartbeats every TTL/3; stop() deletes.

    A heartbeat that fails (Redis restarting, network blip) is logged and retried at the next
    tick; two missed ticks in a row still leave the key alive.
    """

    def __init__(self, redis: Redis, info: WorkerInfo, ttl_s: float = DEFAULT_TTL_S) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.redis = redis
        self.info = info
        self.ttl_s = ttl_s
        self._payload = info.to_json()
        self._task: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        return worker_key(self.info.worker_id)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("registration already started")
        await self._write()  # the first write fails loudly: a worker that cannot register
        self._task = asyncio.create_task(self._heartbeat(), name=f"heartbeat:{self.key}")

    async def stop(self) -> None:
        """Stop the heartbeat and delete the key (best effort: it expires anyway)."""
        await self.stop_heartbeat()
        try:
            await self.redis.delete(self.key)
        except RedisError as e:
            logger.warning(
                "could not delete %s (it expires in %.1f s): %s", self.key, self.ttl_s, e
            )

    async def stop_heartbeat(self) -> None:
        """Stop refreshing without deleting; the key expires after its TTL (a crash, in tests)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _write(self) -> None:
        await self.redis.set(self.key, self._payload, px=max(1, int(self.ttl_s * 1000)))

    async def _heartbeat(self) -> None:
        interval_s = self.ttl_s / 3
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._write()
            except Exception as e:  # the heartbeat must outlive any one failure
                logger.warning("heartbeat for %s failed: %s", self.key, e)

    async def __aenter__(self) -> WorkerRegistration:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def list_workers(redis: Redis, model: str | None = None, token: str = "") -> list[WorkerInfo]:
    """All registered workers (optionally of one model), sorted by worker_id.

    SCAN, then MGET in chunks; a key that expired in between is skipped quietly, a malformed
    one with a warning (it costs a worker, never a wrong placement), and so is one whose proof
    does not hold under the cluster token `token` (a forged entry).
    """
    keys: list[bytes | str] = [k async for k in redis.scan_iter(match=KEY_PREFIX + "*", count=512)]
    workers: list[WorkerInfo] = []
    for start in range(0, len(keys), _MGET_CHUNK):
        chunk = keys[start : start + _MGET_CHUNK]
        values = await redis.mget(chunk)
        for key, value in zip(chunk, values, strict=True):
            if value is None:
                continue
            key_str = key.decode(errors="replace") if isinstance(key, bytes) else key
            try:
                info = WorkerInfo.from_json(value)
                if worker_key(info.worker_id) != key_str:
                    raise ValueError(f"worker_id {info.worker_id!r} does not match the key")
                if not info.proven(token):
                    raise ValueError("its proof does not hold under the cluster token")
            except ValueError as e:
                _warn_once(key_str, value, str(e))
                continue
            if model is None or info.model == model:
                workers.append(info)
    workers.sort(key=lambda w: w.worker_id)
    return workers


_warned: dict[tuple[str, bytes | str], None] = {}
_MAX_WARNED = 1024


def _warn_once(key: str, value: bytes | str, why: str) -> None:
    """Log a bad entry once per (key, value), not at every refresh."""
    if (key, value) in _warned:
        return
    if len(_warned) >= _MAX_WARNED:
        _warned.clear()
    _warned[(key, value)] = None
    logger.warning("skipping registry entry %s: %s", key, why)
