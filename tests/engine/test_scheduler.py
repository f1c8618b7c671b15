"""Scheduler and KV cache manager on CPU with a fake runner: no model, fast, exact."""

from __future__ import annotations

import pytest

from baton.services.engine.config import SchedulerConfig
from baton.services.engine.kv_cache_manager import KVCacheManager
from baton.services.engine.request import Request, RequestStatus
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.scheduler import Scheduler
from baton.services.engine.step_io import ModelRunnerOutput, SchedulerOutput

BS = 4
EOS = 2


def make(
    num_blocks: int = 64,
    budget: int = 64,
    max_seqs: int = 16,
    chunk: int | None = None,
    policy: str = "fcfs",
    caching: bool = True,
) -> Scheduler:
    kv = KVCacheManager(num_blocks, BS, caching)
    cfg = SchedulerConfig(
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        max_prefill_chunk=chunk,
        policy=policy,
    )
    return Scheduler(cfg, kv, max_model_len=4096)


def req(
    rid: str,
    prompt_len: int,
    max_tokens: int = 8,
    priority: int = 0,
    first_token: int = 100,
    wait_for: Request | None = None,
    **params: object,
) -> Request:
    prompt = [first_token + i for i in range(prompt_len)]
    return Request(
        rid,
        prompt,
        SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
        block_size=BS,
        hash_extra=b"m",
        max_model_len=4096,
        priority=priority,
        eos_token_ids=(EOS,),
        wait_for=wait_for,
    )


class FakeRunner:
    """Samples token 7 (or a scripted token) for every request that reached its end."""

    def __init__(self, sched: Scheduler, script: dict[str, list[int]] | None = None) -> None:
        self.sched = sched
        self.script = script or {}

    def __call__(self, out: SchedulerOutput) -> ModelRunnerOutput:
        sampled = {}
        for rid in out.num_scheduled_tokens:
            r = self.sched.requests[rid]
            if r.num_computed_tokens == r.num_tokens:
                queue = self.script.get(rid)
                sampled[rid] = queue.pop(0) if queue else 7
        return ModelRunnerOutput(sampled, {})


