"""Continuous batching: which requests compute how many tokens this step.

One token budget per step is spent first on running requests (decodes and unfinished prefill
chunks, in admission or priority order), then on admitting waiting requests, whose prefix hits
are applied first. When a running request cannot get a block, the lowest-priority running
request not yet scheduled this step is preempted by recompute: it gives back all its blocks and
returns to the head of the queue keeping its outputs; on resumption it recomputes prompt and
outputs (hitting the prefix cache where its blocks survived) and carries on.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from baton.services.engine.config import SchedulerConfig
from baton.services.engine.kv_cache_manager import KVCacheManager, PrefixHit
from baton.services.engine.request import Request, RequestStatus
from baton.services.engine.step_io import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    RemotePrefillStart,
    SchedulerOutput,
    TokenLogprobs,
)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()
        self.num_preemptions = 0
        # Disaggregation. Decode side: requests whose blocks a remote prefill is filling, and
        # aborted ones whose blocks must outlive the transfer in flight. Prefill side: finished
        # requests whose blocks are held until they have been sent.
        self.awaiting_kv: dict[str, Request] = {}
        self._aborted_in_flight: dict[str, Request] = {}
        self._remote_starts: list[RemotePrefillStart] = []
        self._unsent: set[str] = set()
        """Running requests the runner has not seen yet (admitted through remote KV)."""
        self.held: dict[str, tuple[Request, tuple[int, ...]]] = {}
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
            self._unsent.discard(request_id)
            if request_id in self.awaiting_kv:
                # A transfer may still be writing into its blocks: free them only once the
                # prefill worker has answered (remote_kv_ready / remote_kv_failed).
                del self.awaiting_kv[request_id]
                self._aborted_in_flight[request_id] = request
                request.status = status
                request.timings.finished_s = time.monotonic()
                ended.append(request)
                continue
            if request in self.running:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            self._end(request, status)
            ended.append(request)
        return ended

    # ---- disaggregation --------------------------------------------------------------------

    def take_remote_prefill_starts(self) -> list[RemotePrefillStart]:
        starts, self._remote_starts = self._remote_starts, []
        return starts

    def remote_kv_ready(
        self, request_id: str, first_token_id: int, logprobs: TokenLogprobs | None = None
    ) -> EngineCoreOutput | None:
        """The prompt's KV is in this worker's blocks and its first token was sampled remotely.

        Returns the first token's output (None if the request was aborted meanwhile).
        """
        if self._release_aborted(request_id):
            return None
        request = self.awaiting_kv.pop(request_id)
        request.num_computed_tokens = request.num_prompt_tokens
        self.kv.cache_computed(request)
        request.status = RequestStatus.RUNNING
        self._insert_running(request)
        self._unsent.add(request_id)
        result = ModelRunnerOutput(
            {request_id: first_token_id}, {request_id: logprobs} if logprobs else {}
        )
        scheduled = SchedulerOutput((), (), {request_id: 0}, 0, frozenset())
        outputs = self.update_from_output(scheduled, result)
        return outputs[0] if outputs else None

    def remote_kv_failed(self, request_id: str) -> None:
        """The remote prefill failed: prefill here instead (nothing is lost but time)."""
        if self._release_aborted(request_id):
            return
        request = self.awaiting_kv.pop(request_id)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.remote_prefill_min_tokens = None
        request.status = RequestStatus.WAITING
        self._enqueue(request, front=True)

    def held_block_ids(self, request_id: str) -> tuple[int, ...]:
        return self.held[request_id][1]

    def release_held(self, request_id: str) -> None:
        """The held blocks of a finished prefill-for-remote request have been sent."""
        entry = self.held.pop(request_id, None)
        if entry is not None:
            self.kv.free(entry[0])

    def _release_aborted(self, request_id: str) -> bool:
        request = self._aborted_in_flight.pop(request_id, None)
        if request is None:
            return False
        self.kv.free(request)
        return True

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
            if request.request_id in self._unsent:
                self._unsent.discard(request.request_id)
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
            if len(self.running) + len(self.awaiting_kv) >= self.config.max_num_seqs:
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
            if self._wants_remote_prefill(request, hit.num_tokens):
                if not self._admit_remote(request, hit):
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

    def _wants_remote_prefill(self, request: Request, num_hit_tokens: int) -> bool:
        """Conditional disaggregation: remote only when enough of the prompt misses the cache."""
        threshold = request.remote_prefill_min_tokens
        if threshold is None or request.num_output_tokens > 0:
            return False  # never for a request resumed after preemption: it has outputs
        return request.num_prompt_tokens - num_hit_tokens >= max(threshold, 1)

    def _admit_remote(self, request: Request, hit: PrefixHit) -> bool:
        """Allocate every prompt block; the prefill worker fills those past the hit."""
        num_missing = request.num_prompt_tokens - hit.num_tokens
        if self.kv.allocate(request, num_missing, hit) is None:
            return False
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        request.num_computed_tokens = hit.num_tokens
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = hit.num_tokens
        if request.timings.first_scheduled_s is None:
            request.timings.first_scheduled_s = time.monotonic()
        self.awaiting_kv[request.request_id] = request
        self._remote_starts.append(
            RemotePrefillStart(
                request.request_id,
                tuple(request.prompt_token_ids),
                hit.num_tokens,
                tuple(self.kv.block_ids(request)),
            )
        )
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
        if request.hold_blocks_on_finish and status is not RequestStatus.FINISHED_ABORTED:
            self.held[request.request_id] = (request, tuple(self.kv.block_ids(request)))
        else:
            self.kv.free(request)
        request.status = status
        request.timings.finished_s = time.monotonic()
        self._finished_ids.add(request.request_id)
