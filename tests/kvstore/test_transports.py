"""KV transports against real peers: in one process, and across two (spawned) processes.

The oracle is the source tensor itself: after write_blocks, the destination's blocks dst[i]
equal the source's src[i] in every layer, K and V, and every other destination block is as it
was. Data is random (never zeros), ids shuffled and non-contiguous, the two tensors of different
num_blocks. No mocks: real sockets, real NIXL/UCX, real Mooncake where it is installed. Every
write here is under a token its destination granted for all its blocks; what a token refuses is
tested in test_transfer_tokens.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest
import torch

from baton.kvstore.transports.base import (
    KVCacheSpec,
    KVTransport,
    TransportConfig,
    TransportError,
    block_chunk_offsets,
    coalesce_chunks,
)
from baton.kvstore.transports.bench import block_digest, random_kv, receiver_main
from baton.kvstore.transports.grants import new_transfer_token
from baton.kvstore.transports.registry import create_transport, is_available, transport_names
from baton.kvstore.transports.tcp import TcpTransport

TRANSPORTS = [
    pytest.param(
        name, marks=pytest.mark.skipif(not is_available(name), reason=f"{name} not installed")
    )
    for name in transport_names()
]
DTYPES = [torch.bfloat16, torch.float32]
SMALL = (3, 2, 0, 4, 2, 8)
"""[layers, 2, blocks, block_size, heads, dim] with blocks filled in per tensor."""
MEDIUM = (4, 2, 0, 16, 4, 64)
"""16 KiB fp32 chunks: 64 blocks make 8 MiB, several TCP segments."""
FAST = TransportConfig(timeout_s=5.0)


def _shape(layout: tuple[int, ...], num_blocks: int) -> tuple[int, ...]:
    return (*layout[:2], num_blocks, *layout[3:])


def _ids(rng: np.random.Generator, num_blocks: int, n: int) -> list[int]:
    ids: list[int] = rng.permutation(num_blocks)[:n].tolist()
    return ids


def _grant_all(receiver: KVTransport) -> str:
    """A fresh token that receiver lets into every one of its blocks."""
    token = new_transfer_token()
    receiver.grant(token, range(receiver.spec.num_blocks))
    return token


def _check_written(
    src_kv: torch.Tensor, dst_kv: torch.Tensor, before: torch.Tensor, src: list[int], dst: list[int]
) -> None:
    assert torch.equal(dst_kv[:, :, dst], src_kv[:, :, src])
    others = sorted(set(range(dst_kv.shape[2])) - set(dst))
    assert torch.equal(dst_kv[:, :, others], before[:, :, others])


# ---- the region map ---------------------------------------------------------------------------


def test_chunk_offsets_follow_the_tensor_layout() -> None:
    kv = random_kv(_shape(SMALL, 11), torch.bfloat16, 0)
    spec = KVCacheSpec.from_tensor(kv)
    ids = np.array([7, 0, 3], dtype=np.int64)
    offsets = block_chunk_offsets(spec, ids)
    expected = [
        kv[layer, t, b].data_ptr() - kv.data_ptr()
        for layer in range(spec.num_layers)
        for t in range(2)
        for b in ids
    ]
    assert offsets.tolist() == expected
    assert spec.chunk_bytes == kv[0, 0, 0].numel() * kv.element_size()


def test_coalesce_merges_only_runs_adjacent_on_both_sides() -> None:
    src = np.array([0, 10, 20, 30, 50], dtype=np.int64)
    dst = np.array([100, 110, 120, 200, 210], dtype=np.int64)
    starts_src, starts_dst, lengths = coalesce_chunks(src, dst, 10)
    assert starts_src.tolist() == [0, 30, 50]
    assert starts_dst.tolist() == [100, 200, 210]
    assert lengths.tolist() == [30, 10, 10]


# ---- in one process ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", TRANSPORTS)
def test_write_in_process(name: str, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(1)
    src_kv = random_kv(_shape(SMALL, 40), dtype, 1)
    dst_kv = random_kv(_shape(SMALL, 57), dtype, 2)
    before = dst_kv.clone()
    with (
        create_transport(name, src_kv, "prefill", FAST) as sender,
        create_transport(name, dst_kv, "decode", FAST) as receiver,
    ):
        token = _grant_all(receiver)
        src, dst = _ids(rng, 40, 13), _ids(rng, 57, 13)
        stats = sender.write_blocks(receiver.metadata(), "req-1", src, dst, token=token)
        _check_written(src_kv, dst_kv, before, src, dst)
        assert stats.num_bytes == 13 * sender.spec.block_bytes and stats.seconds > 0
        # A second request to the same peer reuses its connection / remote agent.
        before = dst_kv.clone()
        src2 = [1, 2, 3, 39]
        dst2 = [d for d in range(57) if d not in dst][:4]
        sender.write_blocks(receiver.metadata(), "req-2", src2, dst2, token=token)
        _check_written(src_kv, dst_kv, before, src2, dst2)
        assert sender.write_blocks(receiver.metadata(), "empty", [], [], token=token).num_bytes == 0


@pytest.mark.parametrize("name", TRANSPORTS)
def test_concurrent_writes_from_threads(name: str) -> None:
    src_kv = random_kv(_shape(MEDIUM, 70), torch.float32, 3)
    dst_kv = random_kv(_shape(MEDIUM, 80), torch.float32, 4)
    before = dst_kv.clone()
    with (
        create_transport(name, src_kv, "prefill", FAST) as sender,
        create_transport(name, dst_kv, "decode", FAST) as receiver,
    ):
        rng = np.random.default_rng(2)
        src, dst = _ids(rng, 70, 48), _ids(rng, 80, 48)
        errors: list[BaseException] = []
        # One transfer per thread, each under its own token for its own blocks.
        tokens = [new_transfer_token() for _ in range(3)]
        for part, token in enumerate(tokens):
            receiver.grant(token, dst[part * 16 : (part + 1) * 16])

        def write(part: int) -> None:
            try:
                sl = slice(part * 16, (part + 1) * 16)
                sender.write_blocks(
                    receiver.metadata(), f"r{part}", src[sl], dst[sl], token=tokens[part]
                )
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors
        _check_written(src_kv, dst_kv, before, src, dst)


@pytest.mark.parametrize("name", TRANSPORTS)
def test_rejects_incompatible_peers_before_moving_bytes(name: str) -> None:
    src_kv = random_kv(_shape(SMALL, 8), torch.bfloat16, 5)
    other_dtype = random_kv(_shape(SMALL, 8), torch.float32, 6)
    other_heads = random_kv((3, 2, 8, 4, 3, 8), torch.bfloat16, 7)
    with (
        create_transport(name, src_kv, "prefill", FAST) as sender,
        create_transport(name, other_dtype, "decode-fp32", FAST) as fp32_peer,
        create_transport(name, other_heads, "decode-3h", FAST) as heads_peer,
        TcpTransport(random_kv(_shape(SMALL, 8), torch.bfloat16, 8), "tcp-peer") as tcp_peer,
    ):
        before = [other_dtype.clone(), other_heads.clone()]
        token = new_transfer_token()
        for peer in (fp32_peer, heads_peer, tcp_peer):
            peer.grant(token, [0])
        with pytest.raises(TransportError, match="dtype"):
            sender.write_blocks(fp32_peer.metadata(), "r", [0], [0], token=token)
        with pytest.raises(TransportError, match="shape"):
            sender.write_blocks(heads_peer.metadata(), "r", [0], [0], token=token)
        if name != "tcp":
            with pytest.raises(TransportError, match="for transport 'tcp'"):
                sender.write_blocks(tcp_peer.metadata(), "r", [0], [0], token=token)
        with pytest.raises(TransportError, match="not baton KV transport metadata"):
            sender.write_blocks(b"garbage-metadata", "r", [0], [0], token=token)
        assert torch.equal(other_dtype, before[0]) and torch.equal(other_heads, before[1])


@pytest.mark.parametrize("name", TRANSPORTS)
def test_rejects_bad_block_ids(name: str) -> None:
    src_kv = random_kv(_shape(SMALL, 8), torch.bfloat16, 9)
    dst_kv = random_kv(_shape(SMALL, 5), torch.bfloat16, 10)
    before = dst_kv.clone()
    with (
        create_transport(name, src_kv, "prefill", FAST) as sender,
        create_transport(name, dst_kv, "decode", FAST) as receiver,
    ):
        peer = receiver.metadata()
        token = _grant_all(receiver)
        cases: list[tuple[list[int], list[int], str]] = [
            ([8], [0], "source block id out of range"),
            ([-1], [0], "source block id out of range"),
            ([0], [5], "destination block id out of range"),
            ([0, 1], [2], "2 source block ids but 1"),
            ([0, 1], [3, 3], "duplicate destination"),
        ]
        for src, dst, message in cases:
            with pytest.raises(TransportError, match=message):
                sender.write_blocks(peer, "r", src, dst, token=token)
    assert torch.equal(dst_kv, before)


def test_tcp_checksum_mismatch_is_detected_and_nothing_bad_is_scattered() -> None:
    src_kv = random_kv(_shape(MEDIUM, 70), torch.float32, 11)
    dst_kv = random_kv(_shape(MEDIUM, 80), torch.float32, 12)
    before = dst_kv.clone()
    with TcpTransport(src_kv, "prefill", FAST) as sender, TcpTransport(dst_kv, "decode") as peer:
        rng = np.random.default_rng(3)
        src, dst = _ids(rng, 70, 64), _ids(rng, 80, 64)
        token = _grant_all(peer)
        corrupted: list[int] = []

        def flip_a_bit_in_segment_2(segment: memoryview) -> None:
            corrupted.append(len(segment))
            if len(corrupted) == 2:  # the second segment: the first was scattered already
                segment[17] ^= 0x40

        sender.fault_hook = flip_a_bit_in_segment_2
        with pytest.raises(TransportError, match="checksum mismatch"):
            sender.write_blocks(peer.metadata(), "corrupt", src, dst, token=token)
        # 64 blocks x 16 KiB chunks = 1 MiB per (layer, K/V) plane: two 4-plane segments.
        assert corrupted == [4 << 20, 4 << 20]
        # The segment with the flipped bit never reached the cache: its planes are untouched.
        assert torch.equal(dst_kv.view(8, 80, -1)[4:], before.view(8, 80, -1)[4:])
        # The connection stays in sync: the same write without the fault goes through.
        sender.fault_hook = None
        sender.write_blocks(peer.metadata(), "clean", src, dst, token=token)
        _check_written(src_kv, dst_kv, before, src, dst)


# ---- across processes -------------------------------------------------------------------------


def _ask(conn: Connection, *command: Any) -> Any:
    conn.send(command)
    if not conn.poll(60):
        raise TimeoutError(f"peer process did not answer {command[0]}")
    reply = conn.recv()
    if isinstance(reply, tuple) and reply[:1] == ("error",):
        raise RuntimeError(f"peer process failed: {reply[1]}")
    return reply


@pytest.fixture(scope="module")
def peer_process() -> Iterator[Connection]:
    """A decode-worker process that owns its KV tensors (bench.receiver_main)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver_main, args=(child,), daemon=True)
    proc.start()
    yield parent
    _ask(parent, "exit")
    proc.join(timeout=30)
    assert proc.exitcode == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", TRANSPORTS)
