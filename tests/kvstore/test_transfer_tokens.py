"""Per-transfer tokens (docs/design.md §11): a KV write lands only under a token its destination
granted, and only in the blocks granted to it.

The oracle for every refusal is the destination tensor's bytes: equal before and after. TCP is
driven both by a second TcpTransport and by a raw socket client speaking the frame format of
tcp.py's docstring, so the receiver's check is tested without the sender's own validation.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import zlib

import numpy as np
import pytest
import torch

from baton.kvstore.transports.base import TransportConfig, TransportError
from baton.kvstore.transports.bench import random_kv
from baton.kvstore.transports.grants import MIN_TOKEN_CHARS, TransferGrants, new_transfer_token
from baton.kvstore.transports.registry import create_transport, is_available, transport_names
from baton.kvstore.transports.tcp import TcpTransport

LAYOUT = (3, 2, 0, 4, 2, 8)
"""[layers, 2, blocks, block_size, heads, dim], blocks filled in per tensor."""
MEDIUM = (4, 2, 0, 16, 4, 64)
"""16 KiB fp32 chunks: 64 blocks make 8 MiB, two 4 MiB TCP segments."""
FAST = TransportConfig(timeout_s=5.0)
TRANSPORTS = [
    pytest.param(
        name, marks=pytest.mark.skipif(not is_available(name), reason=f"{name} not installed")
    )
    for name in transport_names()
]
ONE_SIDED = [p for p in TRANSPORTS if p.values[0] != "tcp"]


def _shape(layout: tuple[int, ...], num_blocks: int) -> tuple[int, ...]:
    return (*layout[:2], num_blocks, *layout[3:])


# ---- the grant table --------------------------------------------------------------------------


def test_a_grant_admits_its_token_into_its_blocks_only_until_revoked() -> None:
    grants = TransferGrants()
    token, other = new_transfer_token(), new_transfer_token()
    grants.grant(token, [3, 5, 8])
    assert len(grants) == 1
    assert grants.refusal(token, [8, 3]) is None
    assert grants.refusal(token, []) is None
    assert "outside" in (grants.refusal(token, [3, 4]) or "")
    assert "not granted" in (grants.refusal(other, [3]) or "")
    assert "not granted" in (grants.refusal(token[:-1] + "?", [3]) or "")
    assert "no transfer token" in (grants.refusal("", [3]) or "")
    assert "not granted" in (grants.refusal("\ud800" * MIN_TOKEN_CHARS, [3]) or "")
    grants.revoke(token)
    grants.revoke(token)  # idempotent
    grants.revoke(other)  # never granted: a no-op
    assert len(grants) == 0
    assert "not granted" in (grants.refusal(token, [3]) or "")


def test_weak_or_reused_tokens_are_refused_at_grant() -> None:
    grants = TransferGrants()
    with pytest.raises(ValueError, match="at least"):
        grants.grant("", [1])
    with pytest.raises(ValueError, match="at least"):
        grants.grant("x" * (MIN_TOKEN_CHARS - 1), [1])
    token = new_transfer_token()
    assert len(token) >= MIN_TOKEN_CHARS and token != new_transfer_token()
    grants.grant(token, [1])
    with pytest.raises(ValueError, match="already granted"):
        grants.grant(token, [2])


def test_revoke_waits_for_a_write_in_progress_and_refuses_later_ones() -> None:
    grants = TransferGrants()
    token = new_transfer_token()
    grants.grant(token, [0])
    inside, release = threading.Event(), threading.Event()
    wrote: list[bool] = []

    def writer() -> None:
        with grants.writing(token) as granted:
            wrote.append(granted)
            inside.set()
            release.wait()

    w = threading.Thread(target=writer)
    w.start()
    assert inside.wait(10)
    r = threading.Thread(target=grants.revoke, args=(token,))
    r.start()
    r.join(timeout=0.2)
    assert r.is_alive()  # revoke is held off while the write is applied
    assert "not granted" in (grants.refusal(token, [0]) or "")  # but new writes are refused
    release.set()
    w.join(timeout=10)
    r.join(timeout=10)
    assert not r.is_alive() and wrote == [True]
    with grants.writing(token) as granted:
        assert not granted


# ---- TCP: the receiver checks before it scatters ----------------------------------------------


class _RawClient:
    """Speaks tcp.py's frame format by hand: what a stranger on the port could send."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def write(self, header: dict[str, object], payload: bytes) -> tuple[int, str]:
        body = json.dumps(header).encode()
        frame = b"BKVW" + struct.pack("!IQ", len(body), len(payload)) + body
        frame += struct.pack("!QI", len(payload), zlib.crc32(payload)) + payload
        self.sock.sendall(frame)
        magic, status, msg_len = struct.unpack("!4sBI", self._recv(9))
        assert magic == b"BKVA"
        return status, self._recv(msg_len).decode()

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "receiver closed the connection"
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def _planes(kv: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """The [L * 2, n, block_size, H, D] payload layout of blocks `ids` of kv."""
    return kv.view(kv.shape[0] * 2, *kv.shape[2:])[:, ids].contiguous()


def test_tcp_refuses_strangers_and_writes_nothing() -> None:
    dst_kv = random_kv(_shape(LAYOUT, 12), torch.bfloat16, 40)
    before = dst_kv.clone()
    payload_kv = random_kv(_shape(LAYOUT, 12), torch.bfloat16, 41)
    with TcpTransport(dst_kv, "decode", FAST) as receiver:
        token = new_transfer_token()
        receiver.grant(token, [2, 7, 9])
        ids = [7, 2]
        payload = _planes(payload_kv, ids).view(torch.uint8).numpy().tobytes()
        header: dict[str, object] = {
            "request_id": "r",
            "dst_block_ids": ids,
            "spec": receiver.spec.to_json(),
        }
        client = _RawClient(receiver.port)
        try:
            refusals: list[tuple[dict[str, object], str]] = [
                (header, "carries no transfer token"),
                ({**header, "token": ""}, "carries no transfer token"),
                ({**header, "token": 12345}, "carries no transfer token"),
                ({**header, "token": new_transfer_token()}, "not granted"),
                ({**header, "token": token, "dst_block_ids": [7, 3]}, "blocks [3] are outside"),
            ]
            for request, why in refusals:
                status, message = client.write(request, payload)
                assert status == 1 and why in message, (request, message)
                assert token not in message
                assert torch.equal(dst_kv, before)
            # One connection throughout: each refused payload was drained, the stream is in sync.
            status, message = client.write({**header, "token": token}, payload)
            assert (status, message) == (0, "")
            assert torch.equal(_planes(dst_kv, ids), _planes(payload_kv, ids))
            others = [b for b in range(12) if b not in ids]
            assert torch.equal(dst_kv[:, :, others], before[:, :, others])
            # After revoke, the same token and blocks are refused, and nothing changes.
            written = dst_kv.clone()
            receiver.revoke(token)
            status, message = client.write({**header, "token": token}, payload[::-1])
            assert status == 1 and "not granted" in message
            assert torch.equal(dst_kv, written)
        finally:
            client.close()
        assert receiver.num_grants == 0


def test_tcp_writer_learns_why_it_was_refused() -> None:
    src_kv = random_kv(_shape(LAYOUT, 10), torch.float32, 42)
    dst_kv = random_kv(_shape(LAYOUT, 14), torch.float32, 43)
    before = dst_kv.clone()
    with (
        TcpTransport(src_kv, "prefill", FAST) as sender,
        TcpTransport(dst_kv, "decode", FAST) as receiver,
    ):
        peer = receiver.metadata()
        token = new_transfer_token()
        receiver.grant(token, [4, 5, 6])
        with pytest.raises(TransportError, match="rejected r1: transfer token is not granted"):
            sender.write_blocks(peer, "r1", [0, 1], [4, 5], token=new_transfer_token())
        with pytest.raises(TransportError, match=r"rejected r2: blocks \[13\] are outside"):
            sender.write_blocks(peer, "r2", [0, 1], [4, 13], token=token)
        assert torch.equal(dst_kv, before)
        sender.write_blocks(peer, "r3", [0, 1, 2], [6, 4, 5], token=token)
        assert torch.equal(dst_kv[:, :, [6, 4, 5]], src_kv[:, :, [0, 1, 2]])
        receiver.revoke(token)
        written = dst_kv.clone()
        with pytest.raises(TransportError, match="rejected r4: transfer token is not granted"):
            sender.write_blocks(peer, "r4", [3], [4], token=token)
        assert torch.equal(dst_kv, written)


def test_tcp_revoke_mid_transfer_stops_the_segments_after_it() -> None:
    src_kv = random_kv(_shape(MEDIUM, 70), torch.float32, 44)
    dst_kv = random_kv(_shape(MEDIUM, 80), torch.float32, 45)
    before = dst_kv.clone()
    with (
        TcpTransport(src_kv, "prefill", FAST) as sender,
        TcpTransport(dst_kv, "decode", FAST) as receiver,
    ):
        rng = np.random.default_rng(5)
        src = rng.permutation(70)[:64].tolist()
        dst = rng.permutation(80)[:64].tolist()
        token = new_transfer_token()
        receiver.grant(token, dst)
        hooked: list[int] = []

        def revoke_before_segment_2(segment: memoryview) -> None:
            hooked.append(len(segment))
            if len(hooked) == 2:  # what the decode worker does when its RPC deadline passes
                receiver.revoke(token)

        sender.fault_hook = revoke_before_segment_2
        # "not granted" if the receiver had not read the header yet when the revoke came.
        with pytest.raises(TransportError, match=r"revoked during the write|not granted"):
            sender.write_blocks(receiver.metadata(), "late", src, dst, token=token)
        assert hooked == [4 << 20, 4 << 20]  # 8 (layer, K/V) planes of 1 MiB: 2 segments
        # The second segment (planes 4..7) was sent only after revoke returned: none of it landed.
        assert torch.equal(dst_kv.view(8, 80, -1)[4:], before.view(8, 80, -1)[4:])


# ---- every transport: the writer needs a token ------------------------------------------------


@pytest.mark.parametrize("name", TRANSPORTS)
def test_a_write_without_a_token_is_refused_before_a_byte_moves(name: str) -> None:
    src_kv = random_kv(_shape(LAYOUT, 6), torch.bfloat16, 46)
    dst_kv = random_kv(_shape(LAYOUT, 6), torch.bfloat16, 47)
    before = dst_kv.clone()
    with (
        create_transport(name, src_kv, "prefill", FAST) as sender,
        create_transport(name, dst_kv, "decode", FAST) as receiver,
    ):
        receiver.grant(new_transfer_token(), range(6))
        with pytest.raises(TransportError, match="carries no transfer token"):
            sender.write_blocks(receiver.metadata(), "r", [0, 1], [2, 3], token="")
    assert torch.equal(dst_kv, before)


@pytest.mark.parametrize("name", ONE_SIDED)
def test_one_sided_transports_cannot_check_the_token(name: str) -> None:
    """The documented limit (nixl.py, mooncake.py): a one-sided write under a token the receiver
    never granted still lands. If this starts failing, the transport learned to check: update
    its docstring and the guarantee in docs/design.md."""
    src_kv = random_kv(_shape(LAYOUT, 6), torch.bfloat16, 48)
    dst_kv = random_kv(_shape(LAYOUT, 6), torch.bfloat16, 49)
    with (
        create_transport(name, src_kv, "prefill", FAST) as sender,
        create_transport(name, dst_kv, "decode", FAST) as receiver,
    ):
        receiver.grant(new_transfer_token(), [0])
        sender.write_blocks(receiver.metadata(), "r", [4, 5], [2, 3], token=new_transfer_token())
        assert torch.equal(dst_kv[:, :, [2, 3]], src_kv[:, :, [4, 5]])
