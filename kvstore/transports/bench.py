"""KV handoff throughput between two processes: `python -m baton.kvstore.transports.bench`.

The parent plays the prefill worker, a spawned child the decode worker. For each transport and
payload size it times write_blocks (median of --repeats after one warm-up), next to a plain
socket copy of the same number of bytes (one sendall of a contiguous buffer into a receiver that
recv_into's a preallocated buffer, then a 1-byte ack): the ceiling a TCP-based transport can
approach on this host. After each transport's runs, outside the timed region, the child's
digest of the destination blocks is compared with the parent's digest of the source blocks.

The layout is a small real model's (SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, 16-token
blocks, bf16: 360 KiB per block), so a size is a realistic number of scattered chunks.

receiver_main is also the peer process of tests/kvstore/test_transports.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import socket
import statistics
import struct
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from baton.kvstore.transports.base import KVTransport, TransportConfig
from baton.kvstore.transports.grants import new_transfer_token
from baton.kvstore.transports.registry import create_transport, is_available, transport_names

_LENGTH = struct.Struct("!Q")


def block_digest(kv_cache: torch.Tensor, block_ids: list[int]) -> str:
    """Digest of blocks block_ids (all layers, K and V) in that order: equal data, equal digest."""
    blocks = kv_cache.index_select(2, torch.tensor(block_ids, dtype=torch.long)).contiguous()
    return hashlib.blake2b(blocks.view(torch.uint8).numpy().data).hexdigest()


def random_kv(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def _socket_sink(listener: socket.socket, capacity: int) -> None:
    """Plain-socket baseline receiver: length-prefixed payloads into one preallocated buffer."""
    buf = np.ones(capacity, dtype=np.uint8).data  # ones: pages touched before timing
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with sock:
            while len(head := sock.recv(_LENGTH.size, socket.MSG_WAITALL)) == _LENGTH.size:
                (num_bytes,) = _LENGTH.unpack(head)
                got = 0
                while got < num_bytes and (n := sock.recv_into(buf[got:num_bytes])):
                    got += n
                sock.sendall(b"k")


def receiver_main(conn: Connection) -> None:
    """The decode-worker side: owns KV tensors and their transports, driven over a Pipe.

    Commands (tuples) and replies:
      ("open", transport, dtype, shape, seed, timeout_s) -> (handle, metadata bytes)
      ("grant", handle, token, block_ids) -> None: writes under token may land in block_ids
      ("digest", handle, dst_ids) -> (digest of dst blocks, whether every other block is as
                                      it was when opened)
      ("socket", capacity) -> port of a plain-socket sink
      ("exit",) -> None, and the process ends
    A command that raises is answered ("error", message) instead.
    """
    opened: list[tuple[KVTransport, torch.Tensor]] = []
    while True:
        command = conn.recv()
        try:
            if _serve_command(conn, command, opened):
                return
        except Exception as e:
            conn.send(("error", f"{command[0]}: {e!r}"))


def _serve_command(
    conn: Connection, command: tuple[Any, ...], opened: list[tuple[KVTransport, torch.Tensor]]
) -> bool:
    """One receiver_main command; True once it was told to exit."""
    if command[0] == "open":
        _, name, dtype, shape, seed, timeout_s = command
        kv = random_kv(tuple(shape), getattr(torch, dtype), seed)
        config = TransportConfig(timeout_s=timeout_s)
        transport = create_transport(name, kv, f"decode-{len(opened)}", config)
        opened.append((transport, kv.clone()))
        conn.send((len(opened) - 1, transport.metadata()))
    elif command[0] == "grant":
        _, handle, token, block_ids = command
        opened[handle][0].grant(token, block_ids)
        conn.send(None)
    elif command[0] == "digest":
        _, handle, dst_ids = command
        transport, initial = opened[handle]
        kv = transport.kv_cache
        others = sorted(set(range(kv.shape[2])) - set(dst_ids))
        untouched = torch.equal(kv[:, :, others], initial[:, :, others])
        conn.send((block_digest(kv, dst_ids), untouched))
    elif command[0] == "socket":
        listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=_socket_sink, args=(listener, command[1]), daemon=True).start()
        conn.send(listener.getsockname()[1])
    else:
        for transport, _ in opened:
            transport.close()
        conn.send(None)
        return True
    return False


def _reply(reply: Any) -> Any:
    """receiver_main's answer, or its error raised here."""
    if isinstance(reply, tuple) and reply[:1] == ("error",):
        raise RuntimeError(f"peer process failed: {reply[1]}")
    return reply


