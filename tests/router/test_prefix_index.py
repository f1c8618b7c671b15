"""The prefix index against a brute-force model of it, on random operations."""

from __future__ import annotations

import random

import pytest

from baton.router.prefix_index import TIERS, PrefixIndex, PrefixMatch


def _reference_match(
    held: dict[str, dict[str, set[bytes]]], keys: list[bytes]
) -> dict[str, PrefixMatch]:
    out = {}
    for worker, tiers in held.items():
        by_tier: dict[str, int] = {}
        n = 0
        for key in keys:
            on = [t for t in TIERS if key in tiers.get(t, set())]
            if not on:
                break
            n += 1
            by_tier[on[0]] = by_tier.get(on[0], 0) + 1
        out[worker] = PrefixMatch(n, by_tier)
    return out


def test_random_operations_match_a_brute_force_model() -> None:
    rng = random.Random(7)
    keys = [bytes([i]) * 16 for i in range(40)]
    workers = ["w0", "w1", "w2"]
    index = PrefixIndex()
    held: dict[str, dict[str, set[bytes]]] = {}
    for step in range(3000):
        worker, tier = rng.choice(workers), rng.choice(TIERS)
        op = rng.random()
        chosen = rng.sample(keys, rng.randint(1, 8))
        if op < 0.5:
            index.store(worker, tier, chosen)
            held.setdefault(worker, {}).setdefault(tier, set()).update(chosen)
        elif op < 0.9:
            index.remove(worker, tier, chosen)
            held.get(worker, {}).get(tier, set()).difference_update(chosen)
        elif op < 0.95:
            index.clear(worker, tier)
            held.get(worker, {}).pop(tier, None)
        else:
            index.clear(worker)
            held.pop(worker, None)
        if step % 50 == 0:
            prompt = keys[: rng.randint(0, 40)]
            expected = {w: m for w, m in _reference_match(held, prompt).items() if index.keys_of(w)}
            got = index.match(prompt)
            assert {w: got[w] for w in expected} == expected
            for w in workers:
                assert index.keys_of(w) == {t: k for t, k in held.get(w, {}).items() if k}


def test_match_counts_leading_blocks_on_their_fastest_tier() -> None:
    index = PrefixIndex()
    a, b, c = b"a" * 16, b"b" * 16, b"c" * 16
    index.store("w1", "host", [a, b, c])
    index.store("w1", "device", [a])
    index.store("w2", "device", [a, c])  # c without b: not a leading block
    got = index.match([a, b, c])
    assert got["w1"] == PrefixMatch(3, {"device": 1, "host": 2})
    assert got["w2"] == PrefixMatch(1, {"device": 1})
    index.remove("w1", "device", [a])  # a still on w1's host tier
    assert index.match([a])["w1"] == PrefixMatch(1, {"host": 1})
    index.replace("w1", {"disk": [b]})
    assert index.match([a, b])["w1"] == PrefixMatch(0, {})
    assert index.match([a], workers=["w2", "gone"]) == {"w2": PrefixMatch(1, {"device": 1})}
    index.clear("w1")
    index.clear("w2")
    assert len(index) == 0 and index.workers == []
    with pytest.raises(ValueError, match="unknown tier"):
        index.store("w1", "gpu", [a])
