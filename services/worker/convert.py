"""baton.v1 messages ↔ engine objects, in one place (the worker's side of the wire)."""

from __future__ import annotations

from baton.proto import worker_pb2 as pb
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.step_io import EngineCoreOutput, TokenLogprobs


def params_from_pb(p: pb.SamplingParams) -> SamplingParams:
    """Raises ValueError (gRPC INVALID_ARGUMENT) with the parameter's name on bad values."""
    return SamplingParams(
        n=p.n or 1,
        temperature=p.temperature,
        top_p=p.top_p if p.top_p > 0 else 1.0,
        top_k=p.top_k,
        min_p=p.min_p,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty > 0 else 1.0,
        seed=p.seed if p.HasField("seed") else None,
        stop_token_ids=tuple(p.stop_token_ids),
        max_tokens=p.max_tokens if p.HasField("max_tokens") else None,
        min_tokens=p.min_tokens,
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
    )


def params_to_pb(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        n=p.n,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        stop_token_ids=list(p.stop_token_ids),
        min_tokens=p.min_tokens,
        ignore_eos=p.ignore_eos,
    )
    if p.seed is not None:
        msg.seed = p.seed
    if p.max_tokens is not None:
        msg.max_tokens = p.max_tokens
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def logprob_to_pb(lp: TokenLogprobs) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top_token_ids=list(lp.top_token_ids),
        top_logprobs=list(lp.top_logprobs),
    )


def logprob_from_pb(lp: pb.TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(lp.token_id, lp.logprob, tuple(lp.top_token_ids), tuple(lp.top_logprobs))


def sequence_index(seq_id: str) -> int:
    """ "r1#2" → 2; "r1" → 0 (n == 1 requests have no suffix)."""
    _, sep, index = seq_id.rpartition("#")
    return int(index) if sep and index.isdigit() else 0


def delta_to_pb(out: EngineCoreOutput) -> pb.SequenceDelta:
    delta = pb.SequenceDelta(
        index=sequence_index(out.request_id),
        token_ids=list(out.new_token_ids),
        logprobs=[logprob_to_pb(lp) for lp in out.new_logprobs],
        finish_reason=out.finish_reason or "",
    )
    if isinstance(out.stop_reason, int):
        delta.stop_token_id = out.stop_reason
    return delta
