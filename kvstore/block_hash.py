"""The one block-hash function (docs/design.md §1): engine, router index and KV store all key by it.

A block's key chains over its parent's key, its token ids and an extra part (model id, cache
salt / tenant, adapter), so equal keys mean equal KV: same model, same tenant, same tokens at
the same positions. Only full blocks have keys; a partial last block has none.

Keys are 16-byte BLAKE2b digests: stable across processes and machines (no PYTHONHASHSEED),
cheap (about a microsecond per 16-token block) and wide enough that collisions are not a concern.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BlockHash = bytes
"""A 16-byte block key."""

HASH_BYTES = 16
ROOT_PARENT: BlockHash = bytes(HASH_BYTES)
"""The parent key of a sequence's first block."""


@dataclass(frozen=True)
class BlockHashExtra:
    """What besides the tokens decides a block's KV contents."""

    model_id: str = ""
    """The model (weights + dtype) that computed the KV."""
    cache_salt: str = ""
    """Tenant isolation: requests with different salts never share blocks."""
    adapter: str = ""
    """LoRA adapter name, if any."""

    def encode(self) -> bytes:
        # Length-prefixed so that ("ab", "c") and ("a", "bc") differ.
        parts = (self.model_id, self.cache_salt, self.adapter)
        out = bytearray()
        for part in parts:
            raw = part.encode()
            out += len(raw).to_bytes(4, "little") + raw
        return bytes(out)


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra: bytes) -> BlockHash:
    """Key of one full block given its parent's key (None for the first block)."""
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    h.update(parent if parent is not None else ROOT_PARENT)
    h.update(np.asarray(token_ids, dtype="<u4").tobytes())
    h.update(extra)
    return h.digest()


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra: bytes,
    parent: BlockHash | None = None,
    start_block: int = 0,
) -> list[BlockHash]:
    """Keys of the full blocks of token_ids from block index start_block on.

    parent is the key of block start_block - 1 (None when start_block is 0); this lets a caller
    extend a sequence's keys as tokens arrive without rehashing the prefix.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    keys: list[BlockHash] = []
    num_full = len(token_ids) // block_size
    if num_full <= start_block:
        return keys
    # One conversion for every block (not one per block): the bytes hash_block would feed.
    lo, hi = start_block * block_size, num_full * block_size
    raw = np.asarray(token_ids[lo:hi], dtype="<u4").tobytes()
    step = block_size * 4
    root = ROOT_PARENT
    for offset in range(0, len(raw), step):
        h = hashlib.blake2b(digest_size=HASH_BYTES)
        h.update(parent if parent is not None else root)
        h.update(raw[offset : offset + step])
        h.update(extra)
        parent = h.digest()
        keys.append(parent)
    return keys
