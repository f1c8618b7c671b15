"""The worker's admission: a bounded queue, shared fairly among callers once half full."""

from __future__ import annotations

import pytest

from baton.services.worker.admission import Admission


def test_a_lone_caller_may_fill_the_whole_queue_but_not_more() -> None:
    a = Admission(max_queued=8)
    for waiting in range(8):
        assert a.refusal("gw", 1, waiting) is None
        a.add("gw", 1)
    refusal = a.refusal("gw", 1, 8)
    assert refusal is not None and "limit of 8" in refusal
    assert a.refusal("gw", 9, 0) is not None  # one request larger than the whole queue


def test_past_half_a_caller_over_its_share_is_refused_and_others_still_get_in() -> None:
    a = Admission(max_queued=8)
    a.add("flood", 5)  # the flooding caller holds 5, waiting 5 (over half of 8)
    a.add("polite", 1)
    refusal = a.refusal("flood", 1, 6)
    assert refusal is not None and "share" in refusal and "'flood'" in refusal
    assert a.refusal("polite", 1, 6) is None  # 2 of 7 is within 1/2
    assert a.refusal("flood", 1, 2) is None  # under half full: no share applies


def test_finished_sequences_free_their_callers_share() -> None:
    a = Admission(max_queued=4)
    a.add("x", 2)
    a.add("y", 1)
    assert a.total == 3 and a.held("x") == 2
    a.remove("x", 2)
    a.remove("y", 1)
    assert a.total == 0 and a.held("x") == 0
    assert a.refusal("x", 4, 0) is None


def test_a_queue_must_hold_something() -> None:
    with pytest.raises(ValueError):
        Admission(0)
