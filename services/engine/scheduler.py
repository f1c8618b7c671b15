"""Continuous batching: which requests compute how many tokens this step.

One token budget per step is spent first on running requests (decodes and unfinished prefill
chunks, in admission or priority order), then on admitting waiting requests, whose prefix hits
are applied first. When a running request cannot get a block, the lowest-priority running
request not yet scheduled this step is preempted by recompute: it gives back all its blocks and
returns to the head of the queue keeping its outputs; on resumption it recomputes prompt and
outputs (hitting the prefix cache where its blocks survived) and carries on.

A KV connector (kv_connector.py) may supply a waiting request's tokens beyond its prefix hit:
the request is admitted with all its blocks allocated and waits, outside the running set, until
the connector reports the load finished (then it runs, often with its first token already
sampled by whoever computed the prompt) or failed (then it is prefilled here). A finished
request whose blocks the connector is still sending is held until the send ends.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from baton.services.engine.config import SchedulerConfig
from baton.services.engine.kv_cache_manager import KVCacheManager, PrefixHit
from baton.services.engine.kv_connector import KVConnector, KVConnectorOutput
from baton.services.engine.request import Request, RequestStatus
from baton.services.engine.step_io import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    TokenLogprobs,
)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        max_model_len: int,
        connector: KVConnector | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.connector = connector
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()
        self.num_preemptions = 0
        self.loading: dict[str, tuple[Request, int]] = {}
        """Requests whose blocks the connector is filling, and the tokens it supplies."""
        self._aborted_loading: dict[str, Request] = {}
        """Ended while loading: their blocks outlive the abort until the load ends."""
        self.held: dict[str, Request] = {}
        """Finished requests whose blocks the connector is still sending."""
        self._unseen: set[str] = set()
        """Running requests the runner has not seen yet (admitted through a connector load)."""
        self._unreported: deque[SchedulerOutput] = deque()
        """Scheduled steps whose results update_from_output has not seen yet, oldest first (two
        at most under async scheduling: one being collected, one running)."""

    # ---- admission and abort -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        need = self.kv.blocks_for(request.num_prompt_tokens + max(request.max_tokens, 0))
        if need > self.kv.num_blocks:
            raise ValueError(
                f"prompt ({request.num_prompt_tokens} tokens) plus max_tokens "
                f"({request.max_tokens}) needs {need} KV blocks; the pool has {self.kv.num_blocks}"
            )
        self.requests[request.request_id] = request
        self._enqueue(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests in any state (waiting, running, preempted), freeing all they hold."""
        assert status.finished, status
        ended = []
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            self._unseen.discard(request_id)
            if request_id in self.loading:
                # The connector may still be writing into its blocks: free them only once it
                # reports the load finished (update_from_connector), whatever it answers here.
                del self.loading[request_id]
                self._aborted_loading[request_id] = request
                request.status = status
                request.timings.finished_s = time.monotonic()
                assert self.connector is not None
                self.connector.request_finished(request, self.kv.block_ids(request))
                ended.append(request)
                continue
            if request in self.running:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            self._end(request, status)
            ended.append(request)
        return ended

    # ---- KV connector ----------------------------------------------------------------------

    def update_from_connector(self, output: KVConnectorOutput) -> list[EngineCoreOutput]:
        """Apply the loads and saves that ended; returns the first tokens that loads brought."""
        for request_id in output.finished_saves:
            request = self.held.pop(request_id, None)
            if request is not None:
                self.kv.free(request)
        outputs: list[EngineCoreOutput] = []
        for load in output.finished_loads:
            aborted = self._aborted_loading.pop(load.request_id, None)
            if aborted is not None:
                self.kv.free(aborted)
                continue
            entry = self.loading.pop(load.request_id, None)
            if entry is None:
                continue  # not ours (reported twice, or unknown): nothing to do
            request, num_loaded = entry
            if not load.ok:
                # Nothing is lost but time: prefill here. The connector does not offer a
                # request it failed once again.
                self.kv.free(request)
                request.num_computed_tokens = 0
                request.status = RequestStatus.WAITING
                self._enqueue(request, front=True)
                continue
            request.status = RequestStatus.RUNNING
            self._insert_running(request)
            self._unseen.add(request.request_id)
            if load.first_token_id is None:
                # The loaded KV is here; at least the last prompt token is computed locally.
                request.num_computed_tokens = min(
                    request.num_computed_tokens + num_loaded, request.num_tokens - 1
                )
                self.kv.cache_computed(request)
                continue
            request.num_computed_tokens = request.num_tokens
            self.kv.cache_computed(request)
            request.skip_sampled_tokens(1)  # its first token was sampled where it was prefilled
            result = ModelRunnerOutput(
                {request.request_id: load.first_token_id},
                {request.request_id: load.first_logprobs} if load.first_logprobs else {},
            )
            scheduled = SchedulerOutput((), (), {request.request_id: 0}, 0, frozenset())
            outputs.extend(self.update_from_output(scheduled, result))
        return outputs

    @property
    def has_pending_transfers(self) -> bool:
        """Blocks held for a connector's load or save that has not ended."""
        return bool(self.held or self._aborted_loading)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        cached: list[CachedRequestData] = []
        new: list[NewRequestData] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if self._done_when_in_flight_lands(request):
                i += 1  # its last token is being sampled: nothing more to compute
                continue
            num_new = self._num_tokens_to_compute(request, request.num_computed_tokens, budget)
            new_blocks = self.kv.allocate(request, num_new)
            while new_blocks is None:
                victim = self._pick_victim(after=i)
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
                new_blocks = self.kv.allocate(request, num_new)
            if new_blocks is None:
                continue  # `request` itself was preempted; running[i] is now the next one
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            if request.request_id in self._unseen:
                self._unseen.discard(request.request_id)
                new.append(self._new_request_data(request))
            else:
                cached.append(
                    CachedRequestData(
                        request.request_id,
                        tuple(b.block_id for b in new_blocks),
                        request.num_computed_tokens,
                    )
                )
            i += 1

        # Admitting after a preemption would only thrash: the pool is already short.
        if not preempted:
            budget = self._admit(budget, num_scheduled, new)

        for request_id, num_new in num_scheduled.items():
            request = self.requests[request_id]
            request.num_computed_tokens += num_new
            if request.num_computed_tokens == request.num_tokens + request.num_output_placeholders:
                request.num_output_placeholders += 1  # this step samples its next token
        finished, self._finished_ids = self._finished_ids, set()
        out = SchedulerOutput(
            new_requests=tuple(new),
            cached_requests=tuple(cached),
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            finished_request_ids=frozenset(finished),
            kv_connector_metadata=(
                self.connector.build_metadata() if self.connector is not None else None
            ),
        )
        if not out.is_empty:
            self._unreported.append(out)
        return out

    def update_from_output(
        self, scheduled: SchedulerOutput, result: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Record sampled tokens, publish computed blocks, and end requests that stop.

        Steps are reported in the order they were scheduled. Under async scheduling a later
        step is already running: its tokens are counted in num_computed_tokens but their KV is
        not written yet, so they are not published here.
        """
        if self._unreported and self._unreported[0] is scheduled:
            self._unreported.popleft()
        outputs = []
        now = time.monotonic()
        for request_id in scheduled.num_scheduled_tokens:
            request = self.requests.get(request_id)
            if request is None:
                continue  # ended (abort, stop) while the step ran: its result is dropped
            in_flight = sum(s.num_scheduled_tokens.get(request_id, 0) for s in self._unreported)
            token_id = result.sampled_token_ids.get(request_id)
            if token_id is not None:
                request.num_output_placeholders = max(request.num_output_placeholders - 1, 0)
                request.append_output_token(token_id)
            self.kv.cache_computed(request, request.num_computed_tokens - in_flight)
            if token_id is None:
                continue  # mid-prefill chunk: nothing to report yet
            if request.timings.first_token_s is None:
                request.timings.first_token_s = now
            request.timings.last_token_s = now
            status = self._check_stop(request, token_id)
            logprobs: tuple[TokenLogprobs, ...] = ()
            if request_id in result.logprobs:
                logprobs = (result.logprobs[request_id],)
            if status is not None:
                self.finish_requests([request_id], status)
            first = request.num_output_tokens == 1
            outputs.append(
                EngineCoreOutput(
                    request_id,
                    (token_id,),
                    logprobs,
                    status.finish_reason if status is not None else None,
                    request.stop_reason,
                    max(request.num_cached_tokens, 0),
                    request.timings.first_scheduled_s if first else None,
                )
            )
        return outputs

    # ---- internals -----------------------------------------------------------------------

    def _admit(self, budget: int, num_scheduled: dict[str, int], new: list[NewRequestData]) -> int:
        i = 0
        while i < len(self.waiting) and budget > 0:
            if len(self.running) + len(self.loading) >= self.config.max_num_seqs:
                break
            request = self.waiting[i]
            sibling = request.wait_for
            if (
                sibling is not None
                and not sibling.is_finished
                and sibling.num_computed_tokens < sibling.num_prompt_tokens
            ):
                i += 1  # share the sibling's prompt blocks once they exist (n > 1)
                continue
            hit = self.kv.find_prefix(request)
            num_external = 0
            if self.connector is not None:
                num_external = self.connector.num_matched_tokens(request, hit.num_tokens)
            if num_external > 0:
                if not self._admit_loading(request, hit, num_external):
                    break
                self.waiting.pop(i)
                continue
            num_new = self._num_tokens_to_compute(request, hit.num_tokens, budget)
            if self.kv.allocate(request, num_new, hit) is None:
                break  # head-of-line: later requests wait their turn
            self.waiting.pop(i)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = hit.num_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = hit.num_tokens
            if request.timings.first_scheduled_s is None:
                request.timings.first_scheduled_s = time.monotonic()
            self._insert_running(request)
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            new.append(self._new_request_data(request))
        return budget

    def _admit_loading(self, request: Request, hit: PrefixHit, num_external: int) -> bool:
        """Allocate blocks for the hit and the connector's tokens; the request waits for them."""
        if self.kv.allocate(request, num_external, hit) is None:
            return False
        assert self.connector is not None
        self.connector.after_allocation(
            request, self.kv.block_ids(request), hit.num_tokens, num_external
        )
        request.status = RequestStatus.WAITING_FOR_KV
        request.num_computed_tokens = hit.num_tokens
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = hit.num_tokens
        if request.timings.first_scheduled_s is None:
            request.timings.first_scheduled_s = time.monotonic()
        self.loading[request.request_id] = (request, num_external)
        return True

    def _new_request_data(self, request: Request) -> NewRequestData:
        return NewRequestData(
            request_id=request.request_id,
            token_ids=tuple(request.all_token_ids),
            num_prompt_tokens=request.num_prompt_tokens,
            block_ids=tuple(self.kv.block_ids(request)),
            num_computed_tokens=request.num_computed_tokens,
            params=request.params,
            generator=request.generator,
            eos_token_ids=request.eos_token_ids,
        )

    def _done_when_in_flight_lands(self, request: Request) -> bool:
        """A token in flight will end the request by length: schedule nothing more for it."""
        extra = request.num_output_placeholders
        return extra > 0 and self._length_reached(request, extra)

    def _length_reached(self, request: Request, extra: int = 0) -> bool:
        """max_tokens or max_model_len reached, counting `extra` tokens not yet appended."""
        return (
            request.num_output_tokens + extra >= request.max_tokens
            or request.num_tokens + extra >= self.max_model_len
        )

    def _num_tokens_to_compute(self, request: Request, num_computed: int, budget: int) -> int:
        total = request.num_tokens + request.num_output_placeholders
        num_new = min(total - num_computed, budget)
        if self.config.max_prefill_chunk is not None:
            num_new = min(num_new, self.config.max_prefill_chunk)
        assert num_new > 0, (request, num_computed, budget)
        return num_new

    def _pick_victim(self, after: int) -> Request:
        """The lowest-priority running request not yet scheduled this step (else running[after])."""
        candidates = self.running[after:]
        if self.config.policy == "priority":
            return max(candidates, key=Request.sort_key)
        return candidates[-1]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.timings.num_preemptions += 1
        self.num_preemptions += 1
        self._finished_ids.add(request.request_id)  # the runner drops its state
        self._enqueue(request, front=True)

    def _enqueue(self, request: Request, front: bool = False) -> None:
        if self.config.policy == "priority":
            key = request.sort_key()
            pos = next((j for j, r in enumerate(self.waiting) if r.sort_key() > key), None)
            self.waiting.insert(len(self.waiting) if pos is None else pos, request)
        elif front:
            self.waiting.insert(0, request)
        else:
            self.waiting.append(request)

    def _insert_running(self, request: Request) -> None:
        if self.config.policy == "priority":
            key = request.sort_key()
            pos = next((j for j, r in enumerate(self.running) if r.sort_key() > key), None)
            self.running.insert(len(self.running) if pos is None else pos, request)
        else:
            self.running.append(request)

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if self._length_reached(request):
            return RequestStatus.FINISHED_LENGTH
        return None

    def _end(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        request.timings.finished_s = time.monotonic()
        self._finished_ids.add(request.request_id)
        connector = self.connector
        if connector is not None and connector.request_finished(
            request, self.kv.block_ids(request)
        ):
            self.held[request.request_id] = request
        else:
            self.kv.free(request)
