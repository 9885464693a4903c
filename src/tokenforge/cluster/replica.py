"""One engine replica as a Ray actor: an `AsyncLLMEngine` in its own process, its outputs batched per poll.

Streaming one Ray object per token per request would cost a round trip each; instead the client keeps
one long poll open per replica (`poll`), which returns, as soon as anything is ready, every request's
new tokens since the last poll plus the prefix cache's KV events and the replica's load. One call
carries a whole engine step for all of the replica's requests, so Ray's cost per token is a fraction
of a call.

The actor is asynchronous (Ray runs its methods on one event loop); the engine steps on its own thread
as in the server, so `add`, `abort` and `poll` are answered while a step runs. Each step's outputs go from
the engine's hand-over straight into the outbox (`AsyncLLMEngine.submit`), with no stream or task per
request: on one core shared with the stepping thread, every task switch per token is taken from the model.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time

from tokenforge.attention.torch_ref import preload
from tokenforge.cluster.messages import Batch, KVEvents, OutputDelta, PollResult, ReplicaInfo, ReplicaLoad
from tokenforge.cluster.pd import TRANSPORTS, KVHandle
from tokenforge.engine.async_engine import AsyncLLMEngine
from tokenforge.engine.messages import RequestOutput
from tokenforge.kv.block_hash import BlockKey
from tokenforge.sampling_params import SamplingParams


class EngineReplica:
    """The actor's class (wrapped by `ray.remote` in `replica_actor`); usable in-process for tests too."""

    def __init__(self, model: str, engine_kwargs: dict, transport: str = "ray"):
        self.engine = AsyncLLMEngine.from_args(model, **engine_kwargs)
        # the lower-right causal mask's module (torch._dynamo, ~2 s of imports) loads before the replica serves,
        # not in the first prefill after a cached prefix, where it would hold up every request of that step;
        # and not while the engine loads either: its matmul plans are timed then, and the import's CPU and
        # memory traffic made them hand 16-row batches to oneDNN (q/k/v: panel up to 8 rows, not 48; the
        # compiled decode loop capped at 8 rows; decode steps of 12+ rows 21.1 vs 12.7 ms in the plain server)
        preload().join()
        self.transport = TRANSPORTS[transport]()
        pool = self.engine.engine.kv.pool
        pool.on_store = self._stored
        pool.on_evict = self._evicted
        self._events_lock = threading.Lock()  # the hooks run on the stepping thread, polls on the event loop
        self._stored_keys: list[BlockKey] = []
        self._evicted_keys: list[BlockKey] = []
        self._seq = 0
        self._outbox: list[OutputDelta] = []
        self._unacked: list[Batch] = []
        self._ready: asyncio.Event | None = None
        self._live: set[str] = set()  # requests started and not finished or aborted
        self._step_delay = 0.0

    # ---- hooks (stepping thread) ----------------------------------------------------------------------
    def _stored(self, _block_id: int, key: BlockKey) -> None:
        with self._events_lock:
            self._stored_keys.append(key)

    def _evicted(self, _block_id: int, key: BlockKey) -> None:
        with self._events_lock:
            self._evicted_keys.append(key)

    # ---- requests -----------------------------------------------------------------------------------
    async def info(self) -> ReplicaInfo:
        import ray

        llm = self.engine.engine
        return ReplicaInfo(llm.kv.namespace, llm.kv.block_size, llm.num_blocks,
                           llm.runner.kv_cache.bytes_per_block, llm.model_config.max_model_len, os.getpid(),
                           ray.get_runtime_context().get_node_id())

    async def add(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                  cache_salt: str | None = None, num_resumed_tokens: int = 0) -> str | None:
        """Start a request; returns None, or why it was refused (the engine's ValueError message)."""
        try:  # checked here so a refusal is the answer to this call, not a later output
            self.engine.engine.make_request(req_id, None, params, prompt_token_ids, cache_salt=cache_salt,
                                            num_resumed_tokens=num_resumed_tokens)
        except ValueError as e:
            return str(e)
        if req_id in self._live:
            return f"request id {req_id!r} is already in use on this replica"
        self.engine.submit(functools.partial(self._on_output, req_id), params=params, req_id=req_id,
                           prompt_token_ids=prompt_token_ids, cache_salt=cache_salt,
                           num_resumed_tokens=num_resumed_tokens)
        self._live.add(req_id)
        return None

    def _on_output(self, req_id: str, out: RequestOutput | BaseException) -> None:
        """The engine's sink for one request (on the event loop): its delta goes straight to the outbox."""
        if isinstance(out, BaseException):  # refused late, or the engine loop died
            self._live.discard(req_id)
            self._push(OutputDelta(req_id, [], "", finish_reason="abort", error=str(out)))
            return
        if out.finished:
            self._live.discard(req_id)
        self._push(_delta(out))

    def _push(self, delta: OutputDelta) -> None:
        self._outbox.append(delta)
        self._wakeup().set()

    def _wakeup(self) -> asyncio.Event:
        if self._ready is None:
            self._ready = asyncio.Event()
        return self._ready

    async def abort(self, req_ids: list[str]) -> None:
        """Abort the requests in the engine (their KV blocks are freed); they send nothing more."""
        for req_id in req_ids:
            if req_id in self._live:
                self._live.discard(req_id)
                self.engine.abort(req_id)

    async def poll(self, acked: int, timeout: float) -> PollResult:
        """Every batch after `acked` (the last one the client has processed), with a new batch of everything
        new since the last poll, as soon as there is any, or after `timeout` seconds."""
        self._unacked = [b for b in self._unacked if b.seq > acked]
        ready = self._wakeup()
        if not self._outbox and not self._unacked:
            try:
                await asyncio.wait_for(ready.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        ready.clear()
        outputs, self._outbox = self._outbox, []
        events = self._events()
        self._unacked.append(Batch(events.seq, outputs, events))
        return PollResult(list(self._unacked), self._load())

    def _events(self) -> KVEvents:
        with self._events_lock:
            stored, self._stored_keys = self._stored_keys, []
            evicted, self._evicted_keys = self._evicted_keys, []
            self._seq += 1
            return KVEvents(self._seq, stored, evicted)

    def _load(self) -> ReplicaLoad:
        stats = self.engine.stats()
        return ReplicaLoad(stats["num_waiting"], stats["num_running"], stats["kv_blocks_used"],
                           stats["kv_blocks_total"], stats["num_steps"], stats)

    async def cached_keys(self) -> tuple[int, list[BlockKey]]:
        """Every key in the prefix cache now, and the number of the first event batch after that snapshot
        (a router's resync: earlier batches are covered by the snapshot)."""

        def snapshot(engine):  # on the stepping thread, so no step (and no hook) runs meanwhile
            with self._events_lock:
                self._stored_keys, self._evicted_keys = [], []
                return self._seq + 1, engine.kv.pool.cached_keys()

        return await self.engine.run_on_engine(snapshot)

    # ---- prefill/decode hand-off ----------------------------------------------------------------------
    async def export_prefix(self, req_id: str, prompt_token_ids: list[int], cache_salt: str | None) -> KVHandle:
        """Stop the request (its first token is out) and ship the K/V of its prompt's full blocks."""
        await self.abort([req_id])

        def export(engine):
            keys, data = engine.export_prefix(engine.prefix_keys(prompt_token_ids, cache_salt))
            return self.transport.send(keys, data)

        return await self.engine.run_on_engine(export)

    async def import_prefix(self, handle: KVHandle) -> tuple[int, float]:
        """Take shipped blocks into the prefix cache; returns (blocks now cached, seconds to fetch and write)."""
        started = time.perf_counter()
        data = self.transport.receive(handle)
        num = await self.engine.run_on_engine(lambda engine: engine.import_prefix(handle.keys, data))
        return num, time.perf_counter() - started

    # ---- operations ---------------------------------------------------------------------------------
    async def stats(self) -> dict:
        """The engine's counters now (a poll carries them too; this one takes nothing from the outbox)."""
        return self.engine.stats()

    async def set_step_delay(self, seconds: float) -> None:
        """Fault drills: every engine step first sleeps this long (longer than the client's step deadline
        reads as a hung replica). 0 restores normal steps."""
        llm = self.engine.engine
        if "step" not in vars(llm):  # wrap once; the wrapper reads the current delay
            plain_step = llm.step

            def delayed_step():
                if self._step_delay:
                    time.sleep(self._step_delay)
                return plain_step()

            llm.step = delayed_step
        self._step_delay = seconds

    async def shutdown(self) -> None:
        await self.abort(list(self._live))
        await self.engine.shutdown()


def _delta(out: RequestOutput) -> OutputDelta:
    completion = out.outputs[0]
    new = completion.new_token_ids
    logprobs = completion.logprobs[len(completion.logprobs) - len(new):] if completion.logprobs is not None else None
    return OutputDelta(out.req_id, list(new), completion.new_text, logprobs, completion.finish_reason,
                       completion.stop_reason, out.metrics.num_cached_tokens)


def replica_actor(num_cpus: float, num_gpus: float = 0, max_restarts: int = -1):
    """The Ray actor class with its resources: restarted by Ray when its process dies (the client resumes
    its requests elsewhere meanwhile); calls are never retried, since the client decides what to redo."""
    import ray

    return ray.remote(EngineReplica).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                             max_task_retries=0, max_concurrency=1000)
