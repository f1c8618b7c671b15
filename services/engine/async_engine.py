"""The engine for servers: EngineCore in its own thread, asyncio streams for callers.

The engine thread owns the core (scheduler, KV cache, runner) and is the only thread that
touches it. Callers on the event loop send commands (add, abort, or any function to run on the
core) through a thread-safe queue; the engine thread hands each step's outputs back to the loop
with call_soon_threadsafe; KV transfers that end on other threads wake it with `wake()`. One
stream per user request carries lists of EngineCoreOutput (one entry per sequence that
progressed in a step).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from baton.services.engine.engine_core import EngineCore
from baton.services.engine.outputs import EngineStats
from baton.services.engine.request import Request
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.sequences import SequenceFactory
from baton.services.engine.step_io import EngineCoreOutput

logger = logging.getLogger(__name__)
T = TypeVar("T")

_IDLE_WAIT_S = 0.05
_STUCK_WAIT_S = 0.002
"""With work queued but nothing runnable (waiting for transfers), poll this often (a transfer
that ends calls wake(), so this only bounds a missed wake-up)."""


@dataclass
class _Stream:
    request_id: str
    sequence_ids: set[str]
    queue: asyncio.Queue[list[EngineCoreOutput] | BaseException]
    unfinished: set[str]


class AsyncEngine:
    def __init__(self, core: EngineCore, sequences: SequenceFactory) -> None:
        self.core = core
        self.sequences = sequences
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._seq_to_request: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stats = core.stats()

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="baton-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        self._commands.put(lambda: None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def stats(self) -> EngineStats:
        """Snapshot taken by the engine thread after its last step."""
        return self._stats

    # ---- requests --------------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        kv_transfer: object | None = None,
        resumed_output_token_ids: Sequence[int] = (),
    ) -> AsyncIterator[list[EngineCoreOutput]]:
        """Stream a request's outputs. Raises ValueError before streaming for a bad request.
        kv_transfer: the KV connector's parameters for every sequence of the request.

        Leaving the iteration early (the caller was cancelled or closed it) aborts every
        sequence of the request that has not finished.
        """
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        seqs = self.sequences.make(
            request_id, prompt_token_ids, params, priority, cache_salt, resumed_output_token_ids
        )
        for seq in seqs:
            seq.kv_transfer = kv_transfer
        ids = {s.request_id for s in seqs}
        stream = _Stream(request_id, ids, asyncio.Queue(), set(ids))
        self._streams[request_id] = stream
        for seq_id in ids:
            self._seq_to_request[seq_id] = request_id
        self._commands.put(lambda: self._add(seqs))
        try:
            while stream.unfinished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                for out in item:
                    if out.finish_reason is not None:
                        stream.unfinished.discard(out.request_id)
                yield item
        finally:
            if stream.unfinished:
                self.abort(list(stream.unfinished))
            self._forget(stream)

    def abort(self, ids: list[str]) -> None:
        """Abort whole requests or single sequences ("r1#2"); unknown ids are ignored."""
        seq_ids: list[str] = []
        for i in ids:
            stream = self._streams.get(i)
            seq_ids.extend(stream.sequence_ids if stream is not None else [i])

        def run() -> None:
            ended = self.core.abort(seq_ids)
            if ended and self._loop is not None:
                # The streams of aborted sequences must end too, not wait for tokens forever.
                outs = [EngineCoreOutput(r.request_id, (), (), "abort", None) for r in ended]
                self._loop.call_soon_threadsafe(self._dispatch, outs)

        self._commands.put(run)

    async def call(self, fn: Callable[[EngineCore], T]) -> T:
        """Run fn(core) on the engine thread and await its result."""
        assert self._loop is not None, "start() first"
        future: asyncio.Future[T] = self._loop.create_future()
        loop = self._loop

        def run() -> None:
            try:
                result = fn(self.core)
            except BaseException as e:
                loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

        self._commands.put(run)
        return await future

    def wake(self) -> None:
        """Thread-safe: make the engine thread look at the core now (a transfer ended)."""
        self._commands.put(lambda: None)

    # ---- engine thread ---------------------------------------------------------------------

    def _add(self, seqs: list[Request]) -> None:
        for seq in seqs:
            self.core.add_request(seq)

    def _run(self) -> None:
        assert self._loop is not None
        loop = self._loop
        wait_s = _IDLE_WAIT_S
        while not self._stopping.is_set():
            try:
                self._commands.get(timeout=wait_s)()
                while True:  # drain what else is queued before the next step
                    self._commands.get_nowait()()
            except queue.Empty:
                pass
            except Exception:  # a failed command must not kill the engine thread
                logger.exception("engine command failed")
            if not self.core.has_unfinished():
                self._stats = self.core.stats()  # commands (aborts) changed it
                wait_s = _IDLE_WAIT_S
                continue
            try:
                outputs = self.core.step()
            except Exception as e:
                logger.exception("engine step failed")
                loop.call_soon_threadsafe(self._fail_all, e)
                continue
            self._stats = self.core.stats()
            if outputs:
                loop.call_soon_threadsafe(self._dispatch, outputs)
            wait_s = 0.0 if self.core.last_num_scheduled_tokens else _STUCK_WAIT_S

    # ---- event loop side -------------------------------------------------------------------

    def _dispatch(self, outputs: list[EngineCoreOutput]) -> None:
        by_request: dict[str, list[EngineCoreOutput]] = {}
        for out in outputs:
            request_id = self._seq_to_request.get(out.request_id)
            if request_id is not None:
                by_request.setdefault(request_id, []).append(out)
        for request_id, outs in by_request.items():
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.queue.put_nowait(outs)

    def _fail_all(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream.queue.put_nowait(error)

    def _forget(self, stream: _Stream) -> None:
        self._streams.pop(stream.request_id, None)
        for seq_id in stream.sequence_ids:
            self._seq_to_request.pop(seq_id, None)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
