"""Continuous batching: which requests run this step and how many tokens each, under a token budget.

Running requests go first (decodes and unfinished prompt chunks), then waiting ones join while budget,
sequence slots and KV blocks last. A long prompt is cut into chunks ("segment prefill") so it never
stalls the decodes beside it. When the pool runs dry, the newest running request is preempted: its
blocks are freed and it is recomputed later (its cached prefix usually survives). No tensors here.

What the runner learns comes only from the `SchedulerOutput`: a request's data once, then per-step
changes (see `engine/messages.py`). With speculative decoding the scheduler asks the runner for drafts
for the requests that will be decoding after this step, keeps what comes back, and sends the part it has
budget and blocks for to be verified in the next step.

With KV tiers (`kv/tiers.py`), admission also looks below L1: blocks worth loading from host memory or
disk are loaded asynchronously while the request waits in its own state (`WAITING_FOR_KV`, in `loading`)
holding its blocks, and every other request keeps stepping. When the runner reports the load done, the
request joins the running set with the loaded tokens computed; a block that failed to load (missing,
corrupt, foreign) and everything after it is recomputed. A request aborted mid-load gives its blocks back
only once the load has finished writing into them.
"""

from __future__ import annotations

import time
from collections import deque

from tokenforge.config import SchedulerConfig
from tokenforge.engine.messages import (
    Draft,
    KVLoadDone,
    NewRequestData,
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from tokenforge.kv import KVCacheManager
from tokenforge.request import Request, RequestStatus
from tokenforge.spec import SpecDecoder


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 spec: SpecDecoder | None = None):
        self.config = config
        self.spec = spec  # the drafting policy: lengths, pauses, acceptance counters
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._drafts: dict[str, Draft] = {}  # the runner's proposals for each request's next step
        self._finished_ids: list[str] = []  # ended since the last step; the runner drops them next step
        self.loading: dict[str, Request] = {}  # waiting for their KV blocks to load from a lower tier
        self._load_jobs: dict[int, tuple[str, list[int]]] = {}  # load job -> its request and target blocks
        self._orphan_loads: dict[int, list[int]] = {}  # load job of an aborted request -> blocks to release

    def add_request(self, req: Request) -> None:
        self.requests[req.req_id] = req
        self.waiting.append(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.loading or self._orphan_loads)

    def has_finished_requests(self) -> bool:
        """Requests ended since the last step, which the runner has yet to hear about."""
        return bool(self._finished_ids)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_loading(self) -> int:
        return len(self.loading)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens
        scheduled: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            draft = self._fit_draft(req, budget)
            if draft is not None:
                num_new += len(draft.token_ids)
            elif not self._make_room(req, num_new, out):
                break  # req itself was preempted; everything after it already was
            out.requests.append(self._entry(req, num_new, draft, out))
            scheduled.append(req)
            budget -= num_new
            i += 1
        if not out.preempted_req_ids:
            self._admit_waiting(budget, out, scheduled)
        if self.spec is not None:
            self._ask_for_drafts(out, scheduled)
        for entry, req in zip(out.requests, scheduled, strict=True):  # blocks added by any of the above
            table = self.kv.block_tables[req.req_id]
            entry.new_block_ids = table[req.num_synced_blocks:]
            req.num_synced_blocks = len(table)
        if self.kv.tiers is not None:
            self.kv.tiers.take(out)
            out.kv_wait = not out.requests and bool(self._load_jobs or self._orphan_loads)
        return out

    def _fit_draft(self, req: Request, budget: int) -> Draft | None:
        """The part of req's draft this step can verify: within the token budget, the request's room and the
        free blocks. A draft never preempts another request; without room it is dropped."""
        draft = self._drafts.pop(req.req_id, None)
        if draft is None or req.num_computed_tokens != req.num_tokens - 1:
            return None
        tokens = draft.token_ids[:min(budget - 1, self.spec.room(req))]
        if not tokens or not self.kv.allocate_slots(req, 1 + len(tokens)):
            return None
        return Draft(tokens, draft.parents[:len(tokens)] if draft.parents else None)

    def _make_room(self, req: Request, num_new: int, out: SchedulerOutput) -> bool:
        while not self.kv.allocate_slots(req, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            if victim.num_synced_tokens:  # not a request just back from a KV load that the runner never saw
                out.preempted_req_ids.append(victim.req_id)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        self._drafts.pop(req.req_id, None)
        req.num_computed_tokens = 0
        req.num_synced_blocks = 0  # the runner empties its table too
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _admit_waiting(self, budget: int, out: SchedulerOutput, scheduled: list[Request]) -> None:
        while self.waiting and budget > 0 and len(self.running) + len(self.loading) < self.config.max_num_seqs:
            req = self.waiting[0]
            cached_blocks, num_cached = self.kv.find_cached_prefix(req)
            plan = self.kv.plan_load(req, len(cached_blocks), first=req.status == RequestStatus.WAITING)
            if plan:
                if not self._start_load(req, cached_blocks, plan):
                    break
                continue
            num_new = min(req.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(req, num_new, cached_blocks):
                if not (self.running or self.loading or self._orphan_loads):  # nothing will free a block
                    raise RuntimeError(
                        f"request {req.req_id} needs more KV blocks than the whole pool has "
                        f"({self.kv.pool.num_blocks}); raise kv_cache_memory")
                break
            self.waiting.popleft()
            if req.status == RequestStatus.WAITING:
                self.kv.record_prefix_lookup(req.num_prompt_tokens, num_cached)
                req.num_cached_tokens = num_cached
            req.num_computed_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.requests.append(self._entry(req, num_new, None, out))
            scheduled.append(req)
            budget -= num_new

    def _start_load(self, req: Request, cached_blocks: list[int], plan: list) -> bool:
        """Hold the cached blocks and blocks for the load; the request waits in `loading` until it is done."""
        self.kv.tiers.pin(plan)  # taking blocks may evict to L2, and L2 must not evict what we are to load
        blocks = self.kv.allocate_for_load(req, cached_blocks, len(plan))
        if blocks is None:
            self.kv.tiers.pin(plan, False)
            return False
        self.waiting.popleft()
        num_cached = len(cached_blocks) * self.kv.block_size
        if req.status == RequestStatus.WAITING:
            self.kv.record_prefix_lookup(req.num_prompt_tokens, num_cached)
            req.num_cached_tokens = num_cached
        req.num_computed_tokens = num_cached
        req.status = RequestStatus.WAITING_FOR_KV
        self.loading[req.req_id] = req
        self._load_jobs[self.kv.tiers.start_load(blocks, plan)] = (req.req_id, blocks)
        return True

    def _loads_done(self, done: list[KVLoadDone]) -> None:
        """Resume each request whose load finished: the leading loaded blocks count as computed."""
        for result in done:
            orphan = self._orphan_loads.pop(result.job_id, None)
            if orphan is not None:
                self.kv.release_blocks(orphan)
                continue
            req_id, blocks = self._load_jobs.pop(result.job_id)
            req = self.loading.pop(req_id)
            num_loaded = min(result.failed, default=len(blocks))
            self.kv.finish_load(req, num_loaded)
            req.num_computed_tokens += num_loaded * self.kv.block_size
            if req.num_preemptions == 0:  # the first admission: these tokens were served by the cache
                self.kv.prefix_hits += num_loaded * self.kv.block_size
                req.num_cached_tokens += num_loaded * self.kv.block_size
            req.status = RequestStatus.RUNNING
            self.running.append(req)

    def _entry(self, req: Request, num_new: int, draft: Draft | None, out: SchedulerOutput) -> ScheduledRequest:
        if req.num_synced_tokens == 0:  # the runner has not seen this request yet
            out.new_requests.append(NewRequestData(req.req_id, list(req.prompt_token_ids), req.params,
                                                   req.num_resumed_tokens))
            req.num_synced_tokens = req.num_prompt_tokens
        new_tokens = req.all_token_ids[req.num_synced_tokens:]
        req.num_synced_tokens = req.num_tokens
        return ScheduledRequest(
            req.req_id, req.num_computed_tokens, num_new, new_token_ids=new_tokens,
            draft_token_ids=draft.token_ids if draft else [], draft_parents=draft.parents if draft else None)

    def _ask_for_drafts(self, out: SchedulerOutput, scheduled: list[Request]) -> None:
        """Ask for drafts for every request this step brings to the end of its known tokens."""
        decoding = [(e, r) for e, r in zip(out.requests, scheduled, strict=True)
                    if r.num_computed_tokens + e.num_new_tokens - len(e.draft_token_ids) == r.num_tokens]
        ks = self.spec.lookaheads([r for _, r in decoding], len(self.running) + len(self.waiting))
        for entry, req in decoding:
            k = ks.get(req.req_id, 0)
            if k and self.spec.needs_slots and not self._reserve_draft_slots(req, entry.num_new_tokens + k):
                k = 0
            entry.num_lookahead = k

    def _reserve_draft_slots(self, req: Request, num_tokens: int) -> bool:
        """Blocks for a draft written into the target's own cache, unless they would leave fewer free blocks
        than running requests (each may need one next step: drafts must not cause preemptions)."""
        table = self.kv.block_tables[req.req_id]
        need = -(-(req.num_computed_tokens + num_tokens) // self.kv.block_size) - len(table)
        if need > 0 and self.kv.num_free_blocks - need < len(self.running):
            return False
        return self.kv.allocate_slots(req, num_tokens)

    def update_from_output(self, sched: SchedulerOutput, result: RunnerOutput) -> list[tuple[Request, int]]:
        """Advance progress, append sampled tokens, finish what hit a token-level stop, keep new drafts.

        A verified draft yields its accepted tokens plus the target's next one; the cache keeps only the
        accepted ones (the rejected tail is overwritten later). Tokens after a stop are dropped, exactly
        as if they had come one step at a time. Returns (request, tokens appended) for every request that
        received tokens this step, finished ones included.
        """
        if self.kv.tiers is not None:
            self._loads_done(self.kv.tiers.on_output(sched, result))
        updated = []
        now = time.monotonic()
        for entry in sched.requests:
            req = self.requests[entry.req_id]
            tokens = result.sampled.get(entry.req_id)
            num_drafted = len(entry.draft_token_ids)
            num_accepted = len(tokens) - 1 if tokens else 0
            req.num_computed_tokens += entry.num_new_tokens - num_drafted + num_accepted
            if self.spec is not None:
                self.spec.record(req.req_id, num_drafted, num_accepted)
            if not tokens:
                continue
            if req.first_token_time is None:
                req.first_token_time = now
            appended = 0
            for token in tokens:
                req.append_output(token)
                appended += 1
                status = req.check_stop(self.max_model_len)
                if status is not None:
                    self._finish(req, status)
                    break
            if not req.status.finished and entry.req_id in result.terminated:  # its grammar is complete
                self._finish(req, RequestStatus.FINISHED_STOPPED)
            updated.append((req, appended))
            draft = result.drafts.get(entry.req_id)
            if draft is not None and not req.status.finished:
                self.spec.on_draft(req.req_id, len(draft.token_ids))
                if draft.token_ids:
                    self._drafts[req.req_id] = draft
        return updated

    def finish_requests(self, req_ids, status: RequestStatus) -> list[Request]:
        """End requests from outside the step (abort, stop string); unknown or finished ids are ignored."""
        done = []
        for req_id in [req_ids] if isinstance(req_ids, str) else req_ids:
            req = self.requests.get(req_id)
            if req is None or req.status.finished:
                continue
            self._finish(req, status)
            done.append(req)
        return done

    def _finish(self, req: Request, status: RequestStatus) -> None:
        hold: frozenset[int] = frozenset()
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        elif req.req_id in self.loading:  # the load still writes into its blocks: release them when it is done
            del self.loading[req.req_id]
            job_id = next(j for j, (r, _) in self._load_jobs.items() if r == req.req_id)
            hold = frozenset(self._load_jobs.pop(job_id)[1])
            self._orphan_loads[job_id] = list(hold)
        self.kv.free(req, hold)
        self._drafts.pop(req.req_id, None)
        if self.spec is not None:
            self.spec.forget(req.req_id)
        if req.num_synced_tokens:  # the runner holds a copy to drop
            self._finished_ids.append(req.req_id)
        req.status = status
        req.finish_time = time.monotonic()
        del self.requests[req.req_id]
