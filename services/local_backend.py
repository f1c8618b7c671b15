"""A gateway Backend that runs the engine in this process: tests and single-process serving.

It composes the gateway's Backend contract with the engine, so it lives in neither: the gateway
imports no engine runtime (no torch), the worker knows nothing of the gateway. It speaks the
same baton.v1 messages as the gRPC backend, so the gateway cannot tell the two apart:
GenerateRequest in (wire.params_from_pb, the workers' own conversion), GenerateResponse out
(wire.delta_to_pb), with the first message carrying the prompt's token count, its prefix-cache
hit and the TTFT split.

`python -m baton.services.local_backend` serves one model over HTTP this way, with no Redis,
router or workers.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import uvicorn

from baton.proto import worker_pb2 as pb
from baton.services.engine.async_engine import AsyncEngine
from baton.services.engine.config import EngineConfig
from baton.services.engine.engine_core import EngineCore
from baton.services.engine.llm_engine import LLMEngine
from baton.services.engine.step_io import EngineCoreOutput
from baton.services.engine.tokenizer import Tokenizer
from baton.services.gateway.app import build_app
from baton.services.gateway.backend import Backend, BackendError, InvalidRequest
from baton.services.gateway.http_limits import server_config
from baton.services.gateway.limits import GatewayLimits
from baton.services.gateway.main import api_keys_from_env
from baton.services.wire import delta_to_pb, params_from_pb

T = TypeVar("T")


class LocalBackend(Backend):
    """One AsyncEngine in this process, started lazily on the event loop that first uses it.

    AsyncEngine.start() binds the engine thread to the running loop, and the loop that serves
    requests (uvicorn's) often does not exist yet when the backend is built.
    """

    def __init__(self, llm_engine: LLMEngine) -> None:
        self.llm_engine = llm_engine
        self.engine = AsyncEngine(llm_engine.core, llm_engine.sequences)
        self.loop: asyncio.AbstractEventLoop | None = None
        """The loop the engine thread reports to (set on first use)."""

    @classmethod
    def create(cls, model: str = "smollm2", dtype: str = "float32", **kwargs: Any) -> LocalBackend:
        """Build the engine from the fields of EngineConfig, CacheConfig and SchedulerConfig."""
        config = EngineConfig.from_kwargs(model=model, dtype=dtype, **kwargs)
        return cls(LLMEngine.from_config(config))

    @property
    def tokenizer(self) -> Tokenizer:
        if self.llm_engine.tokenizer is None:
            raise ValueError(f"model {self.model_id} has no tokenizer")
        return self.llm_engine.tokenizer

    @property
    def model_id(self) -> str:
        return self.llm_engine.model_id

    @property
    def max_model_len(self) -> int:
        return self.llm_engine.max_model_len

    def _ensure_started(self) -> None:
        if self.loop is None:
            self.engine.start()
            self.loop = asyncio.get_running_loop()

    # ---- Backend -----------------------------------------------------------------------------

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        self._ensure_started()
        try:
            params = params_from_pb(request.params)
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
        received_s = time.monotonic()
        stream = self.engine.generate(
            request.request_id,
            list(request.prompt_token_ids),
            params,
            priority=request.priority,
            cache_salt=request.cache_salt or None,
        )
        first = True
        try:
            # AsyncEngine.generate is a generator: its ValueError for a bad prompt comes with the
            # first item, before anything was streamed, and is the client's fault.
            try:
                outs = await anext(stream)
            except StopAsyncIteration:
                return
            except ValueError as e:
                raise InvalidRequest(str(e)) from e
            while True:
                msg = pb.GenerateResponse(
                    request_id=request.request_id, sequences=[delta_to_pb(o) for o in outs]
                )
                if first:
                    first = False
                    self._fill_first(msg, request, outs[0], received_s)
                yield msg
                try:
                    outs = await anext(stream)
                except StopAsyncIteration:
                    return
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(str(e)) from e
        finally:
            # Closing the engine stream aborts whatever of the request is unfinished. It never
            # suspends (the stream is either exhausted, or parked at a yield and its cleanup is
            # synchronous), so it also runs to the end inside a cancelled task.
            await _aclose(stream)

    @staticmethod
    def _fill_first(
        msg: pb.GenerateResponse,
        request: pb.GenerateRequest,
        out: EngineCoreOutput,
        received_s: float,
    ) -> None:
        now = time.monotonic()
        admitted_s = out.first_scheduled_s or received_s
        msg.num_prompt_tokens = len(request.prompt_token_ids)
        msg.num_cached_tokens = out.num_cached_tokens
        routing_s = 0.0
        if request.arrival_unix_s and request.routed_unix_s:
            routing_s = max(request.routed_unix_s - request.arrival_unix_s, 0.0)
        msg.ttft.CopyFrom(
            pb.TtftBreakdown(
                queue_s=max(admitted_s - received_s, 0.0),
                routing_s=routing_s,
                prefill_s=max(now - admitted_s, 0.0),
            )
        )

    async def abort(self, request_ids: list[str]) -> None:
        self._ensure_started()
        self.engine.abort(request_ids)

    async def ready(self) -> bool:
        self._ensure_started()
        return True

    async def close(self) -> None:
        if self.loop is not None:
            await self.engine.stop()
            self.loop = None

    # ---- for tests and tools -----------------------------------------------------------------

    def call_threadsafe(self, fn: Callable[[EngineCore], T], timeout_s: float = 30.0) -> T:
        """Run fn(core) on the engine thread from a thread outside the serving loop."""
        if self.loop is None:
            raise RuntimeError("the engine has not started: serve a request first")
        return asyncio.run_coroutine_threadsafe(self.engine.call(fn), self.loop).result(timeout_s)


async def _aclose(stream: AsyncIterator[Any]) -> None:
    """aclose() an async generator typed as a plain AsyncIterator (AsyncEngine.generate's)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def main(argv: Sequence[str] | None = None) -> None:
    """Serve one model from an in-process engine: python -m baton.services.local_backend."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accepted Bearer key (repeatable; also $BATON_API_KEYS, comma-separated)",
    )
    args = parser.parse_args(argv)
    keys = [*args.api_key, *api_keys_from_env()]
    backend = LocalBackend.create(args.model, args.dtype, max_model_len=args.max_model_len)
    app = build_app(backend, backend.tokenizer, backend.model_id, backend.max_model_len, keys)
    uvicorn.Server(server_config(app, args.host, args.port, GatewayLimits())).run()


if __name__ == "__main__":
    main()
