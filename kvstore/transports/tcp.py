"""Plain TCP KV transport: the fallback that works anywhere, no RDMA or UCX needed.

Decode side: a listener thread started on construction (port 0 = ephemeral) and one thread per
connected peer. Prefill side: one cached connection per peer (reconnects once when a cached
connection turns out dead), serialised by a lock.

One write is one frame on the wire:

    request:  "BKVW" | u32 header_len | u64 payload_len | JSON header
              then per segment: u64 seg_len | u32 crc32(segment) | segment bytes
    reply:    "BKVA" | u8 status (0 ok, 1 error) | u32 msg_len | UTF-8 message

The payload is the source blocks gathered into one contiguous [L * 2, n, block_size, H, D] buffer,
cut into segments of whole (layer, K/V) planes of about 4 MiB. Each segment carries its own CRC32
so that both ends pipeline: the sender gathers (index_select) and checksums segment i+1 on a helper
thread while it sends segment i straight from the buffer's memory; the receiver checks and
scatters (index_copy_) segment i on a helper thread while it receives segment i+1. A segment is
scattered only after its CRC matched (docs/design.md §4: KV read from anywhere is checked before
use); a mismatch anywhere fails the whole write, which leaves the destination blocks unspecified,
as the transport contract allows: the decode worker does not use them until the acknowledgement.
write_blocks returns after that acknowledgement. CRC32, gather and scatter all release the GIL.

Who may write (docs/design.md §11): the JSON header carries the transfer token. Before it
scatters anything the receiver checks that the token is granted now and that every destination
block id is among the ids granted to it; a refused write's payload is read and discarded
segment by segment into a small scratch buffer (never the KV tensor, never a buffer the size the
stranger asked for), so the stream stays in sync and the writer gets the reason in the reply.
Each segment's scatter also runs inside the token's grant (TransferGrants.writing): a revoke
that lands mid-transfer stops the segments after it and waits for the one being scattered, so
once revoke() has returned no byte of that transfer is written. This holds against anyone who
can reach the port but never saw the token: the token travels only inside the Prefill RPC.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, ClassVar, TypeVar

import torch

from baton.kvstore.transports.base import (
    Int64Array,
    KVCacheSpec,
    KVTransport,
    PeerInfo,
    TransportConfig,
    TransportError,
    check_block_ids,
    pack_metadata,
)

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

_REQUEST = struct.Struct("!4sIQ")
_SEGMENT = struct.Struct("!QI")
_REPLY = struct.Struct("!4sBI")
_REQUEST_MAGIC = b"BKVW"
_REPLY_MAGIC = b"BKVA"
_STATUS_OK = 0
_STATUS_ERROR = 1
_MAX_HEADER_BYTES = 16 << 20
_SEGMENT_BYTES = 4 << 20
"""Pipelining grain: small enough to overlap gather/CRC with the wire, large enough that the
per-segment Python overhead (a few microseconds) stays far below its ~1 ms on the wire."""
_SOCKET_BUFFER_BYTES = 4 << 20
"""Large enough to keep a loopback or datacenter pipe full between two sendall slices."""
_DRAIN_BYTES = 1 << 20
"""Scratch for reading a refused write's payload: bounded whatever length the writer claimed."""


def _tune(sock: socket.socket) -> None:
    # Nagle would hold the small segment headers and the reply back behind delayed ACKs.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # The receiving side reads without a timeout (requests come when they come): keepalive
    # reaps a connection whose sender host vanished without a FIN or RST.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)


def _recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n


def _recv_exact(sock: socket.socket, num_bytes: int) -> bytes:
    buf = bytearray(num_bytes)
    _recv_exact_into(sock, memoryview(buf))
    return bytes(buf)


def _drain(sock: socket.socket, payload_len: int) -> None:
    """Read and discard one payload, segment framing included: a refused write stays in sync."""
    scratch = memoryview(bytearray(min(payload_len, _DRAIN_BYTES)))
    offset = 0
    while offset < payload_len:
        seg_len, _ = _SEGMENT.unpack(_recv_exact(sock, _SEGMENT.size))
        if not 0 < seg_len <= payload_len - offset:
            raise ConnectionError(f"bad segment length {seg_len}")
        left = seg_len
        while left:
            n = min(left, len(scratch))
            _recv_exact_into(sock, scratch[:n])
            left -= n
        offset += seg_len


