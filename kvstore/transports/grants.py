"""Per-transfer write grants: which destination blocks a transfer token may write (§11).

docs/design.md §11: each KV transfer carries a token minted by the receiving decode worker. The
decode worker owns the destination (§2): for every Prefill RPC it mints a fresh token
(`new_transfer_token`), grants it on each rank's transport for exactly the block ids it
allocated, hands it to the prefill worker inside the authenticated RPC (KVDestination
.transfer_token), and revokes it when the RPC has ended, whatever the outcome. A token is good
for one transfer; nothing is ever granted to the empty string.

What a grant guarantees depends on the transport: TCP checks every write against the grants
before it scatters a byte; the one-sided transports (NIXL, Mooncake) have no receiver code on
the write path, so there the grants are bookkeeping only (see each transport's docstring).

Lookups are by SHA-256 of the token, so the dict's own key comparison never touches the secret,
then confirmed with hmac.compare_digest (constant time).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

MIN_TOKEN_CHARS = 32
"""A grant refuses shorter tokens: `new_transfer_token` gives 43 characters (256 random bits);
anything much shorter is a caller bug, not a secret."""


def new_transfer_token() -> str:
    """A fresh, unguessable token for one transfer (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


@dataclass
class _Grant:
    token: bytes
    block_ids: frozenset[int]
    num_writing: int = 0
    """Receiver threads inside `writing(token)` right now; revoke waits for them."""


class TransferGrants:
    """The live grants of one destination transport; every method is thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._grants: dict[bytes, _Grant] = {}

    def __len__(self) -> int:
        """How many tokens are granted now (0 at idle: every transfer revoked its own)."""
        with self._cond:
            return len(self._grants)

    def grant(self, token: str, block_ids: Iterable[int]) -> None:
        """Let a write carrying `token` into `block_ids` (and no other block) in."""
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"a transfer token needs at least {MIN_TOKEN_CHARS} characters")
        key = _key(token)
        with self._cond:
            if key in self._grants:
                raise ValueError("transfer token is already granted: mint one per transfer")
            self._grants[key] = _Grant(_bytes(token), frozenset(int(b) for b in block_ids))

    def revoke(self, token: str) -> None:
        """Refuse `token` from now on; idempotent, and a no-op for a token never granted.

        Returns once no receiver thread is inside `writing(token)`: after it, no byte of that
        transfer is written (a TCP scatter in progress finishes first; it takes about a
        millisecond per 4 MiB segment).
        """
        with self._cond:
            grant = self._find(token)
            if grant is None:
                return
            del self._grants[_key(token)]
            while grant.num_writing:
                self._cond.wait()

    def refusal(self, token: str, block_ids: Iterable[int]) -> str | None:
        """Why a write carrying `token` into `block_ids` is refused (never echoing the token);
        None when `token` is granted now and every id is among the ids granted to it."""
        if not token:
            return "the write carries no transfer token"
        with self._cond:
            grant = self._find(token)
            if grant is None:
                return "transfer token is not granted (unknown, or revoked)"
            outside = sorted({int(b) for b in block_ids} - grant.block_ids)
        if outside:
            return f"blocks {outside} are outside the transfer token's grant"
        return None

    @contextmanager
    def writing(self, token: str) -> Iterator[bool]:
        """Hold off `revoke(token)` while the body writes; yields False (hold nothing) when
        `token` is not granted any more.

        The receiver wraps each scatter in this, so a revoke that lands mid-transfer stops the
        segments after it instead of letting them into blocks the decode worker may already
        have reused.
        """
        with self._cond:
            grant = self._find(token)
            if grant is not None:
                grant.num_writing += 1
        if grant is None:
            yield False
            return
        try:
            yield True
        finally:
            with self._cond:
                grant.num_writing -= 1
                self._cond.notify_all()

    def _find(self, token: str) -> _Grant | None:
        """The caller holds the lock."""
        grant = self._grants.get(_key(token))
        if grant is None or not hmac.compare_digest(grant.token, _bytes(token)):
            return None
        return grant


def _bytes(token: str) -> bytes:
    # surrogatepass: a token read from a peer's JSON may hold lone surrogates; they must compare
    # unequal, not raise.
    return token.encode("utf-8", "surrogatepass")


def _key(token: str) -> bytes:
    return hashlib.sha256(_bytes(token)).digest()
