"""AsyncLLM: the engine for a server. Submit a request, iterate its streamed outputs, cancel it.

The EngineCore is built and runs on one background thread (schedule -> execute -> update, in a
loop while there is work): all of its torch work stays on that thread, since CPU torch runs ~3x
slower when its OpenMP work hops between threads; callers on any asyncio loop add and abort requests under a lock, so errors in a
request (bad input, context too long, overload) are raised to its caller at once and never reach
the loop. Outputs are handed to each request's asyncio.Queue with call_soon_threadsafe; deltas that queue
up while the consumer is busy are merged into one.
Leaving the `async for` early (client gone, task cancelled) aborts the request: its KV blocks and
state slot are freed at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from .engine.engine import EngineCore
from .engine.outputs import RequestOutput
from .engine.sampling import SamplingParams

log = logging.getLogger(__name__)


class AsyncLLM:
    def __init__(self, model: str | Path, **engine_kwargs) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._held: dict[str, RequestOutput | None] = {}  # complete() requests: their deltas so far
        self.last_error: BaseException | None = None
        self.engine: EngineCore | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(model, engine_kwargs, started),
                                        name="epserve-engine", daemon=True)
        self._thread.start()
        started.wait()
        if self.engine is None:
            raise self.last_error
        self.config, self.tokenizer = self.engine.config, self.engine.tokenizer

    # -- the engine thread -------------------------------------------------------------------------
    def _loop(self, model, engine_kwargs: dict, started: threading.Event) -> None:
        # One intra-op thread by default (process-wide, as in Ray actors): with more, CPU torch on this
        # thread slows down several-fold once another thread has used torch too (libgomp, 2 cores).
        # In process, ClusterConfig.threads_per_worker asks for more (a replica given several CPUs).
        cluster = engine_kwargs.get("cluster")
        torch.set_num_threads(cluster.threads_per_worker if cluster is not None and not cluster.wants_ray else 1)
        try:
            self.engine = EngineCore(model, **engine_kwargs)
        except BaseException as e:  # reported to the constructor's caller
            self.last_error = e
            return
        finally:
            started.set()
        while not self._stopped:
            with self._lock:
                busy = self.engine.has_unfinished()
                try:
                    outputs = self.engine.step() if busy else []
                    if not busy:
                        self.engine.flush()
                        self.engine.maintain()
                    background = self.engine.busy_in_background
                    self.last_error = None
                except Exception as e:  # a failed step ends the requests it held, not the server
                    log.exception("engine step failed")
                    self.last_error = e
                    self._fail_all(e)
                    outputs, background = [], False
            for out in outputs:
                self._deliver(out.request_id, out)
            if not busy:  # idle: a request wakes the loop; work in the background is polled
                self._wake.wait(timeout=0.02 if background else 0.5)
                self._wake.clear()

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
            self._deliver(request_id, error)

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        loop, queue = stream
        if request_id in self._held:  # complete(): one hand-over with everything, at the end
            held = self._held[request_id]
            if isinstance(item, RequestOutput):
                item = item if held is None else held.then(item)
            if isinstance(item, RequestOutput) and not item.finished:
                self._held[request_id] = item
                return
            self._held.pop(request_id)
        if isinstance(item, Exception) or item.finished:
            self._streams.pop(request_id, None)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            pass

    # -- the API -----------------------------------------------------------------------------------
    def _add(self, request_id, prompt, params, loop, queue, whole: bool = False) -> None:
        with self._lock:
            self.engine.add_request(request_id, prompt, params)
            self._streams[request_id] = (loop, queue)
            if whole:
                self._held[request_id] = None
        self._wake.set()

    async def complete(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> RequestOutput:
        """The whole result of a request as one RequestOutput (its deltas merged on the engine
        thread: it crosses threads once, not once per token; for batch work). Raises as generate."""
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        await loop.run_in_executor(None, self._add, request_id, prompt, params or SamplingParams(), loop, queue, True)
        try:
            item = await queue.get()
        except BaseException:
            await self.abort(request_id)
            raise
        if isinstance(item, Exception):
            raise item
        return item

    async def generate(self, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                       request_id: str | None = None, stream_interval: int = 1) -> AsyncIterator[RequestOutput]:
        """Streams a request's outputs; raises ValueError / ContextLengthError / OverloadedError
        before the first one if the request is refused. stream_interval: after the first token,
        hold deltas until they carry this many tokens (or the request ends), as vLLM's
        --stream-interval: fewer, larger messages through the serving stack."""
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        await loop.run_in_executor(None, self._add, request_id, prompt, params or SamplingParams(), loop, queue)
        finished, sent_first = False, False
        try:
            while not finished:
                item = await queue.get()
                # the first delta leaves alone, at once; after it, deltas that queued up while the
                # consumer was busy leave as one (under load a stream crosses the serving stack once
                # per turn, not once per token), held until they carry stream_interval tokens
                while not isinstance(item, Exception) and not item.finished and sent_first and (
                        not queue.empty() or len(item.new_token_ids) < stream_interval):
                    following = queue.get_nowait() if not queue.empty() else await queue.get()
                    item = item.then(following) if not isinstance(following, Exception) else following
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                sent_first = sent_first or bool(item.new_token_ids)
                yield item
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Cancels a request; its blocks and slot are free when this returns."""
        await asyncio.get_running_loop().run_in_executor(None, self._abort, request_id)

    def _abort(self, request_id: str) -> None:
        with self._lock:
            out = self.engine.abort_request(request_id)
        if out is not None:
            self._deliver(request_id, out)

    async def _call(self, method: str, *args):
        """Runs an engine method between two steps (under the engine lock) off the event loop."""
        def locked():
            with self._lock:
                return getattr(self.engine, method)(*args)
        return await asyncio.get_running_loop().run_in_executor(None, locked)

    async def expert_load(self):
        return await self._call("expert_load")

    async def expert_status(self) -> dict:
        return await self._call("expert_status")

    async def rebalance(self, redundant_slots: int | None = None) -> dict:
        """Plans and applies a placement for the current load; experts load while serving goes on,
        the switch happens between two steps."""
        change = await self._call("start_rebalance", redundant_slots)
        self._wake.set()
        timeout = self.engine.cluster.timeout_s
        return await asyncio.get_running_loop().run_in_executor(None, change.wait, timeout)

    async def scale_experts(self, num_workers: int) -> dict:
        return await self._call("scale_experts", num_workers)

    async def worker_info(self) -> list[dict]:
        """Per worker (attention workers first): role, rank, pid, bytes held, ..."""
        return await self._call("worker_info")

    def cache_usage(self) -> dict:
        with self._lock:
            return self.engine.cache_usage()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
        with self._lock:
            self.engine.shutdown()
