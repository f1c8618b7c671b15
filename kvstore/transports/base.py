"""The KV transport contract: how a prefill worker writes KV blocks into a decode worker's cache.

docs/design.md §2: the decode worker owns the destination. It allocates block ids, advertises its
transport's `metadata()` (bytes inside the protobuf `KVDestination`), and the prefill worker calls
`write_blocks(peer_metadata, ...)`, which returns only once the bytes are in the remote tensor; the
decode worker learns of completion from the gRPC reply sent after that. No transport needs a
completion notification of its own.

Every write carries a transfer token (docs/design.md §11) that the destination granted for
exactly the blocks it allocated (`grant`, before the destination is announced) and revokes when
the transfer has ended (`revoke`); grants.py keeps the bookkeeping. Whether the destination
checks the token before bytes land is the transport's to say: tcp.py does, for every write; the
one-sided transports (nixl.py, mooncake.py) cannot, and their docstrings say what holds instead.

Both workers hold a paged KV cache of layout "LT2BSHD":

    [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim], contiguous.

Region map of one tensor (chunk = block_size * heads * dim elements, contiguous):

    chunk(layer, t, block) starts at ((layer * 2 + t) * num_blocks + block) * chunk_bytes

so one block across all layers is num_layers * 2 separate chunks. The two tensors share
everything but num_blocks, which is each worker's own capacity.
"""

from __future__ import annotations

import json
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt
import torch

from baton.kvstore.transports.grants import TransferGrants

KV_LAYOUT = "LT2BSHD"
"""The only layout the transports move: [layers, 2, blocks, block_size, heads, dim]."""

_MAGIC = b"BKVT"
_VERSION = 1
_HEADER_LEN = struct.Struct("!4sI")

Int64Array = npt.NDArray[np.int64]


class TransportError(RuntimeError):
    """A KV write failed or timed out, or its arguments were rejected before any byte moved."""


