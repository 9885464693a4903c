"""Continuous batching: which requests run this step and how many tokens each, under a token budget.

Running requests go first (decodes and unfinished prompt chunks), then waiting ones join while budget,
sequence slots and KV blocks last. A long prompt is cut into chunks ("segment prefill") so it never
stalls the decodes beside it. When the pool runs dry, the newest running request is preempted: its
blocks are freed and it is recomputed later (its cached prefix usually survives). No tensors here.
"""

from __future__ import annotations

import time
from collections import deque

from tokenforge.config import SchedulerConfig
from tokenforge.engine.messages import RunnerOutput, ScheduledRequest, SchedulerOutput
from tokenforge.kv import KVCacheManager
from tokenforge.request import Request, RequestStatus
from tokenforge.spec import SpecDecoder


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 spec: SpecDecoder | None = None):
        self.config = config
        self.spec = spec  # records each verified draft (acceptance counters, adaptive lengths)
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add_request(self, req: Request) -> None:
        self.requests[req.req_id] = req
        self.waiting.append(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            draft = self._fit_draft(req, budget)
            if draft:
                num_new += len(draft)
            elif not self._make_room(req, num_new, out):
                break  # req itself was preempted; everything after it already was
            out.requests.append(self._entry(req, num_new, draft,
                                            req.draft_parents[:len(draft)] if draft and req.draft_parents else None))
            budget -= num_new
            i += 1
        if not out.preempted_req_ids:
            budget = self._admit_waiting(budget, out)
        return out

    def _fit_draft(self, req: Request, budget: int) -> list[int]:
        """The part of req's draft this step can verify: within the token budget and the free blocks.
        A draft never preempts another request; without room it is dropped."""
        draft = req.draft_token_ids[:budget - 1] if req.num_computed_tokens == req.num_tokens - 1 else []
        if draft and not self.kv.allocate_slots(req, 1 + len(draft)):
            draft = []
        return draft

    def _make_room(self, req: Request, num_new: int, out: SchedulerOutput) -> bool:
        while not self.kv.allocate_slots(req, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted_req_ids.append(victim.req_id)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        if self.spec is not None:
            self.spec.forget(req)
        req.num_computed_tokens = 0
        req.draft_token_ids = []
        req.draft_parents = None
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            cached_blocks, num_cached = self.kv.find_cached_prefix(req)
            num_new = min(req.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(req, num_new, cached_blocks):
                if not self.running:
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
            out.requests.append(self._entry(req, num_new))
            budget -= num_new
        return budget

    def _entry(self, req: Request, num_new: int, draft: list[int] | None = None,
               parents: list[int] | None = None) -> ScheduledRequest:
        draft = draft or []
        return ScheduledRequest(
            req_id=req.req_id, num_computed_tokens=req.num_computed_tokens, num_new_tokens=num_new,
            all_token_ids=req.all_token_ids, block_table=self.kv.block_tables[req.req_id],
            sample=req.num_computed_tokens + num_new - len(draft) == req.num_tokens, params=req.params,
            generator=req.generator, prompt_token_ids=req.prompt_token_ids,
            output_token_ids=req.output_token_ids, draft_token_ids=draft,
            draft_parents=parents)

    def update_from_output(self, sched: SchedulerOutput, result: RunnerOutput) -> list[tuple[Request, int]]:
        """Advance progress, append sampled tokens, finish what hit a token-level stop.

        A verified draft yields its accepted tokens plus the target's next one; the cache keeps only the
        accepted ones (the rejected tail is overwritten later). Tokens after a stop are dropped, exactly
        as if they had come one step at a time. Returns (request, tokens appended) for every request that
        received tokens this step, finished ones included.
        """
        updated = []
        now = time.monotonic()
        for entry in sched.requests:
            req = self.requests[entry.req_id]
            tokens = result.sampled.get(entry.req_id)
            num_drafted = len(entry.draft_token_ids)
            num_accepted = len(tokens) - 1 if tokens else 0
            req.num_computed_tokens += entry.num_new_tokens - num_drafted + num_accepted
            if self.spec is not None:
                self.spec.record(req, num_drafted, num_accepted)
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
            updated.append((req, appended))
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
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        if self.spec is not None:
            self.spec.forget(req)
        req.status = status
        req.finish_time = time.monotonic()
        del self.requests[req.req_id]