def _as_memoryview(data: torch.Tensor) -> memoryview:
    """Zero-copy byte view of a contiguous CPU tensor (any dtype, bf16 included)."""
    return data.reshape(-1).view(torch.uint8).numpy().data


def _run_inline(fn: Callable[..., _T], *args: Any) -> Future[_T]:
    """ThreadPoolExecutor.submit's signature, run on the calling thread."""
    future: Future[_T] = Future()
    future.set_result(fn(*args))
    return future


class _ByteBuffer:
    """A reusable host buffer: one allocation (and one round of page faults) per connection."""

    def __init__(self) -> None:
        self._data = torch.empty(0, dtype=torch.uint8)

    def take(self, num_bytes: int) -> torch.Tensor:
        if self._data.numel() < num_bytes:
            self._data = torch.empty(num_bytes, dtype=torch.uint8)
        return self._data[:num_bytes]


class _PeerConnection:
    """The prefill side's cached connection to one decode worker."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.lock = threading.Lock()
        """Held for a whole request/reply exchange; also guards send_buffer."""
        self.sock: socket.socket | None = None
        self.send_buffer = _ByteBuffer()

    def connect(self, timeout_s: float) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=timeout_s)
        _tune(sock)
        self.sock = sock
        return sock

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class TcpTransport(KVTransport):
    """KV blocks over one TCP stream per peer pair, checksummed end to end."""

    name: ClassVar[str] = "tcp"

    def __init__(
        self, kv_cache: torch.Tensor, worker_id: str, config: TransportConfig | None = None
    ) -> None:
        super().__init__(kv_cache, worker_id, config)
        self.fault_hook: Callable[[memoryview], None] | None = None
        """Test-only: called on each segment after its checksum is taken and before it is sent,
        so a test can corrupt bytes "in flight"."""
        # [L * 2, num_blocks, block_size, H, D]: a (layer, K/V) plane per row, so a segment of
        # whole planes is one slice and one index_select / index_copy_ on dim 1.
        self._planes = kv_cache.view(self.spec.num_layers * 2, *self.spec.shape[2:])
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"kv-tcp-{worker_id}")
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._peers: dict[tuple[str, int], _PeerConnection] = {}
        self._server_conns: dict[socket.socket, threading.Thread] = {}

        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _tune(self._listener)  # accepted sockets inherit the buffer sizes (window scale)
        self._listener.bind((self.config.host, 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self.host = self.config.host
        if self.host in ("", "0.0.0.0"):
            self.host = socket.gethostbyname(socket.gethostname())
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"kv-tcp-accept-{worker_id}", daemon=True
        )
        self._accept_thread.start()

    def metadata(self) -> bytes:
        header = {
            "worker_id": self.worker_id,
            "spec": self.spec.to_json(),
            "host": self.host,
            "port": self.port,
        }
        return pack_metadata(self.name, header)

    def _segments(self, num_blocks: int) -> list[tuple[int, int]]:
        """[plane_start, plane_end) of each segment for a write of num_blocks blocks."""
        num_planes = self._planes.shape[0]
        plane_bytes = num_blocks * self.spec.chunk_bytes
        step = max(1, _SEGMENT_BYTES // plane_bytes)
        return [(p, min(p + step, num_planes)) for p in range(0, num_planes, step)]

    # ---- prefill side ------------------------------------------------------------------------

    def _write(
        self, peer: PeerInfo, request_id: str, token: str, src: Int64Array, dst: Int64Array
    ) -> None:
        address = (str(peer.header["host"]), int(peer.header["port"]))
        with self._lock:
            if self._closed.is_set():
                raise TransportError("transport is closed")
            conn = self._peers.setdefault(address, _PeerConnection(address))
        with conn.lock:
            shape = (self._planes.shape[0], len(src), *self.spec.block_shape)
            out = conn.send_buffer.take(len(src) * self.spec.block_bytes)
            out = out.view(self.kv_cache.dtype).view(shape)
            index = torch.from_numpy(src).to(self.kv_cache.device)
            segments = self._segments(len(src))
            # One segment has nothing to overlap with: skip the thread hand-off (~0.1 ms).
            run = _run_inline if len(segments) == 1 else self._pool.submit
            parts = [
                (out[p0:p1], run(self._gather, p0, p1, index, out[p0:p1])) for p0, p1 in segments
            ]
            header = {"request_id": request_id, "token": token, "dst_block_ids": dst.tolist()}
            body = json.dumps({**header, "spec": self.spec.to_json()}).encode()
            head = _REQUEST.pack(_REQUEST_MAGIC, len(body), out.numel() * out.element_size())
            try:
                status, message = self._exchange(conn, peer.worker_id, head + body, parts)
            finally:
                # An aborted exchange must not leave gathers writing into the reused buffer.
                wait([future for _, future in parts])
        if status != _STATUS_OK:
            raise TransportError(f"peer {peer.worker_id} rejected {request_id}: {message}")

    def _gather(self, p0: int, p1: int, index: torch.Tensor, out: torch.Tensor) -> int:
        """Copy planes [p0, p1) of the source blocks into out; return the segment's CRC32."""
        if self.kv_cache.is_cpu:
            torch.index_select(self._planes[p0:p1], 1, index, out=out)
        else:
            out.copy_(self._planes[p0:p1].index_select(1, index))
        return zlib.crc32(_as_memoryview(out))

    def _exchange(
        self,
        conn: _PeerConnection,
        peer_id: str,
        head: bytes,
        parts: Sequence[tuple[torch.Tensor, Future[int]]],
    ) -> tuple[int, str]:
        """Send one frame and read the reply; one retry if a cached connection was stale."""
        timeout_s = self.config.timeout_s
        deadline = time.monotonic() + timeout_s

        def send(sock: socket.socket, data: bytes | memoryview) -> None:
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            sock.sendall(data)

        for attempt in range(2):
            reused = conn.sock is not None
            try:
                sock = conn.sock or conn.connect(timeout_s)
                send(sock, head)
                for segment, crc in parts:
                    view = _as_memoryview(segment)
                    send(sock, _SEGMENT.pack(len(view), crc.result()))
                    if self.fault_hook is not None and attempt == 0:
                        self.fault_hook(view)
                    send(sock, view)
                sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                magic, status, msg_len = _REPLY.unpack(_recv_exact(sock, _REPLY.size))
                if magic != _REPLY_MAGIC:
                    raise ConnectionError(f"bad reply magic {magic!r}")
                return status, _recv_exact(sock, msg_len).decode(errors="replace")
            except TimeoutError as e:
                conn.drop()
                raise TransportError(
                    f"write to {peer_id} at {conn.address} timed out after {timeout_s:.1f}s"
                ) from e
            except OSError as e:
                conn.drop()
                # A connection from the cache may have died since its last use (peer restart,
                # idle reset): the write is idempotent, so resend once on a fresh one.
                if reused and attempt == 0 and time.monotonic() < deadline:
                    continue
                raise TransportError(f"write to {peer_id} at {conn.address} failed: {e}") from e
        raise AssertionError("unreachable")

    # ---- decode side -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            _tune(sock)
            with self._lock:
                if self._closed.is_set():
                    sock.close()
                    return
                for done in [s for s, t in self._server_conns.items() if not t.is_alive()]:
                    del self._server_conns[done]
                thread = threading.Thread(
                    target=self._serve_connection, args=(sock,), name="kv-tcp-recv", daemon=True
                )
                self._server_conns[sock] = thread
            thread.start()

    def _serve_connection(self, sock: socket.socket) -> None:
        buffer = _ByteBuffer()
        try:
            while not self._closed.is_set():
                try:
                    head = _recv_exact(sock, _REQUEST.size)
                except ConnectionError:
                    return  # the peer hung up between requests
                magic, header_len, payload_len = _REQUEST.unpack(head)
                if magic != _REQUEST_MAGIC or header_len > _MAX_HEADER_BYTES:
                    logger.warning("dropping KV connection: bad frame header")
                    return
                header = json.loads(_recv_exact(sock, header_len))
                if not isinstance(header, dict):
                    logger.warning("dropping KV connection: request header is not an object")
                    return
                status, message = self._receive(sock, buffer, header, payload_len)
                msg = message.encode()
                sock.sendall(_REPLY.pack(_REPLY_MAGIC, status, len(msg)) + msg)
        except (OSError, ValueError) as e:
            if not self._closed.is_set():
                logger.warning("KV connection failed: %s", e)
        finally:
            sock.close()  # close() joins this thread; the accept loop forgets it once it ended

    def _receive(
        self, sock: socket.socket, buffer: _ByteBuffer, header: dict[str, Any], payload_len: int
    ) -> tuple[int, str]:
        """Read one payload; each segment is scattered only once its CRC matched, and only
        under a granted token (the header is checked before the first byte is read)."""
        if payload_len > self.kv_cache.numel() * self.kv_cache.element_size():
            raise ConnectionError(f"refusing a {payload_len}-byte payload")
        try:
            dst, token = self._check_request(header, payload_len)
        except TransportError as e:
            _drain(sock, payload_len)  # into scratch, not the cache: the stream stays in sync
            return _STATUS_ERROR, str(e)
        index = torch.from_numpy(dst).to(self.kv_cache.device)
        plane_bytes = len(dst) * self.spec.chunk_bytes
        data = buffer.take(payload_len)
        view = _as_memoryview(data)
        checks: list[Future[str]] = []
        offset = 0
        while offset < payload_len:
            seg_len, crc = _SEGMENT.unpack(_recv_exact(sock, _SEGMENT.size))
            if not 0 < seg_len <= payload_len - offset:
                raise ConnectionError(f"bad segment length {seg_len}")
            if offset % plane_bytes or seg_len % plane_bytes:
                raise ConnectionError("segment does not cover whole (layer, K/V) planes")
            _recv_exact_into(sock, view[offset : offset + seg_len])
            segment = data[offset : offset + seg_len]
            p0 = offset // plane_bytes
            run = _run_inline if seg_len == payload_len else self._pool.submit
            checks.append(run(self._scatter, segment, crc, p0, index, token))
            offset += seg_len
        errors = [check.result() for check in checks]  # every scatter has ended
        error = next((e for e in errors if e), "")
        if error:
            return _STATUS_ERROR, f"{error} in request {header.get('request_id')}"
        return _STATUS_OK, ""

    def _scatter(
        self, segment: torch.Tensor, crc: int, p0: int, index: torch.Tensor, token: str
    ) -> str:
        """Check one segment and write it into the cache; why not ("" when written)."""
        if zlib.crc32(_as_memoryview(segment)) != crc:
            return "checksum mismatch"
        with self._grants.writing(token) as granted:
            if not granted:
                return "transfer token was revoked during the write"
            shape = (-1, len(index), *self.spec.block_shape)
            blocks = segment.view(self.kv_cache.dtype).view(shape).to(self.kv_cache.device)
            self._planes[p0 : p0 + blocks.shape[0]].index_copy_(1, index, blocks)
        return ""

    def _check_request(self, header: dict[str, Any], payload_len: int) -> tuple[Int64Array, str]:
        """The receiver trusts nothing: check the token's grant, then re-check spec, ids and
        size against its own tensor. Returns the destination ids and the token."""
        token = header.get("token")
        if not isinstance(token, str):
            token = ""  # refused just below as carrying no token
        # Strangers first: a write without a granted token learns nothing about the ids.
        refusal = self._grants.refusal(token, ())
        if refusal is not None:
            raise TransportError(refusal)
        try:
            ids = header["dst_block_ids"]
            # The same ids on both sides: checks range and duplicates against our own tensor.
            _, dst = check_block_ids(ids, ids, self.spec.num_blocks, self.spec.num_blocks)
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise TransportError(f"malformed request header: {e!r}") from e
        refusal = self._grants.refusal(token, dst.tolist())
        if refusal is not None:
            raise TransportError(refusal)
        try:
            self.spec.check_peer(KVCacheSpec.from_json(header["spec"]))
        except (KeyError, TypeError) as e:
            raise TransportError(f"malformed request header: {e!r}") from e
        if len(dst) == 0 or payload_len != len(dst) * self.spec.block_bytes:
            raise TransportError(
                f"payload of {payload_len} bytes for {len(dst)} blocks of {self.spec.block_bytes}"
            )
        return dst, token

    def close(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            server_conns = dict(self._server_conns)
            peers = list(self._peers.values())
        # shutdown() wakes a thread blocked in accept()/recv(); close() alone may not on Linux.
        for sock in [self._listener, *server_conns]:
            with contextlib.suppress(OSError):  # already closed by its own thread
                sock.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in peers:
            with conn.lock:
                conn.drop()
        # Join rather than leave daemon threads behind: one still inside a torch op when the
        # interpreter exits is killed mid-C++ and aborts the process.
        for thread in [self._accept_thread, *server_conns.values()]:
            thread.join(timeout=5.0)
        self._pool.shutdown(wait=True)