@dataclass(frozen=True)
class TransferStats:
    """What one `write_blocks` call moved."""

    num_bytes: int
    """KV payload bytes written into the peer's tensor (no framing or checksums)."""
    seconds: float
    """Wall time of the write, from validation to the peer's acknowledgement."""

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class TransportConfig:
    """Options a worker passes to its transport; each transport reads only what it uses."""

    host: str = "127.0.0.1"
    """Address to listen on / advertise (tcp, mooncake). 0.0.0.0 advertises the host's IP."""
    timeout_s: float = 30.0
    """Upper bound on one write, connect and acknowledgement included."""
    mooncake_protocol: str = "tcp"
    """Mooncake transfer-engine protocol: "tcp" anywhere, "rdma" where the hosts have RDMA NICs."""


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape and dtype of a paged KV tensor: what a peer must match before bytes move."""

    layout: str
    dtype: str
    """torch dtype name without the "torch." prefix, e.g. "bfloat16"."""
    shape: tuple[int, ...]
    element_size: int

    @classmethod
    def from_tensor(cls, kv_cache: torch.Tensor) -> KVCacheSpec:
        if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
            raise ValueError(
                f"KV cache must be {KV_LAYOUT} [layers, 2, blocks, block_size, heads, dim], "
                f"got shape {tuple(kv_cache.shape)}"
            )
        if not kv_cache.is_contiguous():
            # Transports address chunks by byte offset from the base pointer.
            raise ValueError("KV cache must be contiguous")
        return cls(
            layout=KV_LAYOUT,
            dtype=str(kv_cache.dtype).removeprefix("torch."),
            shape=tuple(int(d) for d in kv_cache.shape),
            element_size=kv_cache.element_size(),
        )

    @property
    def num_layers(self) -> int:
        return self.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.shape[2]

    @property
    def block_shape(self) -> tuple[int, ...]:
        """(block_size, heads, dim): one chunk."""
        return self.shape[3:]

    @property
    def chunk_bytes(self) -> int:
        return int(np.prod(self.block_shape)) * self.element_size

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers, K and V."""
        return self.num_layers * 2 * self.chunk_bytes

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise TransportError(f"unknown dtype {self.dtype!r}")
        return dtype

    def to_json(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "element_size": self.element_size,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> KVCacheSpec:
        try:
            return cls(
                layout=str(obj["layout"]),
                dtype=str(obj["dtype"]),
                shape=tuple(int(d) for d in obj["shape"]),
                element_size=int(obj["element_size"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TransportError(f"malformed KV cache spec {obj!r}: {e}") from e

    def check_peer(self, peer: KVCacheSpec) -> None:
        """Raise TransportError unless a block of ours can be written into a block of peer's."""
        problems = []
        if peer.layout != self.layout:
            problems.append(f"layout {self.layout} != {peer.layout}")
        if peer.dtype != self.dtype or peer.element_size != self.element_size:
            problems.append(f"dtype {self.dtype} != {peer.dtype}")
        if len(peer.shape) != len(self.shape):
            problems.append(f"rank {len(self.shape)} != {len(peer.shape)}")
        elif (peer.shape[:2], peer.shape[3:]) != (self.shape[:2], self.shape[3:]):
            problems.append(f"shape {self.shape} vs {peer.shape} differ outside the block dim (2)")
        if problems:
            raise TransportError("incompatible KV caches: " + "; ".join(problems))


def block_chunk_offsets(spec: KVCacheSpec, block_ids: Int64Array) -> Int64Array:
    """Byte offsets of every chunk of block_ids, ordered (layer, K/V, block) like the tensor.

    Entry (l * 2 + t) * n + i is chunk(l, t, block_ids[i]); each is spec.chunk_bytes long.
    """
    layer_kv = np.arange(spec.num_layers * 2, dtype=np.int64)[:, None]
    chunk_index = layer_kv * spec.num_blocks + block_ids[None, :]
    return (chunk_index * spec.chunk_bytes).reshape(-1)


def coalesce_chunks(
    src_offsets: Int64Array, dst_offsets: Int64Array, chunk_bytes: int
) -> tuple[Int64Array, Int64Array, Int64Array]:
    """Merge neighbouring chunks that are adjacent on both sides into (src, dst, length) runs.

    A block pool hands out runs of consecutive ids, so a prompt's blocks are often adjacent on
    both sides; one descriptor per run instead of per chunk cuts per-descriptor overhead (RDMA
    work requests, UCX/Mooncake slices) by the run length.
    """
    if src_offsets.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    breaks = (np.diff(src_offsets) != chunk_bytes) | (np.diff(dst_offsets) != chunk_bytes)
    starts = np.concatenate(([0], np.flatnonzero(breaks) + 1))
    counts = np.diff(np.append(starts, src_offsets.size))
    return src_offsets[starts], dst_offsets[starts], counts.astype(np.int64) * chunk_bytes


def check_block_ids(
    src_block_ids: Sequence[int],
    dst_block_ids: Sequence[int],
    num_src_blocks: int,
    num_dst_blocks: int,
) -> tuple[Int64Array, Int64Array]:
    """Validate a write's block ids; returns them as int64 arrays.

    Duplicate destinations are rejected (two sources racing into one block is a caller bug);
    duplicate sources are fine (one block copied to two places).
    """
    src = np.asarray(src_block_ids, dtype=np.int64).reshape(-1)
    dst = np.asarray(dst_block_ids, dtype=np.int64).reshape(-1)
    if src.size != dst.size:
        raise TransportError(f"{src.size} source block ids but {dst.size} destination ids")
    if src.size and (src.min() < 0 or src.max() >= num_src_blocks):
        raise TransportError(f"source block id out of range [0, {num_src_blocks}): {src}")
    if dst.size and (dst.min() < 0 or dst.max() >= num_dst_blocks):
        raise TransportError(f"destination block id out of range [0, {num_dst_blocks}): {dst}")
    if np.unique(dst).size != dst.size:
        raise TransportError(f"duplicate destination block ids: {dst}")
    return src, dst


def pack_metadata(transport: str, header: Mapping[str, Any], blob: bytes = b"") -> bytes:
    """Frame a transport's metadata: magic, JSON header (with transport name), opaque blob."""
    body = json.dumps({"transport": transport, "version": _VERSION, **header}).encode()
    return _HEADER_LEN.pack(_MAGIC, len(body)) + body + blob


def unpack_metadata(data: bytes, transport: str) -> tuple[dict[str, Any], bytes]:
    """Inverse of pack_metadata; rejects another transport's or another version's metadata."""
    if len(data) < _HEADER_LEN.size:
        raise TransportError("peer metadata too short")
    magic, body_len = _HEADER_LEN.unpack_from(data)
    if magic != _MAGIC:
        raise TransportError("peer metadata is not baton KV transport metadata")
    end = _HEADER_LEN.size + body_len
    try:
        header = json.loads(data[_HEADER_LEN.size : end])
    except ValueError as e:
        raise TransportError(f"malformed peer metadata header: {e}") from e
    if not isinstance(header, dict):
        raise TransportError("malformed peer metadata header")
    if header.get("transport") != transport:
        raise TransportError(
            f"peer metadata is for transport {header.get('transport')!r}, not {transport!r}"
        )
    if header.get("version") != _VERSION:
        raise TransportError(f"peer metadata version {header.get('version')} != {_VERSION}")
    return header, bytes(data[end:])


@dataclass(frozen=True)
class PeerInfo:
    """A decoded peer metadata: what a transport's `_write` needs about the destination."""

    worker_id: str
    spec: KVCacheSpec
    header: Mapping[str, Any]
    """Transport-specific fields (host/port, agent name, base address, ...)."""
    blob: bytes
    """Transport-specific opaque bytes (e.g. NIXL agent metadata)."""


class KVTransport(ABC):
    """Moves KV blocks from this worker's cache into a peer worker's cache.

    Contract:
      - `__init__(kv_cache, worker_id, config)` registers the local tensor for both roles: it is
        the source of this worker's writes and the destination of peers' writes. One instance
        per worker process; the tensor must outlive it and must not be reallocated.
      - `metadata()` is what a peer needs to write into this worker (layout, dtype, shape and
        num_blocks of the tensor plus transport addressing). Stable for the instance's life.
      - `grant(token, block_ids)` / `revoke(token)` (destination side, thread-safe): from
        grant to revoke, a write carrying `token` into any subset of `block_ids` may land;
        no other write of that token. `revoke` is idempotent; one token is one transfer.
      - `write_blocks(..., token=...)` copies block src_block_ids[i] of the local tensor into
        block dst_block_ids[i] of the peer's, for every layer, K and V, under the transfer
        token the peer granted. It blocks until the data is in the peer's memory, and raises
        TransportError on failure, on a refusal (the message says why), or after
        config.timeout_s. It validates the token's presence, dtype/shape compatibility and
        block ranges before any byte moves. On failure the destination blocks hold unspecified
        data (the decode worker frees or recomputes), except after a refusal of the token by a
        transport that checks it: then not one byte was written. Safe to call from several
        threads.
      - `close()` stops serving and releases registrations; idempotent.
    """

    name: ClassVar[str]

    def __init__(
        self, kv_cache: torch.Tensor, worker_id: str, config: TransportConfig | None = None
    ) -> None:
        self.kv_cache = kv_cache
        self.worker_id = worker_id
        self.config = config or TransportConfig()
        self.spec = KVCacheSpec.from_tensor(kv_cache)
        self._grants = TransferGrants()
        """Destination side: the live transfer tokens and their blocks."""

    @abstractmethod
    def metadata(self) -> bytes:
        """Bytes a peer passes to write_blocks to write into this worker's KV cache."""

    # ---- destination side: who may write ---------------------------------------------------

    def grant(self, token: str, block_ids: Sequence[int]) -> None:
        """Let the one transfer carrying `token` write into `block_ids`; see the class."""
        self._grants.grant(token, block_ids)

    def revoke(self, token: str) -> None:
        """End `token`'s grant; returns once no write of it is being applied (grants.py)."""
        self._grants.revoke(token)

    @property
    def num_grants(self) -> int:
        """Tokens granted now: 0 at idle, once every transfer has revoked its own."""
        return len(self._grants)

    # ---- source side ------------------------------------------------------------------------

    def write_blocks(
        self,
        peer_metadata: bytes,
        request_id: str,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        *,
        token: str,
    ) -> TransferStats:
        """Write local blocks src_block_ids[i] into the peer's dst_block_ids[i] under the peer's
        transfer token; see the class."""
        start = time.perf_counter()
        if not token:
            raise TransportError(
                f"write of {request_id} carries no transfer token: the destination grants one "
                "per transfer (docs/design.md §11)"
            )
        peer = self.parse_peer(peer_metadata)
        src, dst = check_block_ids(
            src_block_ids, dst_block_ids, self.spec.num_blocks, peer.spec.num_blocks
        )
        if src.size == 0:
            return TransferStats(0, 0.0)
        self._write(peer, request_id, token, src, dst)
        return TransferStats(src.size * self.spec.block_bytes, time.perf_counter() - start)

    def parse_peer(self, peer_metadata: bytes) -> PeerInfo:
        header, blob = unpack_metadata(peer_metadata, self.name)
        spec = KVCacheSpec.from_json(header.get("spec", {}))
        self.spec.check_peer(spec)
        return PeerInfo(str(header.get("worker_id", "")), spec, header, blob)

    @abstractmethod
    def _write(
        self, peer: PeerInfo, request_id: str, token: str, src: Int64Array, dst: Int64Array
    ) -> None:
        """Move the (validated, non-empty) blocks under `token` (non-empty); raise
        TransportError on failure."""

    @abstractmethod
    def close(self) -> None:
        """Stop serving peers and release resources; idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
