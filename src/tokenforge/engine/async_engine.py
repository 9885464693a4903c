"""The asyncio front of the engine: many concurrent `generate()` streams over one stepping loop.

The stepping loop runs on one dedicated worker thread and steps for as long as there is work: it hands
each step's outputs to the event loop (`call_soon_threadsafe`) and starts the next step at once, rather
than waiting for the event loop to take them and ask again; torch and the kernels release the GIL, so the
event loop serves clients meanwhile. `from_args` builds the engine on that same thread, so all of the
process's torch work runs on one thread: OpenMP keeps a thread team per calling thread, and once a
process has more OpenMP threads than cores, libgomp stops spinning at barriers and every parallel region
waits for its workers to wake (measured: engine steps ~20% slower, the cores a quarter idle). New
requests, aborts and `run_on_engine` calls are queued and applied between steps by that thread too, so
the engine itself is only ever touched by one thread at a time. Detokenization stays on that thread: it
costs under 1 % of its time even with the demo model's 5 ms steps (measured; see the README), less than
a hand-off would.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor

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
        self._streams: dict[str, Callable] = {}  # request -> where its outputs go (`submit`)
        self._pending_adds: list = []
        self._pending_aborts: list[str] = []
        self._pending_calls: list[tuple] = []  # (fn, args, event loop, future) for `run_on_engine`
        self._lock = threading.Lock()  # guards the pending lists and `_looping`, never held during a step
        self._work = threading.Event()  # set when the stepping loop has something to do
        self._looping = False  # the stepping loop runs (or is about to) on the worker thread
        self._stopping = False  # stop the stepping loop once it is idle
        self._stepper: Future | None = None  # the stepping loop, as a future of the worker thread
        self._loop: asyncio.AbstractEventLoop | None = None  # where outputs are delivered
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
        """Start the stepping loop, delivering to the running event loop, unless it runs already."""
        with self._lock:
            if self._looping:
                return
            if self._worker is None:
                self._worker = _stepping_thread()
            self._loop = asyncio.get_running_loop()
            self._looping, self._stopping = True, False
            self._stepper = self._worker.submit(self._step_loop)

    def submit(self, sink: Callable[[RequestOutput | BaseException], None], prompt: str | None = None,
               params: SamplingParams | None = None, req_id: str | None = None,
               prompt_token_ids: list[int] | None = None, cache_salt: str | None = None,
               num_resumed_tokens: int = 0) -> str:
        """Start a request whose outputs go to `sink(output)` on the event loop, one call per step that gives
        it tokens (the last has finished=True), or `sink(error)` once: a ValueError when the engine refuses
        it late, another exception when the engine loop died. No task or queue per request: what a consumer
        of whole steps (a replica's poll) takes. Validation errors raise ValueError here; returns the id."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self.dead!r}")
        self._ensure_loop()
        req_id = req_id or f"req-{next(self._ids)}"
        if req_id in self._streams:
            raise ValueError(f"request id {req_id!r} is already in use")
        req = self.engine.make_request(req_id, prompt, params, prompt_token_ids, cache_salt=cache_salt,
                                       num_resumed_tokens=num_resumed_tokens)
        self._streams[req_id] = sink
        with self._lock:
            self._pending_adds.append(req)
            self._work.set()
        return req_id

    async def generate(self, prompt: str | None = None, params: SamplingParams | None = None,
                       req_id: str | None = None, prompt_token_ids: list[int] | None = None,
                       cache_salt: str | None = None, num_resumed_tokens: int = 0) -> AsyncIterator[RequestOutput]:
        """Stream this request's outputs (one per step that gives it tokens; the last has finished=True).

        Validation errors raise ValueError before the first output. Cancelling the iteration (a client
        that went away) aborts the request and frees its KV blocks. `num_resumed_tokens`: see
        `LLMEngine.make_request` (a request resumed from another engine).
        """
        queue: asyncio.Queue = asyncio.Queue()
        req_id = self.submit(queue.put_nowait, prompt, params, req_id, prompt_token_ids, cache_salt,
                             num_resumed_tokens)
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
            self._work.set()

    # ---- on the stepping thread ---------------------------------------------------------------------
    def _step_loop(self) -> None:
        """Step while there is work, handing each step's outputs to the event loop without waiting for it to
        take them: the next step starts at once, while the event loop serves the clients."""
        try:
            while True:
                with self._lock:
                    adds, self._pending_adds = self._pending_adds, []
                    aborts, self._pending_aborts = self._pending_aborts, []
                    calls, self._pending_calls = self._pending_calls, []
                    idle = not (adds or aborts or calls or self.engine.has_unfinished_requests())
                    if idle and self._stopping:
                        self._looping = False
                        return
                    if idle:
                        self._work.clear()  # under the lock: whoever queues work next sets it again
                if idle:
                    self._work.wait()
                    continue
                failed = []
                for req in adds:
                    try:
                        self.engine.add(req)
                    except ValueError as e:  # an id clash found only now: fail that stream alone
                        failed.append((req.req_id, e))
                if aborts:
                    self.engine.abort_request(aborts)
                for call in calls:
                    self._call(*call)
                outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                if outputs or failed:
                    self._loop.call_soon_threadsafe(self._deliver, outputs, failed)
        except BaseException as e:  # report to every waiting stream rather than hang them
            logger.exception("engine loop failed")
            with self._lock:
                self._looping = False
                calls, self._pending_calls = self._pending_calls, []
            for _, _, loop, future in calls:
                loop.call_soon_threadsafe(_settle, future, None, e)
            self._loop.call_soon_threadsafe(self._fail, e)

    def _call(self, fn, args, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        try:
            result, error = fn(self.engine, *args), None
        except Exception as e:
            result, error = None, e
        loop.call_soon_threadsafe(_settle, future, result, error)

    # ---- on the event loop --------------------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput], failed: list[tuple[str, ValueError]]) -> None:
        for req_id, error in failed:
            sink = self._streams.pop(req_id, None)
            if sink is not None:
                sink(error)
        for out in outputs:
            sink = self._streams.get(out.req_id)
            if sink is not None:
                if out.finished:
                    del self._streams[out.req_id]
                sink(out)

    def _fail(self, error: BaseException) -> None:
        self.dead = error
        sinks, self._streams = list(self._streams.values()), {}
        for sink in sinks:
            sink(error)

    async def run_on_engine(self, fn, *args):
        """fn(engine, *args) on the stepping thread, between two steps (the engine is only ever touched by
        that thread): KV export and import for a hand-off between engines."""
        loop = asyncio.get_running_loop()
        future = None
        with self._lock:
            if self._looping:  # between two of its steps
                future = loop.create_future()
                self._pending_calls.append((fn, args, loop, future))
                self._work.set()
        if future is not None:
            return await future
        if self._worker is None:
            self._worker = _stepping_thread()
        return await loop.run_in_executor(self._worker, fn, self.engine, *args)

    def health_report(self) -> dict:
        return {"status": "ok"} if self.dead is None else {"status": "dead", "reason": repr(self.dead)}

    def stats(self) -> dict:
        """A snapshot for metrics; read without stopping the loop (counters may be one step apart)."""
        return self.engine.stats()

    async def stop_loop(self) -> None:
        """Let the stepping loop finish what is queued and running (aborts, finished requests), then stop it;
        it restarts with the next request, delivering to whichever event loop that comes from. The stepping
        thread stays."""
        stepper = self._stepper
        if stepper is None:
            return
        with self._lock:
            self._stopping = True
            self._work.set()
        await asyncio.wrap_future(stepper)
        await asyncio.sleep(0)  # deliveries queued before the loop ended run before this returns
        self._stepper = None

    async def shutdown(self) -> None:
        """Stop the loop, close the engine (its KV tiers flush to disk) on its thread, stop that thread."""
        await self.stop_loop()
        if self._worker is not None:
            await asyncio.get_running_loop().run_in_executor(self._worker, self.engine.close)
            self._worker.shutdown(wait=False)
            self._worker = None


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _stepping_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenforge-engine")
