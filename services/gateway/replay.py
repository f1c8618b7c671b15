"""Token replay: a stream whose decode worker fails mid-way goes on on another worker.

The gateway keeps the tokens a stream has delivered. When its worker dies or misses a deadline
after the first message, the request is placed again with those tokens as
`resume_output_token_ids`: the new worker prefills the prompt and them, takes them as its first
outputs (so max/min tokens, penalties and stop checks count them) and streams only what
follows. The client sees one stream: no error, no token twice, none missing.

What continues exactly: greedy decoding (the same tokens as an undisturbed run); seeded sampling
(the new worker advances the request's generator past the draws the delivered tokens took, so
it draws what the first worker would have). Unseeded sampling continues from fresh randomness,
as any sample would. Limits: n > 1 is not replayed (its sequences fail as before); the
first-token statistics (TTFT split, cached tokens) are those of the first worker.
"""

from __future__ import annotations

from baton.proto import worker_pb2 as pb


class StreamReplay:
    """What one request's stream has delivered so far, and the request that resumes it."""

    def __init__(self, request: pb.GenerateRequest) -> None:
        self.request = request
        self.delivered: list[int] = []
        self.finished = False
        self.resumed = False
        """The stream now comes from a worker that resumed it."""
        self._fresh = False

    def can_resume(self) -> bool:
        """Whether the stream can go on elsewhere: one sequence, unfinished, tokens to go."""
        params = self.request.params
        if max(params.n, 1) != 1 or self.finished:
            return False
        return not params.HasField("max_tokens") or len(self.delivered) < params.max_tokens

    def resume(self) -> pb.GenerateRequest:
        """The request for the next worker: the same, with the delivered tokens to resume."""
        resumed = pb.GenerateRequest()
        resumed.CopyFrom(self.request)
        del resumed.resume_output_token_ids[:]
        resumed.resume_output_token_ids.extend(self.delivered)
        self.resumed = self._fresh = True
        return resumed

    def deliver(self, msg: pb.GenerateResponse) -> pb.GenerateResponse:
        """Record a message's tokens; a resumed stream's first message loses the fields only
        a stream's very first message carries (they were delivered already)."""
        for seq in msg.sequences:
            self.delivered.extend(seq.token_ids)
            if seq.finish_reason:
                self.finished = True
        if self._fresh:
            self._fresh = False
            for name in ("num_prompt_tokens", "num_cached_tokens", "ttft"):
                msg.ClearField(name)
            msg.prefilled_remotely = False
            msg.kv_bytes_received = 0
        return msg
