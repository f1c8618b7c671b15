"""Mooncake transfer-engine KV transport: batched one-sided writes into registered memory.

Like NIXL, the whole KV tensor is registered once and a writer addresses chunks as base + offset
(base.py's region map); the decode side does nothing per request. The engine runs in
peer-to-peer handshake mode (no etcd: the session "host:rpc_port" travels in metadata()) over
the protocol in TransportConfig.mooncake_protocol: "tcp" (the default, what works on any host)
or "rdma" where the hosts have RDMA NICs.

Needs the `mooncake-transfer-engine` wheel (`-non-cuda` on CPU hosts) and libibverbs at run
time even for TCP (Debian: libibverbs1); the registry imports this module only on demand.

Timeouts: the engine's blocking batch write gives up after MC_TRANSFER_TIMEOUT (default 30 s)
plus a nanosecond per byte; to honour TransportConfig.timeout_s as well, the call runs on a
helper thread that write_blocks waits on. A write abandoned that way still finishes or fails
inside the engine; its destination blocks are unspecified, as the transport contract allows.

Transfer tokens (docs/design.md §11) are NOT checked before bytes land. The writes are one-sided:
the receiving engine places them (RDMA puts, or its TCP transport's C++ server writing straight
into the registered region) with no baton code on the path, and the P2P handshake that runs
when a writer first connects is the engine's own, with no hook for a token. write_blocks still
takes the token (and refuses to start without one), and grant/revoke keep the same bookkeeping
as everywhere, but the receiver never sees the token. What guards the memory instead is thin:
the session address and the tensor's base address travel only inside the authenticated Prefill
RPC (KVDestination), but they are no secret. In "tcp" mode the engine's server takes a raw
(address, size, opcode) request from any connection and checks at most that the range lies in a
registered buffer; it serves READs of it as well. In "rdma" mode the region's key comes out of
the engine's own handshake. Either way, anyone who can reach the engine's ports can read or write
the registered tensor for its whole life. Where that matters, use the tcp transport (checked per
write) or keep the engine's ports on a network only the workers reach.
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import ClassVar

import torch
from mooncake.engine import TransferEngine

from baton.kvstore.transports.base import (
    Int64Array,
    KVTransport,
    PeerInfo,
    TransportConfig,
    TransportError,
    block_chunk_offsets,
    coalesce_chunks,
    pack_metadata,
)

_MAX_BATCH = 1024
"""Descriptors per engine call: the TCP transport's per-lane queue rejects (fails) a batch of
~10k slices, e.g. 64 MiB of scattered 6 KiB chunks."""


class MooncakeTransport(KVTransport):
    """KV blocks as Mooncake batch WRITEs from this worker's tensor into a peer's."""

    name: ClassVar[str] = "mooncake"

    def __init__(
        self, kv_cache: torch.Tensor, worker_id: str, config: TransportConfig | None = None
    ) -> None:
        super().__init__(kv_cache, worker_id, config)
        if not kv_cache.is_cpu:
            raise TransportError("the mooncake transport is wired for host memory only")
        host = self.config.host
        if host in ("", "0.0.0.0"):  # the session name is what peers dial: a routable address
            host = socket.gethostbyname(socket.gethostname())
        self._engine = TransferEngine()
        protocol = self.config.mooncake_protocol
        rc = self._engine.initialize(host, "P2PHANDSHAKE", protocol, "")
        if rc != 0:
            raise TransportError(f"Mooncake engine init ({protocol}) failed: {rc}")
        self.session = f"{host}:{self._engine.get_rpc_port()}"
        self._base_addr = kv_cache.data_ptr()
        rc = self._engine.register_memory(self._base_addr, kv_cache.numel() * kv_cache.itemsize)
        if rc != 0:
            raise TransportError(f"Mooncake memory registration failed: {rc}")
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"kv-mc-{worker_id}")
        self._lock = threading.Lock()
        self._closed = False

    def metadata(self) -> bytes:
        header = {
            "worker_id": self.worker_id,
            "spec": self.spec.to_json(),
            "session": self.session,
            "base_addr": self._base_addr,
        }
        return pack_metadata(self.name, header)

    def _write(
        self, peer: PeerInfo, request_id: str, token: str, src: Int64Array, dst: Int64Array
    ) -> None:
        # token: unused on the wire, see the module docstring; the receiver cannot check it.
        try:
            session = str(peer.header["session"])
            remote_base = int(peer.header["base_addr"])
        except (KeyError, TypeError, ValueError) as e:
            raise TransportError(f"malformed Mooncake peer metadata: {e}") from e
        src_off, dst_off, lengths = coalesce_chunks(
            block_chunk_offsets(self.spec, src),
            block_chunk_offsets(peer.spec, dst),
            self.spec.chunk_bytes,
        )
        with self._lock:
            if self._closed:
                raise TransportError("transport is closed")
            future = self._pool.submit(
                self._write_batches,
                session,
                self._base_addr + src_off,
                remote_base + dst_off,
                lengths,
            )
        where = f"write of {request_id} to {peer.worker_id} ({session})"
        try:
            rc = future.result(timeout=self.config.timeout_s)
        except FutureTimeout as e:
            raise TransportError(f"{where} timed out after {self.config.timeout_s:.1f}s") from e
        if rc != 0:
            raise TransportError(f"{where} failed: Mooncake returned {rc}")

    def _write_batches(
        self, session: str, src_addr: Int64Array, dst_addr: Int64Array, lengths: Int64Array
    ) -> int:
        """One blocking batch write per _MAX_BATCH descriptors; the first failure's code."""
        for start in range(0, len(lengths), _MAX_BATCH):
            batch = slice(start, start + _MAX_BATCH)
            rc = self._engine.batch_transfer_sync_write(
                session, src_addr[batch].tolist(), dst_addr[batch].tolist(), lengths[batch].tolist()
            )
            if rc != 0:
                return int(rc)
        return 0

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        self._engine.unregister_memory(self._base_addr)