def step(sched: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    out = sched.schedule()
    assert out.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
    sched.update_from_output(out, runner(out))
    sched.kv.check_integrity()
    return out


def run_to_end(sched: Scheduler, runner: FakeRunner, limit: int = 500) -> None:
    for _ in range(limit):
        if not sched.num_unfinished:
            break
        step(sched, runner)
    assert not sched.num_unfinished
    sched.kv.check_integrity(expect_idle=True)


def test_token_budget_splits_prefills_and_serves_decodes_first() -> None:
    s = make(budget=32)
    r = FakeRunner(s)
    for rid, n in (("a", 10), ("b", 20), ("c", 30)):
        s.add_request(req(rid, n))
    out = step(s, r)
    assert out.num_scheduled_tokens == {"a": 10, "b": 20, "c": 2}
    out = step(s, r)
    # a and b decode (1 token each) before c's prefill continues with the rest of the budget.
    assert list(out.num_scheduled_tokens) == ["a", "b", "c"]
    assert out.num_scheduled_tokens == {"a": 1, "b": 1, "c": 28}
    assert s.requests["c"].num_output_tokens == 1  # c finished its prompt and sampled
    run_to_end(s, r)


def test_chunked_prefill_samples_only_after_the_last_chunk() -> None:
    s = make(chunk=16)
    r = FakeRunner(s)
    s.add_request(req("a", 40))
    chunks = [step(s, r).num_scheduled_tokens["a"] for _ in range(3)]
    assert chunks == [16, 16, 8]
    assert s.requests["a"].num_output_tokens == 1
    assert step(s, r).num_scheduled_tokens == {"a": 1}
    run_to_end(s, r)


def test_max_num_seqs_limits_running() -> None:
    s = make(max_seqs=2)
    r = FakeRunner(s)
    for i in range(4):
        s.add_request(req(f"r{i}", 5))
    out = step(s, r)
    assert set(out.num_scheduled_tokens) == {"r0", "r1"}
    assert len(s.running) == 2 and len(s.waiting) == 2
    run_to_end(s, r)


def test_preemption_takes_the_newest_and_resumes_with_outputs() -> None:
    # 6 blocks of 4 tokens; two requests of 8-token prompts grow until the pool is short.
    s = make(num_blocks=6, budget=64)
    r = FakeRunner(s)
    s.add_request(req("old", 8, max_tokens=10, first_token=100))
    s.add_request(req("new", 8, max_tokens=10, first_token=300))
    step(s, r)
    preempted_at = None
    for i in range(30):
        out = step(s, r)
        if s.requests["new"].status is RequestStatus.PREEMPTED:
            preempted_at = i
            assert "new" in out.finished_request_ids  # runner drops its state
            break
    assert preempted_at is not None
    victim = s.requests["new"]
    assert victim.timings.num_preemptions == 1 and victim.num_computed_tokens == 0
    kept = list(victim.output_token_ids)
    assert kept and s.waiting[0] is victim
    run_to_end(s, r)
    assert s.num_preemptions >= 1


def test_resumed_request_recomputes_prompt_and_outputs() -> None:
    s = make(num_blocks=6, budget=64, caching=False)
    r = FakeRunner(s)
    s.add_request(req("old", 8, max_tokens=10))
    s.add_request(req("new", 8, max_tokens=10, first_token=300))
    resumed_with = None
    for _ in range(60):
        if not s.num_unfinished:
            break
        out = s.schedule()
        for new in out.new_requests:
            if new.request_id == "new" and len(new.token_ids) > 8:
                resumed_with = new
        s.update_from_output(out, r(out))
    assert resumed_with is not None
    # It carries the prompt plus the outputs made before preemption and recomputes them all.
    assert resumed_with.num_computed_tokens == 0
    assert resumed_with.token_ids[:8] == tuple(range(300, 308))
    assert s.requests == {}


def test_priority_policy_orders_queue_and_preempts_lowest_priority() -> None:
    s = make(num_blocks=6, policy="priority", max_seqs=1)
    r = FakeRunner(s)
    s.add_request(req("low", 4, priority=5))
    s.add_request(req("high", 4, priority=0))
    out = step(s, r)
    assert list(out.num_scheduled_tokens) == ["high"]
    run_to_end(s, r)

    s = make(num_blocks=6, policy="priority")
    r = FakeRunner(s)
    s.add_request(req("low", 8, max_tokens=12, priority=9))
    step(s, r)
    s.add_request(req("high", 8, max_tokens=12, priority=1, first_token=500))
    for _ in range(40):
        step(s, r)
        if s.num_preemptions:
            break
    assert s.requests["low"].timings.num_preemptions == 1
    assert s.requests["high"].timings.num_preemptions == 0
    run_to_end(s, r)


@pytest.mark.parametrize("state", ["waiting", "mid_prefill", "decoding", "preempted"])
def test_abort_in_every_state_frees_everything(state: str) -> None:
    s = make(num_blocks=6, chunk=4 if state == "mid_prefill" else None)
    r = FakeRunner(s)
    s.add_request(req("a", 8, max_tokens=16))
    if state == "preempted":
        s.add_request(req("b", 8, max_tokens=16, first_token=300))
        for _ in range(30):
            step(s, r)
            if s.requests["b"].status is RequestStatus.PREEMPTED:
                break
        target = "b"
        assert s.requests[target].status is RequestStatus.PREEMPTED
    else:
        target = "a"
        steps = {"waiting": 0, "mid_prefill": 1, "decoding": 3}[state]
        for _ in range(steps):
            step(s, r)
        r_a = s.requests["a"]
        if state == "mid_prefill":
            assert 0 < r_a.num_computed_tokens < r_a.num_prompt_tokens
        if state == "decoding":
            assert r_a.num_output_tokens >= 2
    ended = s.finish_requests([target], RequestStatus.FINISHED_ABORTED)
    assert [e.status for e in ended] == [RequestStatus.FINISHED_ABORTED]
    assert target not in s.requests
    s.kv.check_integrity()
    out = s.schedule()
    assert target in out.finished_request_ids
    assert target not in out.num_scheduled_tokens
    s.update_from_output(out, r(out))
    s.finish_requests(list(s.requests), RequestStatus.FINISHED_ABORTED)
    s.kv.check_integrity(expect_idle=True)
    # Aborting an unknown or already finished request is a no-op.
    assert s.finish_requests([target, "nope"], RequestStatus.FINISHED_ABORTED) == []


def test_prefix_cache_hits_after_the_first_request_computed_its_blocks() -> None:
    s = make()
    r = FakeRunner(s)
    s.add_request(req("a", 13, max_tokens=2))
    run_to_end(s, r)
    s.add_request(req("b", 13, max_tokens=2))
    out = step(s, r)
    # 3 full blocks (12 tokens) of a's prompt are cached; b computes only its last token.
    assert s.requests["b"].num_cached_tokens == 12
    assert out.num_scheduled_tokens == {"b": 1}
    assert s.kv.prefix_hits_tokens == 12
    run_to_end(s, r)


def test_fully_cached_prompt_still_computes_its_last_token() -> None:
    s = make()
    r = FakeRunner(s)
    s.add_request(req("a", 12, max_tokens=1))
    run_to_end(s, r)
    s.add_request(req("b", 12, max_tokens=1))
    out = step(s, r)
    assert out.num_scheduled_tokens == {"b": 4}  # last block recomputed: 8 tokens hit
    s.kv.check_integrity(expect_idle=True)


def test_cache_salt_separates_tenants() -> None:
    s = make()
    r = FakeRunner(s)
    a = req("a", 12, max_tokens=1)
    s.add_request(a)
    run_to_end(s, r)
    b = Request(
        "b",
        list(a.prompt_token_ids),
        SamplingParams(max_tokens=1),
        block_size=BS,
        hash_extra=b"other-tenant",
        max_model_len=4096,
        eos_token_ids=(EOS,),
    )
    s.add_request(b)
    out = step(s, r)
    assert out.num_scheduled_tokens == {"b": 12}


def test_n_siblings_wait_for_the_first_and_share_its_blocks() -> None:
    s = make()
    r = FakeRunner(s)
    first = req("x#0", 17, max_tokens=3)
    s.add_request(first)
    for i in (1, 2):
        s.add_request(req(f"x#{i}", 17, max_tokens=3, wait_for=first))
    out = step(s, r)
    assert out.num_scheduled_tokens == {"x#0": 17}
    out = step(s, r)
    assert out.num_scheduled_tokens == {"x#0": 1, "x#1": 1, "x#2": 1}
    blocks = [s.kv.block_ids(s.requests[f"x#{i}"])[:4] for i in range(3)]
    assert blocks[0] == blocks[1] == blocks[2]  # the prompt's 4 full blocks are shared
    assert all(s.kv.pool.blocks[b].ref_cnt == 3 for b in blocks[0])
    run_to_end(s, r)


def test_stop_conditions() -> None:
    s = make()
    r = FakeRunner(s, {"eos": [5, EOS], "stopid": [9, 11], "min": [EOS, 3], "ign": [EOS] * 4})
    s.add_request(req("eos", 4, max_tokens=10))
    s.add_request(req("stopid", 4, max_tokens=10, stop_token_ids=[11]))
    s.add_request(req("min", 4, max_tokens=3, min_tokens=2))
    s.add_request(req("ign", 4, max_tokens=4, ignore_eos=True))
    s.add_request(req("len", 4, max_tokens=3))
    reqs = dict(s.requests)
    run_to_end(s, r)
    assert reqs["eos"].output_token_ids == [5, EOS]
    assert reqs["eos"].status is RequestStatus.FINISHED_STOPPED
    assert reqs["stopid"].stop_reason == 11
    assert reqs["min"].output_token_ids == [EOS, 3, 7]  # EOS before min_tokens does not stop
    assert reqs["min"].status is RequestStatus.FINISHED_LENGTH
    assert reqs["ign"].output_token_ids == [EOS] * 4
    assert reqs["len"].status is RequestStatus.FINISHED_LENGTH


def test_rejects_requests_larger_than_the_pool() -> None:
    s = make(num_blocks=4)
    with pytest.raises(ValueError, match="KV blocks"):
        s.add_request(req("big", 15, max_tokens=8))
    with pytest.raises(ValueError, match="already"):
        s.add_request(req("a", 4))
        s.add_request(req("a", 4))