def test_write_across_processes(peer_process: Connection, name: str, dtype: torch.dtype) -> None:
    dtype_name = str(dtype).removeprefix("torch.")
    handle, metadata = _ask(peer_process, "open", name, dtype_name, _shape(MEDIUM, 90), 20, 5.0)
    token = new_transfer_token()
    _ask(peer_process, "grant", handle, token, list(range(90)))
    src_kv = random_kv(_shape(MEDIUM, 70), dtype, 21)
    rng = np.random.default_rng(4)
    with create_transport(name, src_kv, "prefill", FAST) as sender:
        src, dst = _ids(rng, 70, 64), _ids(rng, 90, 64)
        sender.write_blocks(metadata, "req-1", src, dst, token=token)
        digest, untouched = _ask(peer_process, "digest", handle, dst)
        assert digest == block_digest(src_kv, src)
        assert untouched
        src2, dst2 = [5, 6, 7], [d for d in range(90) if d not in dst][:3]
        sender.write_blocks(metadata, "req-2", src2, dst2, token=token)
        digest, _ = _ask(peer_process, "digest", handle, dst2)
        assert digest == block_digest(src_kv, src2)


def test_dead_peer_fails_within_the_timeout() -> None:
    names = [name for name in transport_names() if is_available(name)]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver_main, args=(child,), daemon=True)
    proc.start()
    try:
        token = new_transfer_token()
        metadata = {}
        for name in names:
            handle, metadata[name] = _ask(
                parent, "open", name, "float32", _shape(SMALL, 9), 30, 5.0
            )
            _ask(parent, "grant", handle, token, [3, 4])
        senders = {
            name: create_transport(name, random_kv(_shape(SMALL, 9), torch.float32, 31), "p", FAST)
            for name in names
        }
        for name in names:  # alive: the writes go through and connections are cached
            senders[name].write_blocks(metadata[name], "alive", [1, 2], [3, 4], token=token)
        # Hung (stopped) rather than dead: TCP waits for an acknowledgement that never comes.
        # (NIXL's one-sided CMA writes need nothing from a stopped peer, so they would succeed.)
        os.kill(proc.pid, signal.SIGSTOP)
        kv = random_kv(_shape(SMALL, 9), torch.float32, 32)
        with TcpTransport(kv, "p2", TransportConfig(timeout_s=1.0)) as impatient:
            start = time.monotonic()
            with pytest.raises(TransportError, match="timed out"):
                impatient.write_blocks(metadata["tcp"], "hung", [1, 2], [3, 4], token=token)
            assert time.monotonic() - start < 3.0
    finally:
        proc.kill()
        proc.join(timeout=30)
    for name in names:
        start = time.monotonic()
        with pytest.raises(TransportError):
            senders[name].write_blocks(metadata[name], "dead", [1, 2], [3, 4], token=token)
        assert time.monotonic() - start < FAST.timeout_s + 2.0, name
        senders[name].close()


def test_registry_knows_every_transport_and_rejects_unknown_names() -> None:
    assert transport_names() == ["tcp", "nixl", "mooncake"]
    with pytest.raises(ValueError, match="unknown KV transport"):
        create_transport("carrier-pigeon", random_kv(_shape(SMALL, 2), torch.float32, 0), "w")
