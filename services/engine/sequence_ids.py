"""The one spelling of a sequence id: sequence i of request "r1" (n > 1) is "r1#i".

A request with n == 1 has one sequence whose id is the request id itself. Every part that names a
sequence (the engine's fan-out, the wire's SequenceDelta.index, the gateway's per-choice abort,
the worker's and the gateway's lookups by request) goes through these two functions.

Contract: request ids never contain SEPARATOR. The gateway replaces it in client-chosen ids
(serving.py); without that, "a#3" with n == 1 would read back as sequence 3 of "a".
"""

from __future__ import annotations

SEPARATOR = "#"


def sequence_id(request_id: str, index: int, n: int) -> str:
    """The id of sequence `index` of a request with `n` sequences ("r1#2"; "r1" when n == 1)."""
    return request_id if n == 1 else f"{request_id}{SEPARATOR}{index}"


def parse_sequence_id(seq_id: str) -> tuple[str, int]:
    """(request id, index): "r1#2" → ("r1", 2); "r1" → ("r1", 0); "r1#x" → ("r1#x", 0)."""
    head, sep, tail = seq_id.rpartition(SEPARATOR)
    if sep and head and tail.isascii() and tail.isdigit():
        return head, int(tail)
    return seq_id, 0
