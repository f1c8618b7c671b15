"""NIXL KV transport: one-sided WRITEs into the decode worker's registered KV memory (UCX backend).

The whole KV tensor is registered once, at construction, so a peer can address any of its chunks.
metadata() carries the NIXL agent metadata (connection info + memory keys) behind a JSON header
with the agent name, the KV spec and the tensor's base address; a writer builds remote descriptors
as base + chunk offset (base.py's region map). The decode side does nothing per request: UCX
(shared memory/CMA on one host, RDMA or TCP across hosts) places the bytes, and the prefill side
polls its transfer handle until DONE. That is also why there is no checksum here: the bytes never
pass through a buffer that could be reused or torn, and the fabric has its own integrity checks.

Descriptors: one per (layer, K/V, block) chunk, e.g. 30 layers x 2 x 64 blocks = 3840, built
with numpy in well under a millisecond; runs of chunks adjacent on both sides are coalesced first
(a block pool hands out consecutive ids), which cuts them by the run length. Descriptors are built
per request with initialize_xfer rather than pre-prepped for every block of both tensors (vLLM's
prep_xfer_dlist scheme), because the peer's tensor can hold millions of chunks and peers come
and go, while per-request building costs far less than the transfer.

Transfer tokens (docs/design.md §11) are NOT checked before bytes land. A WRITE is one-sided: the
receiver's CPU runs no baton code between the writer posting it and the bytes being in memory
(UCX's RDMA puts, CMA's process_vm_writev, shared-memory copies), so there is nothing that could
look at a token first. write_blocks still takes the token (and refuses to start without one),
and grant/revoke keep the same bookkeeping as everywhere, but the receiver never sees the token.
What guards the memory instead: the agent metadata with the memory keys of the registered KV
tensor travels only inside the authenticated Prefill RPC (KVDestination, §11's cluster token),
never on a NIXL listener (this agent runs none) or any other port. The keys cover the whole
tensor for the agent's life, so a writer that once held a destination can write any block of it
until the decode worker restarts. (On one host, a process the kernel lets ptrace this one can
write its memory whatever any transport does.) Closing the gap means per-transfer registrations
whose keys die on revoke, not a token check.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

# nixl-cu12 ships the API as `nixl_cu12` (the `nixl` meta-package re-exports the same classes).
from nixl_cu12 import nixl_agent, nixl_agent_config

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

logger = logging.getLogger(__name__)

_BACKEND = "UCX"
_MAX_POLL_SLEEP_S = 1e-3


def _descriptors(addresses: Int64Array, lengths: Int64Array, device_id: int) -> np.ndarray:
    """The Nx3 (address, length, device id) uint64 array NIXL takes as a transfer list."""
    out = np.empty((addresses.size, 3), dtype=np.uint64)
    out[:, 0] = addresses
    out[:, 1] = lengths
    out[:, 2] = device_id
    return out


def _skip_ucx_ib_without_devices() -> None:
    """Keep UCX from loading its InfiniBand module on a host with no RDMA device.

    The module is useless there, and where libibverbs is installed anyway (CPU containers often
    carry it) it pulls in nixl-cu12's bundled libnl-route, whose destructor segfaults at process
    exit (rtnl_tc_unregister in _dl_fini): every process that made an agent would exit with 139.
    UCX reads the variable when its plugin is first loaded, i.e. at the first agent; an explicit
    UCX_MODULES from the deployment wins.
    """
    devices = Path("/sys/class/infiniband")
    if not (devices.is_dir() and any(devices.iterdir())):
        os.environ.setdefault("UCX_MODULES", "^ib")


class NixlTransport(KVTransport):
    """KV blocks as NIXL WRITE transfers from this worker's tensor into a peer's."""

    name: ClassVar[str] = "nixl"

    def __init__(
        self, kv_cache: torch.Tensor, worker_id: str, config: TransportConfig | None = None
    ) -> None:
        super().__init__(kv_cache, worker_id, config)
        # Agent names must be unique among the peers an agent talks to; a restarted worker with
        # the same worker_id is a new agent with new memory keys, so add a random suffix.
        self.agent_name = f"{worker_id}-{uuid.uuid4().hex[:12]}"
        # No listener thread: metadata travels in the KVDestination protobuf, not NIXL's
        # side channel. The progress thread lets UCX complete transfers while we sleep-poll.
        agent_config = nixl_agent_config(
            enable_prog_thread=True, enable_listen_thread=False, backends=[_BACKEND]
        )
        _skip_ucx_ib_without_devices()
        try:
            self._agent = nixl_agent(self.agent_name, agent_config)
        except Exception as e:
            raise TransportError(f"cannot create NIXL agent: {e}") from e
        if _BACKEND not in self._agent.backends:
            raise TransportError(f"NIXL {_BACKEND} backend is unavailable")
        # Without a listener the agent runs in NIXL_THREAD_SYNC_NONE mode: we serialise calls.
        self._lock = threading.Lock()
        self._closed = False
        self._peers: dict[str, bytes] = {}
        """Remote agent name -> the metadata blob loaded for it."""
        self._mem_type = "DRAM" if kv_cache.is_cpu else "VRAM"
        self._device_id = 0 if kv_cache.is_cpu else kv_cache.get_device()
        self._base_addr = kv_cache.data_ptr()
        try:
            self._registration = self._agent.register_memory(kv_cache)
        except Exception as e:
            raise TransportError(f"cannot register the KV cache with NIXL: {e}") from e

    def metadata(self) -> bytes:
        header = {
            "worker_id": self.worker_id,
            "spec": self.spec.to_json(),
            "agent_name": self.agent_name,
            "base_addr": self._base_addr,
            "device_id": self._device_id,
            "mem_type": self._mem_type,
        }
        return pack_metadata(self.name, header, self._agent.get_agent_metadata())

    def _write(
        self, peer: PeerInfo, request_id: str, token: str, src: Int64Array, dst: Int64Array
    ) -> None:
        # token: unused on the wire, see the module docstring; the receiver cannot check it.
        try:
            remote_name = str(peer.header["agent_name"])
            remote_base = int(peer.header["base_addr"])
            remote_device = int(peer.header["device_id"])
            remote_mem = str(peer.header["mem_type"])
        except (KeyError, TypeError, ValueError) as e:
            raise TransportError(f"malformed NIXL peer metadata: {e}") from e
        src_off, dst_off, lengths = coalesce_chunks(
            block_chunk_offsets(self.spec, src),
            block_chunk_offsets(peer.spec, dst),
            self.spec.chunk_bytes,
        )
        local = _descriptors(self._base_addr + src_off, lengths, self._device_id)
        remote = _descriptors(remote_base + dst_off, lengths, remote_device)
        deadline = time.monotonic() + self.config.timeout_s
        where = f"write of {request_id} to {peer.worker_id} ({remote_name})"

        with self._lock:
            if self._closed:
                raise TransportError("transport is closed")
            try:
                self._ensure_peer(remote_name, peer.blob)
                handle = self._agent.initialize_xfer(
                    "WRITE",
                    self._agent.get_xfer_descs(local, self._mem_type),
                    self._agent.get_xfer_descs(remote, remote_mem),
                    remote_name,
                )
                state = self._agent.transfer(handle)
            except Exception as e:
                self._forget_peer(remote_name)
                raise TransportError(f"{where} could not start: {e}") from e

        sleep_s = 1e-5
        while state == "PROC" and time.monotonic() < deadline:
            time.sleep(sleep_s)
            sleep_s = min(sleep_s * 2, _MAX_POLL_SLEEP_S)
            with self._lock:
                try:
                    state = self._agent.check_xfer_state(handle)
                except Exception as e:
                    logger.warning("NIXL %s: state check failed: %s", where, e)
                    state = "ERR"

        with self._lock:
            if state != "DONE":
                # The peer may be gone: drop its metadata so the next write reconnects afresh.
                self._forget_peer(remote_name)
            try:
                self._agent.release_xfer_handle(handle)  # cancels it if still in flight
            except Exception as e:
                logger.warning("NIXL %s: releasing the transfer failed: %s", where, e)
        if state == "PROC":
            raise TransportError(f"{where} timed out after {self.config.timeout_s:.1f}s")
        if state != "DONE":
            raise TransportError(f"{where} failed (NIXL state {state})")

    def _ensure_peer(self, remote_name: str, blob: bytes) -> None:
        if remote_name == self.agent_name or self._peers.get(remote_name) == blob:
            return  # loopback needs no remote metadata; known peers are loaded once
        if remote_name in self._peers:
            self._forget_peer(remote_name)
        loaded = self._agent.add_remote_agent(blob)
        loaded_name = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        if loaded_name != remote_name:
            self._agent.remove_remote_agent(loaded_name)
            raise TransportError(f"peer metadata names agent {loaded_name!r}, not {remote_name!r}")
        self._peers[remote_name] = blob

    def _forget_peer(self, remote_name: str) -> None:
        if self._peers.pop(remote_name, None) is not None:
            try:
                self._agent.remove_remote_agent(remote_name)
            except Exception as e:
                logger.warning("NIXL: removing agent %s failed: %s", remote_name, e)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for remote_name in list(self._peers):
                self._forget_peer(remote_name)
            try:
                self._agent.deregister_memory(self._registration)
            except Exception as e:
                logger.warning("NIXL: deregistering the KV cache failed: %s", e)
