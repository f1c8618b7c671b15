"""The wire module and sequence ids: what the gateway sends is what the worker reads back."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from baton.proto import worker_pb2 as pb
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.sequence_ids import SEPARATOR, parse_sequence_id, sequence_id
from baton.services.engine.step_io import EngineCoreOutput, TokenLogprobs
from baton.services.wire import (
    ChannelPool,
    delta_to_pb,
    logprob_from_pb,
    logprob_to_pb,
    params_from_pb,
    params_to_pb,
)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_every_sequence_id_parses_back_to_its_request_and_index(n: int) -> None:
    for index in range(n):
        seq_id = sequence_id("chatcmpl-abc-1f2e", index, n)
        assert parse_sequence_id(seq_id) == ("chatcmpl-abc-1f2e", index)
    assert sequence_id("r1", 0, 1) == "r1"
    assert sequence_id("r1", 3, 4) == f"r1{SEPARATOR}3"


def test_ids_that_are_not_sequence_ids_parse_as_sequence_zero() -> None:
    for seq_id in ("r1", "r1#", "#3", "r1#x", "r1#-1", "r1#٣", "r1#2@prefill"):
        assert parse_sequence_id(seq_id) == (seq_id, 0), seq_id


def test_sampling_params_survive_the_round_trip() -> None:
    # Values a float32 holds exactly: the wire's floats are 32-bit.
    params = SamplingParams(
        n=3,
        temperature=0.75,
        top_p=0.875,
        top_k=40,
        min_p=0.0625,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        repetition_penalty=1.125,
        seed=1234,
        stop_token_ids=(7, 9),
        max_tokens=17,
        min_tokens=2,
        ignore_eos=True,
        logprobs=3,
    )
    back = params_from_pb(params_to_pb(params))
    assert back == params
    # Unset optionals stay unset (proto3 optional fields), and defaults stay defaults.
    assert params_from_pb(params_to_pb(SamplingParams())) == SamplingParams()
    assert params_from_pb(pb.SamplingParams()) == SamplingParams(temperature=0.0, max_tokens=None)


def test_bad_values_from_the_wire_name_their_parameter() -> None:
    with pytest.raises(ValueError, match="top_k"):
        params_from_pb(pb.SamplingParams(top_k=-5))


def test_delta_carries_the_index_of_its_sequence() -> None:
    lp = TokenLogprobs(11, -0.5, (11, 3), (-0.5, -1.25))
    out = EngineCoreOutput(
        request_id=sequence_id("r7", 2, 3),
        new_token_ids=(11,),
        new_logprobs=(lp,),
        finish_reason="stop",
        stop_reason=11,
    )
    delta = delta_to_pb(out)
    assert delta.index == 2 and list(delta.token_ids) == [11]
    assert delta.finish_reason == "stop" and delta.stop_token_id == 11
    assert logprob_from_pb(delta.logprobs[0]) == lp
    assert logprob_from_pb(logprob_to_pb(lp)) == lp
    running = delta_to_pb(EngineCoreOutput("r7", (1, 2), (), None, None))
    assert running.index == 0 and running.finish_reason == ""
    assert not running.HasField("stop_token_id")


def test_channel_pool_opens_one_channel_per_address_and_closes_them_all() -> None:
    async def run() -> None:
        pool = ChannelPool(options=[("grpc.max_receive_message_length", 1024)])
        a = pool.channel("127.0.0.1:1")
        assert pool.channel("127.0.0.1:1") is a
        b = pool.channel("127.0.0.1:2")
        assert b is not a
        # A stub over a channel to nowhere fails with UNAVAILABLE, not with a pool error.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pool.stub("127.0.0.1:1").Health(pb.HealthRequest(), timeout=0.5)
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        await pool.close()
        assert a.get_state() == grpc.ChannelConnectivity.SHUTDOWN
        assert b.get_state() == grpc.ChannelConnectivity.SHUTDOWN
        assert pool.channel("127.0.0.1:1") is not a  # usable again after close
        await pool.close()

    asyncio.run(run())
