"""baton.v1 messages ↔ engine objects, and the gRPC channels they travel on: shared by the
gateway and the workers, so both sides of the wire convert the same way.

Imports no torch (the gateway uses it; tests/unit/test_import_rules.py checks): the engine types
it converts (SamplingParams, EngineCoreOutput, TokenLogprobs) are plain dataclasses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from baton.proto import worker_pb2 as pb
from baton.proto import worker_pb2_grpc as pb_grpc
from baton.services.cluster_auth import client_interceptors, cluster_token_from_env
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.sequence_ids import parse_sequence_id
from baton.services.engine.step_io import EngineCoreOutput, TokenLogprobs

# ---- sampling parameters ------------------------------------------------------------------------


def params_from_pb(p: pb.SamplingParams) -> SamplingParams:
    """Raises ValueError (gRPC INVALID_ARGUMENT) with the parameter's name on bad values.

    proto3 scalars cannot be absent, so 0 stands for "unset" where 0 is no valid value (n,
    top_p, repetition_penalty); optional fields (seed, max_tokens, logprobs) use HasField.
    """
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
    """The worker's share of `p`: stop strings and detokenization stay with the gateway."""
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


# ---- outputs ------------------------------------------------------------------------------------


def logprob_to_pb(lp: TokenLogprobs) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top_token_ids=list(lp.top_token_ids),
        top_logprobs=list(lp.top_logprobs),
    )


def logprob_from_pb(lp: pb.TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(lp.token_id, lp.logprob, tuple(lp.top_token_ids), tuple(lp.top_logprobs))


def delta_to_pb(out: EngineCoreOutput) -> pb.SequenceDelta:
    """One sequence's new tokens; its index is read from the sequence id ("r1#2" → 2)."""
    delta = pb.SequenceDelta(
        index=parse_sequence_id(out.request_id)[1],
        token_ids=list(out.new_token_ids),
        logprobs=[logprob_to_pb(lp) for lp in out.new_logprobs],
        finish_reason=out.finish_reason or "",
    )
    if isinstance(out.stop_reason, int):
        delta.stop_token_id = out.stop_reason
    return delta


# ---- channels -----------------------------------------------------------------------------------


class ChannelPool:
    """grpc.aio channels to workers, one per address, opened on first use and closed together.

    A channel multiplexes every call to its address over one HTTP/2 connection, so callers
    share them rather than open one per request. Use it from one event loop (grpc.aio channels
    belong to the loop they were opened on).
    """

    def __init__(
        self,
        options: Sequence[tuple[str, Any]] = (),
        *,
        token: str | None = None,
        caller: str = "",
    ) -> None:
        """options: gRPC channel arguments for every channel (e.g. max message lengths).
        token: the cluster token every call carries (None: $BATON_CLUSTER_TOKEN, "": none);
        caller: who calls, for the worker's per-caller queue share (cluster_auth.py)."""
        self._options = list(options)
        if token is None:
            token = cluster_token_from_env()
        self._interceptors = client_interceptors(token, caller)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        """The channel to `address` ("host:port"), opened now if this is its first use."""
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                address, options=self._options, interceptors=self._interceptors
            )
            self._channels[address] = channel
        return channel

    def stub(self, address: str) -> pb_grpc.WorkerStub:
        """A baton.v1 Worker stub over the channel to `address` (stubs are cheap)."""
        return pb_grpc.WorkerStub(self.channel(address))  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        """Close every channel (in-flight calls are cancelled); the pool can be reused after."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
