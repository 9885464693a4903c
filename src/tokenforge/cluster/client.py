"""`ClusterClient`: the `EngineClient` over engine replicas running as Ray actors.

The server and `LLM` use it exactly like one in-process engine. Per request it picks a replica with the
router, starts an *attempt* there (`<req_id>@<n>`), and turns the replica's output deltas into the usual
cumulative `RequestOutput`s. It keeps every token it has streamed, so an attempt can be replaced:

- **failover**: when a replica's process dies (its poll fails) or it hangs (no step finished within
  `step_deadline` while it had work, or its poll does not answer), its requests resume on another
  replica with prompt + the tokens already streamed as the new prompt and `max_tokens` reduced by as
  many; the new replica's detokenizer reads those tokens as output already sent, so the stream goes on
  with nothing repeated and nothing skipped. Ray restarts the actor; `/health` says "degraded" until it
  answers again.
- **prefill/decode hand-off** (`pd.py`): a long prompt's first attempt runs on a prefill replica; after
  its first token the prompt's KV blocks are shipped to a decode replica, and the request resumes there
  the same way, finding those blocks in its prefix cache.

One long poll per replica (`replica.py`) brings every request's new tokens, the KV events that keep the
router's index current, and the replica's load. Everything here runs on the caller's event loop; the
poll tasks start with the first request and stop with `stop_loop` (what `LLM` does after each batch).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

from tokenforge.cluster.config import DECODE, MIXED, PREFILL, ClusterConfig, init_ray
from tokenforge.cluster.messages import OutputDelta, PollResult, ReplicaInfo
from tokenforge.cluster.planner import FleetSample, Planner
from tokenforge.cluster.router import KVIndex, ReplicaView, make_router
from tokenforge.cluster.state import Lost, ReplicaState, StreamState, remaining_params
from tokenforge.config import ModelConfig
from tokenforge.engine.client import EngineDeadError
from tokenforge.engine.messages import CompletionOutput, RequestMetrics, RequestOutput
from tokenforge.kv.block_hash import prefix_keys
from tokenforge.sampling_params import SamplingParams
from tokenforge.tokenizer import TokenizerWrapper

logger = logging.getLogger(__name__)

_TTFT_WINDOW_S = 60.0


class ClusterClient:
    """An `EngineClient` over replicas. Build it with `start` (which starts or joins Ray)."""

    def __init__(self, model: str, engine_kwargs: dict, config: ClusterConfig, owns_ray: bool = False):
        self.model = model
        self.engine_kwargs = {**engine_kwargs, "num_threads": config.threads_per_replica}
        self.config = config
        # read as the replicas' engines read them (a checkpoint folder or a GGUF file)
        self.model_config = ModelConfig.from_pretrained(model, engine_kwargs.get("max_model_len"))
        self.tokenizer = TokenizerWrapper(self.model_config.path)
        self.index = KVIndex(config.kv_ttl)
        self.router = make_router(config.router, self.index)
        self.planner = Planner(config.planner) if config.planner is not None else None
        self._owns_ray = owns_ray
        self._replicas: dict[int, ReplicaState] = {}
        self._next_replica = itertools.count()
        self._streams: dict[str, StreamState] = {}
        self._attempts: dict[str, StreamState] = {}
        self._ids = itertools.count()
        self._changed: asyncio.Event | None = None  # set whenever a replica comes up
        self._planner_task: asyncio.Task | None = None
        self._ttfts: deque[tuple[float, float]] = deque(maxlen=256)
        self.counters = {"failovers": 0, "resumed_requests": 0, "pd_transfers": 0, "pd_transfer_bytes": 0,
                         "pd_transfer_seconds": 0.0, "pd_transfer_blocks": 0, "routed_prefix_blocks": 0,
                         "routed_prompt_blocks": 0, "scale_ups": 0, "scale_downs": 0}
        self._closed = False
        self._actor_class = None

    # ---- start and stop -----------------------------------------------------------------------------
    @classmethod
    def start(cls, model: str, engine_kwargs: dict, config: ClusterConfig) -> ClusterClient:
        """Start (or join) Ray, start the replicas and wait until each has loaded its engine."""
        import ray

        owns = not ray.is_initialized()
        if owns:
            init_ray(config)
        client = cls(model, engine_kwargs, config, owns_ray=owns)
        try:
            for role in config.roles():
                client._spawn(role)
            refs = {r.replica_id: r.actor.info.remote() for r in client._replicas.values()}
            infos = ray.get(list(refs.values()), timeout=config.start_timeout)
        except BaseException:
            client._kill_all()
            raise
        for replica_id, info in zip(refs, infos, strict=True):
            client._mark_up(client._replicas[replica_id], info)
        return client

    def _spawn(self, role: str) -> ReplicaState:
        from tokenforge.cluster.replica import replica_actor

        if self._actor_class is None:
            cfg = self.config
            self._actor_class = replica_actor(cfg.threads_per_replica, cfg.gpus_per_replica)
        replica = ReplicaState(next(self._next_replica), role, self._actor_class.remote(self.model, self.engine_kwargs))
        self._replicas[replica.replica_id] = replica
        return replica

    def _mark_up(self, replica: ReplicaState, info: ReplicaInfo) -> None:
        replica.info = info
        replica.state = "up"
        replica.last_progress = replica.last_resync = time.monotonic()
        replica.last_steps = -1
        replica.acked = 0
        if self._changed is not None:
            self._changed.set()

    def _kill_all(self) -> None:
        import ray

        for replica in self._replicas.values():
            ray.kill(replica.actor, no_restart=True)

    async def shutdown(self) -> None:
        import ray

        self._closed = True
        await self.stop_loop()
        refs = [r.actor.shutdown.remote() for r in self._replicas.values() if r.state == "up"]
        if refs:
            await asyncio.wait([asyncio.ensure_future(ref) for ref in refs], timeout=10)
        self._kill_all()
        self._replicas.clear()
        if self._owns_ray:
            ray.shutdown()

    async def stop_loop(self) -> None:
        """Stop the poll, revive and planner tasks (they start again with the next request, on its loop)."""
        tasks = [t for r in self._replicas.values() for t in (r.poller, r.reviver) if t is not None]
        tasks += [self._planner_task] if self._planner_task is not None else []
        loop = asyncio.get_running_loop()
        pending = {t for t in tasks if t.get_loop() is loop}  # a closed loop's tasks are gone with it
        while pending:  # cancel again until each has ended: Python 3.11's wait_for can swallow a cancel
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        for replica in self._replicas.values():
            replica.poller = replica.reviver = None
        self._planner_task = None
        self._changed = None

    def _ensure_tasks(self) -> None:
        loop = asyncio.get_running_loop()
        if self._changed is None:
            self._changed = asyncio.Event()
        for replica in list(self._replicas.values()):
            if replica.state in ("up", "draining") and (replica.poller is None or replica.poller.done()):
                replica.poller = loop.create_task(self._poll_loop(replica))
            elif replica.state in ("starting", "down") and (replica.reviver is None or replica.reviver.done()):
                replica.reviver = loop.create_task(self._revive(replica))
        if self.planner is not None and (self._planner_task is None or self._planner_task.done()):
            self._planner_task = loop.create_task(self._plan_loop())

    # ---- the EngineClient surface -------------------------------------------------------------------

    def health(self) -> str | None:
        return "the replica client has shut down" if self._closed else None

    def health_report(self) -> dict:
        replicas = [{"replica": r.replica_id, "role": r.role, "state": r.state, "restarts": r.num_restarts,
                     "pid": r.info.pid if r.info else None, "requests": len(r.attempts)}
                    for r in self._replicas.values()]
        up = sum(1 for r in self._replicas.values() if r.state == "up")
        status = "ok" if up == len(replicas) else "degraded"
        return {"status": status, "replicas_up": up, "replicas_total": len(replicas), "replicas": replicas}

    def stats(self) -> dict:
        """The replicas' counters summed (as one engine's), each replica's own, and the cluster's."""
        per = [{"replica": r.replica_id, "role": r.role, "state": r.state, **r.stats} for r in self._replicas.values()]
        total: dict = {"num_waiting": 0, "num_running": 0, "kv_blocks_total": 0, "kv_blocks_used": 0,
                       "prefix_cache_queries": 0, "prefix_cache_hits": 0, "num_preemptions": 0, "num_steps": 0}
        for stats in per:
            for key in total:
                total[key] += stats.get(key, 0)
        total["num_waiting"] += sum(1 for s in self._streams.values() if s.attempt is None)
        up = sum(1 for r in self._replicas.values() if r.state == "up")
        cluster = {**self.counters, "replicas_up": up, "replicas_total": len(self._replicas),
                   "index_resyncs": self.index.num_resyncs}
        return {**total, "time": time.time(), "replicas": per, "cluster": cluster}

    def actors(self) -> dict[int, object]:
        """Replica id -> its Ray actor handle (operations and fault drills: `set_step_delay`, `info`)."""
        return {r.replica_id: r.actor for r in self._replicas.values()}

    def replica_of(self, req_id: str) -> int | None:
        """Where the request runs now (None between attempts or when unknown)."""
        stream = self._streams.get(req_id)
        return stream.replica.replica_id if stream is not None and stream.replica is not None else None

    def abort(self, req_id: str) -> None:
        stream = self._streams.get(req_id)
        if stream is not None:
            self._detach(stream, abort=True)

    async def generate(self, prompt: str | None = None, params: SamplingParams | None = None,
                       req_id: str | None = None, prompt_token_ids: list[int] | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        if self._closed:
            raise EngineDeadError("the replica client has shut down")
        self._ensure_tasks()
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError("give either a prompt string or prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        req_id = req_id or f"req-{next(self._ids)}"
        if req_id in self._streams:
            raise ValueError(f"request id {req_id!r} is already in use")
        stream = StreamState(req_id, prompt, list(prompt_token_ids), params, cache_salt)
        self._streams[req_id] = stream
        finished = False
        try:
            await self._launch(stream)
            while True:
                out = await self._next_output(stream)
                finished = out.finished
                yield out
                if finished:
                    return
                if stream.prefilling:
                    await self._handoff(stream)
        finally:
            self._streams.pop(req_id, None)
            if not finished:
                self._detach(stream, abort=True)

    # ---- attempts -----------------------------------------------------------------------------------
    async def _next_output(self, stream: StreamState) -> RequestOutput:
        while True:
            attempt, item = await stream.queue.get()
            if attempt != stream.attempt:
                continue  # from an attempt already replaced (late outputs of a hand-off or failover)
            if isinstance(item, Lost):
                logger.warning("request %s: %s; resuming after %d tokens", stream.req_id, item.reason,
                               len(stream.token_ids))
                self.counters["resumed_requests"] += 1
                stream.attempt = stream.replica = None
                await self._launch(stream)
                continue
            if item.error is not None:  # the replica's engine failed under this request: treat as a failure
                self._fail(stream.replica, f"its engine failed: {item.error}", kill=True)
                continue
            return self._output(stream, item)

    async def _launch(self, stream: StreamState, role: str | None = None) -> None:
        """Start the stream's next attempt: the first, or a resume after the tokens already streamed."""
        n = len(stream.token_ids)
        params = remaining_params(stream.params, n)
        if params is None:  # every token was out when the replica failed; only the ending was lost
            stream.attempt = f"{stream.req_id}@done"
            stream.queue.put_nowait((stream.attempt, OutputDelta(stream.attempt, [], "", finish_reason="length")))
            return
        ids = stream.prompt_token_ids + stream.token_ids
        if role is None:
            pd = self.config.pd
            role = PREFILL if pd is not None and n == 0 and pd.disaggregate(len(ids)) else (
                DECODE if pd is not None else MIXED)
        stream.prefilling = role == PREFILL
        replica, stream.shared_blocks = await self._choose(role, ids, stream.cache_salt)
        stream.num_attempts += 1
        attempt = f"{stream.req_id}@{stream.num_attempts}"
        stream.attempt, stream.replica = attempt, replica
        self._attempts[attempt] = stream
        replica.attempts.add(attempt)
        try:
            refused = await asyncio.wait_for(replica.actor.add.remote(attempt, ids, params, stream.cache_salt, n),
                                             self.config.step_deadline)
        except Exception as e:  # the replica died (or hangs) between the choice and the call: resume elsewhere
            self._fail(replica, f"starting a request failed: {e!r}", kill=isinstance(e, asyncio.TimeoutError))
            return
        if refused is not None:
            self._forget(attempt)
            stream.attempt = stream.replica = None
            raise ValueError(refused)

    async def _choose(self, role: str, ids: list[int], cache_salt: str | None) -> tuple[ReplicaState, int]:
        """A replica for this prompt, and how many of its blocks that replica is expected to hold."""
        deadline = time.monotonic() + self.config.failover_timeout
        while True:
            candidates = [r for r in self._replicas.values() if r.takes(role)]
            if candidates:
                break
            if time.monotonic() > deadline:
                raise EngineDeadError(f"no {role} replica came up within {self.config.failover_timeout:g} s")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        info = candidates[0].info
        keys = prefix_keys(info.namespace, ids, info.block_size, (len(ids) - 1) // info.block_size, cache_salt)
        views = [ReplicaView(r.replica_id, len(r.attempts), self._active_blocks(r)) for r in candidates]
        now = time.monotonic()
        overlaps = {r.replica_id: self.index.overlap(r.replica_id, keys, now) for r in candidates}
        chosen = self._replicas[self.router.choose(views, keys, now)]
        self.counters["routed_prompt_blocks"] += len(keys)
        self.counters["routed_prefix_blocks"] += overlaps[chosen.replica_id]
        return chosen, overlaps[chosen.replica_id]

    def _active_blocks(self, replica: ReplicaState) -> int:
        """KV blocks the replica's requests hold, a shared cached prefix counted once (as the pool does)."""
        bs = replica.info.block_size
        streams = (self._attempts.get(a) for a in replica.attempts)
        return sum(-(-(len(s.prompt_token_ids) + len(s.token_ids)) // bs) - s.shared_blocks
                   for s in streams if s is not None)

    async def _handoff(self, stream: StreamState) -> None:
        """After the prefill replica's first output: ship the prompt's KV to a decode replica, resume there."""
        prefill, attempt = stream.replica, stream.attempt
        self._forget(attempt)
        stream.attempt = stream.replica = None
        stream.prefilling = False
        decode, _ = await self._choose(DECODE, stream.prompt_token_ids + stream.token_ids, stream.cache_salt)
        try:
            handle = await asyncio.wait_for(prefill.actor.export_prefix.remote(
                attempt, stream.prompt_token_ids, stream.cache_salt), self.config.step_deadline)
            num_blocks, receive_s = await asyncio.wait_for(decode.actor.import_prefix.remote(handle),
                                                           self.config.step_deadline)
        except Exception as e:  # either side failed: the decode replica recomputes the prompt instead
            logger.warning("request %s: KV hand-off failed (%r); the decode replica recomputes the prompt",
                           stream.req_id, e)
        else:
            self.counters["pd_transfers"] += 1
            self.counters["pd_transfer_bytes"] += handle.nbytes
            self.counters["pd_transfer_blocks"] += num_blocks
            self.counters["pd_transfer_seconds"] += handle.send_seconds + receive_s
        await self._launch(stream, DECODE)

    def _forget(self, attempt: str | None) -> None:
        stream = self._attempts.pop(attempt, None) if attempt is not None else None
        if stream is not None and stream.replica is not None:
            stream.replica.attempts.discard(attempt)

    def _detach(self, stream: StreamState, abort: bool) -> None:
        attempt, replica = stream.attempt, stream.replica
        self._forget(attempt)
        stream.attempt = stream.replica = None
        if abort and replica is not None and replica.state in ("up", "draining"):
            replica.actor.abort.remote([attempt])

    def _output(self, stream: StreamState, delta: OutputDelta) -> RequestOutput:
        now = time.monotonic()
        if stream.first_token_time is None and delta.new_token_ids:
            stream.first_token_time = now
            self._ttfts.append((now, now - stream.arrival))
            stream.num_cached_tokens = delta.num_cached_tokens
        stream.token_ids += delta.new_token_ids
        stream.text += delta.new_text
        if stream.logprobs is not None and delta.new_logprobs:
            stream.logprobs += delta.new_logprobs
        finished = delta.finish_reason is not None
        if finished:
            self._forget(stream.attempt)
        completion = CompletionOutput(
            0, stream.text, list(stream.token_ids), delta.new_text, list(delta.new_token_ids),
            None if stream.logprobs is None else list(stream.logprobs), delta.finish_reason,
            delta.stop_reason if finished else None)
        metrics = RequestMetrics(stream.arrival, stream.first_token_time, now if finished else None,
                                 stream.num_cached_tokens, 0)
        return RequestOutput(stream.req_id, stream.prompt, tuple(stream.prompt_token_ids), [completion], finished,
                             metrics)

    # ---- replicas: polls, failures, restarts --------------------------------------------------------
    async def _poll_loop(self, replica: ReplicaState) -> None:
        cfg = self.config
        # progress is judged from this loop's own polls: a replica idle while no loop ran has not stalled
        replica.last_steps, replica.last_progress = -1, time.monotonic()
        while replica.state in ("up", "draining"):
            _raise_if_cancelling()
            try:
                result: PollResult = await asyncio.wait_for(replica.actor.poll.remote(replica.acked, cfg.poll_timeout),
                                                            cfg.poll_timeout + cfg.step_deadline)
            except asyncio.TimeoutError:
                self._fail(replica, f"its poll did not answer within {cfg.step_deadline:g} s", kill=True)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._fail(replica, f"its process failed ({type(e).__name__})", kill=False)
                return
            in_sync = self._take(replica, result)
            if self._hung(replica, result):
                self._fail(replica, f"no step finished within {cfg.step_deadline:g} s", kill=True)
                return
            if replica.state == "draining" and not replica.attempts:
                self._remove(replica)
                return
            if not in_sync or time.monotonic() - replica.last_resync > cfg.resync_interval:
                await self._resync(replica)

    def _take(self, replica: ReplicaState, result: PollResult) -> bool:
        """Hand the new batches' outputs to their streams and their events to the index; False when the
        index lost track of this replica's events (it needs a resync)."""
        replica.stats = result.load.stats
        in_sync = True
        for batch in result.batches:
            if batch.seq <= replica.acked:
                continue  # sent again because our acknowledgement had not arrived yet
            replica.acked = batch.seq
            for delta in batch.outputs:
                stream = self._attempts.get(delta.req_id)
                if stream is not None:
                    stream.queue.put_nowait((delta.req_id, delta))
            in_sync = self.index.apply(replica.replica_id, batch.events) and in_sync
        return in_sync

    def _hung(self, replica: ReplicaState, result: PollResult) -> bool:
        now, load = time.monotonic(), result.load
        if load.num_steps != replica.last_steps or not (load.num_running or load.num_waiting):
            replica.last_steps, replica.last_progress = load.num_steps, now
            return False
        return now - replica.last_progress > self.config.step_deadline

    async def _resync(self, replica: ReplicaState) -> None:
        replica.last_resync = time.monotonic()
        try:
            next_seq, keys = await asyncio.wait_for(replica.actor.cached_keys.remote(), self.config.step_deadline)
        except Exception:  # the next poll finds out what is wrong with the replica
            return
        self.index.resync(replica.replica_id, next_seq, keys)

    def _fail(self, replica: ReplicaState | None, reason: str, kill: bool) -> None:
        """Take a replica out of service, resume its requests elsewhere, and wait for Ray to restart it."""
        if replica is None or replica.state not in ("up", "draining"):
            return
        import ray

        logger.warning("replica %d: %s; its %d requests resume elsewhere", replica.replica_id, reason,
                       len(replica.attempts))
        replica.state = "down"
        self.counters["failovers"] += 1
        self.index.drop(replica.replica_id)
        for attempt in list(replica.attempts):
            stream = self._attempts.pop(attempt, None)
            if stream is not None:
                stream.queue.put_nowait((attempt, Lost(f"replica {replica.replica_id} failed: {reason}")))
        replica.attempts.clear()
        replica.stats = {}
        if kill:  # a hung process: Ray kills it and starts a new one (max_restarts)
            replica.killed_pid = replica.info.pid if replica.info is not None else None
            ray.kill(replica.actor, no_restart=False)
        if not self._closed:
            replica.reviver = asyncio.get_running_loop().create_task(self._revive(replica))

    async def _revive(self, replica: ReplicaState) -> None:
        """Wait until the replica (new, or restarted by Ray) answers, then serve with it again."""
        import ray

        old_pid = replica.info.pid if replica.info is not None else None
        while True:
            _raise_if_cancelling()
            if self._closed or not ray.is_initialized():
                return  # shut down: a call on the actor now would start a new local Ray instance
            try:
                info = await asyncio.wait_for(replica.actor.info.remote(), 10.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.5)
                continue
            if info.pid == replica.killed_pid:
                await asyncio.sleep(0.5)  # the killed process still answers: wait for Ray's new one
                continue
            break
        if old_pid is not None and info.pid != old_pid:
            replica.num_restarts += 1
        replica.killed_pid = None
        self._mark_up(replica, info)
        self.index.drop(replica.replica_id)
        replica.poller = asyncio.get_running_loop().create_task(self._poll_loop(replica))

    # ---- the planner --------------------------------------------------------------------------------
    async def _plan_loop(self) -> None:
        while True:
            _raise_if_cancelling()
            await asyncio.sleep(self.planner.config.interval)
            delta = self.planner.decide(self.fleet_sample(), time.monotonic())
            if delta > 0:
                self.add_replica()
            elif delta < 0:
                self.drain_replica()

    def add_replica(self) -> int:
        """Start one more mixed replica (it serves once its engine is loaded); returns its id. Call from the
        event loop that runs the client's tasks."""
        replica = self._spawn(MIXED)
        self.counters["scale_ups"] += 1
        self._ensure_tasks()
        return replica.replica_id

    def drain_replica(self) -> int | None:
        """Stop routing to the least busy replica; it is removed once its requests are done. Returns its id
        (None when only one replica serves)."""
        up = [r for r in self._replicas.values() if r.state == "up"]
        if len(up) <= 1:
            return None
        victim = min(up, key=lambda r: (len(r.attempts), -r.replica_id))
        victim.state = "draining"
        self.counters["scale_downs"] += 1
        if victim.poller is None or victim.poller.done():
            self._remove(victim)
        return victim.replica_id

    def fleet_sample(self) -> FleetSample:
        now = time.monotonic()
        recent = sorted(t for when, t in self._ttfts if now - when < _TTFT_WINDOW_S)
        serving = [r for r in self._replicas.values() if r.state in ("up", "starting", "down")]
        waiting = sum(r.stats.get("num_waiting", 0) for r in serving)
        waiting += sum(1 for s in self._streams.values() if s.attempt is None)
        return FleetSample(len(serving), waiting, recent[len(recent) // 2] if recent else None)

    def _remove(self, replica: ReplicaState) -> None:
        import ray

        self.index.drop(replica.replica_id)
        self._replicas.pop(replica.replica_id, None)
        replica.state = "removed"
        ray.kill(replica.actor, no_restart=True)


def _raise_if_cancelling() -> None:
    """End a loop whose cancellation was swallowed (3.11's `wait_for` returns a result that arrived with the
    cancel); the task still counts the request."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
