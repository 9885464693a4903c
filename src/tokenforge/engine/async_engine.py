"""The asyncio front of the engine: many concurrent `generate()` streams over one stepping loop.

The loop runs `LLMEngine.step()` in one dedicated worker thread (torch and the kernels release the GIL, so
the event loop keeps serving clients meanwhile). `from_args` builds the engine on that same thread, so all
of the process's torch work runs on one thread: OpenMP keeps a thread team per calling thread, and once a
process has more OpenMP threads than cores, libgomp stops spinning at barriers and every parallel region
waits for its workers to wake (measured: engine steps ~20% slower, the cores a quarter idle). New
requests and aborts are queued and applied between steps by that thread too, so the engine itself is only
ever touched by one thread at a time. Detokenization stays on that thread: it costs under 1 % of its time
even with the demo model's 5 ms steps (measured; see the README), less than a hand-off would.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from tokenforge.engine.client import EngineDeadError
from tokenforge.engine.engine import LLMEngine
from tokenforge.engine.messages import RequestOutput
from tokenforge.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLMEngine", "EngineDeadError"]


class AsyncLLMEngine:
    """An `EngineClient` over one `LLMEngine` in this process."""

    def __init__(self, engine: LLMEngine, worker: ThreadPoolExecutor | None = None):
        self.engine = engine
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending_adds: list = []
        self._pending_aborts: list[str] = []
        self._lock = threading.Lock()  # guards the two pending lists, never held during a step
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._worker = worker  # the stepping thread; made on first use when not given
        self.dead: BaseException | None = None

    @classmethod
    def from_args(cls, model: str, **kwargs) -> AsyncLLMEngine:
        """Build the engine on the thread that will step it (see the module notes); errors propagate."""
        worker = _stepping_thread()
        try:
            engine = worker.submit(LLMEngine.from_args, model, **kwargs).result()
        except BaseException:
            worker.shutdown(wait=False)
            raise
        return cls(engine, worker)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    def health(self) -> str | None:
        return None if self.dead is None else f"the engine loop has stopped: {self.dead!r}"

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            if self._worker is None:
                self._worker = _stepping_thread()
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def generate(self, prompt: str | None = None, params: SamplingParams | None = None,
                       req_id: str | None = None, prompt_token_ids: list[int] | None = None,
                       cache_salt: str | None = None, num_resumed_tokens: int = 0) -> AsyncIterator[RequestOutput]:
        """Stream this request's outputs (one per new token; the last has finished=True).

        Validation errors raise ValueError before the first output. Cancelling the iteration (a client
        that went away) aborts the request and frees its KV blocks. `num_resumed_tokens`: see
        `LLMEngine.make_request` (a request resumed from another engine).
        """
        if self.dead is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self.dead!r}")
        self._ensure_loop()
        req_id = req_id or f"req-{next(self._ids)}"
        if req_id in self._streams:
            raise ValueError(f"request id {req_id!r} is already in use")
        req = self.engine.make_request(req_id, prompt, params, prompt_token_ids, cache_salt=cache_salt,
                                       num_resumed_tokens=num_resumed_tokens)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[req_id] = queue
        with self._lock:
            self._pending_adds.append(req)
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, ValueError):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine loop failed: {item!r}") from item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(req_id)

    def abort(self, req_id: str) -> None:
        """Abort soon (before the next step); safe from any thread or task."""
        self._streams.pop(req_id, None)
        with self._lock:
            self._pending_aborts.append(req_id)
        if self._wakeup is not None:
            self._wakeup.set()

    def _step(self) -> tuple[list[RequestOutput], list[tuple[str, ValueError]]]:
        """Runs in the worker thread: apply queued adds and aborts, then one engine step."""
        with self._lock:
            adds, self._pending_adds = self._pending_adds, []
            aborts, self._pending_aborts = self._pending_aborts, []
        failed = []
        for req in adds:
            try:
                self.engine.add(req)
            except ValueError as e:  # an id clash found only now: fail that stream alone
                failed.append((req.req_id, e))
        if aborts:
            self.engine.abort_request(aborts)
        return (self.engine.step() if self.engine.has_unfinished_requests() else []), failed

    def _idle(self) -> bool:
        return not (self.engine.has_unfinished_requests() or self._pending_adds or self._pending_aborts)

    async def _run(self) -> None:
        try:
            while True:
                if self._idle():
                    self._wakeup.clear()
                    if self._idle():
                        await self._wakeup.wait()
                outputs, failed = await asyncio.get_running_loop().run_in_executor(self._worker, self._step)
                for req_id, error in failed:
                    queue = self._streams.pop(req_id, None)
                    if queue is not None:
                        queue.put_nowait(error)
                for out in outputs:
                    queue = self._streams.get(out.req_id)
                    if queue is not None:
                        queue.put_nowait(out)
                        if out.finished:
                            del self._streams[out.req_id]
                await asyncio.sleep(0)  # let handlers run between steps
        except Exception as e:  # report to every waiting stream rather than hang them
            logger.exception("engine loop failed")
            self.dead = e
            for queue in self._streams.values():
                queue.put_nowait(e)
            self._streams.clear()

    async def run_on_engine(self, fn, *args):
        """fn(engine, *args) on the stepping thread, between two steps (the engine is only ever touched by
        that thread): KV export and import for a hand-off between engines."""
        if self._worker is None:
            self._worker = _stepping_thread()
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, self.engine, *args)

    def health_report(self) -> dict:
        return {"status": "ok"} if self.dead is None else {"status": "dead", "reason": repr(self.dead)}

    def stats(self) -> dict:
        """A snapshot for metrics; read without stopping the loop (counters may be one step apart)."""
        return self.engine.stats()

    async def stop_loop(self) -> None:
        """Let the loop apply what is queued (aborts, finished requests), then stop its task; it restarts with
        the next request, on whichever event loop that comes from. The stepping thread stays."""
        while self._task is not None and not self._task.done() and not self._idle():
            await asyncio.sleep(0.001)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def shutdown(self) -> None:
        """Stop the loop, close the engine (its KV tiers flush to disk) on its thread, stop that thread."""
        await self.stop_loop()
        if self._worker is not None:
            await asyncio.get_running_loop().run_in_executor(self._worker, self.engine.close)
            self._worker.shutdown(wait=False)
            self._worker = None


def _stepping_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenforge-engine")