def _time_socket(port: int, payload: memoryview, repeats: int) -> list[float]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        seconds = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            sock.sendall(_LENGTH.pack(len(payload)))
            sock.sendall(payload)
            if sock.recv(1) != b"k":
                raise RuntimeError("socket baseline: receiver went away")
            seconds.append(time.perf_counter() - start)
    return seconds[1:]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype = getattr(torch, args.dtype)
    block_shape = (args.block_size, args.kv_heads, args.head_dim)
    block_bytes = args.layers * 2 * int(np.prod(block_shape)) * dtype.itemsize
    sizes = [(mb, max(1, round(mb * 2**20 / block_bytes))) for mb in args.sizes_mb]
    max_blocks = max(n for _, n in sizes)
    src_shape = (args.layers, 2, 2 * max_blocks, *block_shape)
    dst_shape = (args.layers, 2, 3 * max_blocks, *block_shape)  # a bigger decode pool
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []

    def record(name: str, pattern: str, mb: float, n: int, seconds: list[float]) -> None:
        median = statistics.median(seconds)
        num_bytes = n * block_bytes
        results.append(
            {
                "transport": name,
                "pattern": pattern,
                "size_mb": mb,
                "num_blocks": n,
                "num_bytes": num_bytes,
                "median_s": median,
                "gb_per_s": num_bytes / median / 1e9,
                "seconds": seconds,
            }
        )

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    peer = ctx.Process(target=receiver_main, args=(child,), daemon=True)
    peer.start()
    try:
        parent.send(("socket", max_blocks * block_bytes))
        port = _reply(parent.recv())
        rng_bytes = np.random.default_rng(1).integers(0, 255, max_blocks * block_bytes, np.uint8)
        payload = rng_bytes.data
        for mb, n in sizes:
            record(
                "socket",
                "contiguous",
                mb,
                n,
                _time_socket(port, payload[: n * block_bytes], args.repeats),
            )

        for name in args.transports:
            if not is_available(name):
                print(f"{name}: not installed on this host, skipped")
                continue
            parent.send(("open", name, args.dtype, dst_shape, 2, 60.0))
            handle, metadata = _reply(parent.recv())
            # One grant for every block and every repeat: the bench times the bytes, not grants.
            token = new_transfer_token()
            parent.send(("grant", handle, token, list(range(dst_shape[2]))))
            _reply(parent.recv())
            kv = random_kv(src_shape, dtype, 3)
            with create_transport(name, kv, "prefill", TransportConfig(timeout_s=60.0)) as sender:
                for pattern in args.patterns:
                    for mb, n in sizes:
                        if pattern == "shuffled":
                            src = rng.permutation(src_shape[2])[:n].tolist()
                            dst = rng.permutation(dst_shape[2])[:n].tolist()
                        else:
                            src, dst = list(range(n)), list(range(max_blocks, max_blocks + n))
                        seconds = []
                        for _ in range(args.repeats + 1):
                            stats = sender.write_blocks(metadata, "bench", src, dst, token=token)
                            seconds.append(stats.seconds)
                        parent.send(("digest", handle, dst))
                        digest, _ = _reply(parent.recv())
                        if digest != block_digest(kv, src):
                            raise RuntimeError(f"{name}: received blocks differ from sent blocks")
                        record(name, pattern, mb, n, seconds[1:])
    finally:
        parent.send(("exit",))
        parent.recv()
        peer.join(timeout=30)
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    socket_gbps = {r["size_mb"]: r["gb_per_s"] for r in results if r["transport"] == "socket"}
    lines = [
        f"{'transport':<10} {'pattern':<11} {'size':>7} {'blocks':>6} "
        f"{'median ms':>10} {'GB/s':>7} {'vs socket':>9}"
    ]
    for r in results:
        ratio = r["gb_per_s"] / socket_gbps[r["size_mb"]] if r["size_mb"] in socket_gbps else 0
        lines.append(
            f"{r['transport']:<10} {r['pattern']:<11} {r['num_bytes'] / 2**20:>5.1f}MB "
            f"{r['num_blocks']:>6} {r['median_s'] * 1e3:>10.2f} {r['gb_per_s']:>7.2f} "
            f"{ratio:>8.0%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--transports", nargs="+", default=transport_names())
    parser.add_argument("--sizes-mb", nargs="+", type=float, default=[1, 8, 64])
    parser.add_argument(
        "--patterns",
        nargs="+",
        default=["shuffled", "contiguous"],
        choices=["shuffled", "contiguous"],
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("bench_out/kv_transports.json"))
    args = parser.parse_args(argv)
    # Quiet the native libraries' INFO chatter (set here, in the script, not at import time;
    # the spawned peer inherits the environment).
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    os.environ.setdefault("GLOG_minloglevel", "2")

    results = run(args)
    print(format_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"config": config, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
