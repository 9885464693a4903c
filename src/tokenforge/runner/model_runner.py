"""Runs one scheduled step: updates its copy of each request from the scheduler's message, lays out the
batch, runs the model, samples or verifies drafts, and drafts for the next step where asked.

The runner never decides anything: which requests run, how many tokens, which drafts to verify and how
many to propose all come in the `SchedulerOutput`. What it keeps per request (tokens, block table,
sampling state) is its own copy, so it could live in another process. With KV tiers, its `offloader`
applies the step's tier moves around the forward pass and reports the loads and writes that finished.
"""

from __future__ import annotations

import time

import torch

from tokenforge.attention import AttentionBackend
from tokenforge.engine.messages import Draft, RunnerOutput, SchedulerOutput
from tokenforge.runner.batch import Batch, BatchEntry, RequestStates, prepare_batch
from tokenforge.runner.constraints import ConstraintStep
from tokenforge.runner.kv_cache import KVCache
from tokenforge.runner.kv_offload import KVOffloader
from tokenforge.sample.rejection import DraftGroup, verify, verify_tree
from tokenforge.sample.sampler import Sampler
from tokenforge.spec.proposer import DraftRequest, Proposer


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, sampler: Sampler | None,
                 attention: AttentionBackend, sliding_window: int | None = None, proposer: Proposer | None = None,
                 constraints: ConstraintStep | None = None, offloader: KVOffloader | None = None):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.sampler = sampler
        self.attention = attention
        self.sliding_window = sliding_window
        self.proposer = proposer
        self.constraints = constraints
        self.offloader = offloader
        self.requests = RequestStates(constraints.make if constraints is not None else None)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self._update_states(sched)
        if self.offloader is not None:
            self.offloader.before_forward(sched)  # evicted blocks are saved before this step overwrites them
        out = self._forward(sched) if sched.requests else RunnerOutput()
        if self.offloader is not None:
            self.offloader.after_forward(sched)
            self.offloader.collect(out, sched.kv_wait)
        return out

    def _forward(self, sched: SchedulerOutput) -> RunnerOutput:
        entries = [self.requests.entry(r) for r in sched.requests]
        start = time.perf_counter()
        batch = self.prepare(entries)
        sampling = [e for e in batch.entries if e.sample]
        # grammar masks are computed on the worker thread while the model runs
        pending = self.constraints.start(sampling, self.requests) if self.constraints and sampling else None
        logits = self._logits(batch)
        forward_s = time.perf_counter() - start
        if logits is None:
            return RunnerOutput(forward_s=forward_s)
        if pending is not None:
            self.constraints.apply(logits, pending)
        out = self._sample(logits, sampling)
        out.forward_s = forward_s
        if pending is not None:
            out.terminated = [e.req_id for e in sampling
                              if self.constraints.accept(self.requests[e.req_id], out.sampled[e.req_id])]
        lookahead = {r.req_id: r.num_lookahead for r in sched.requests if r.num_lookahead and r.req_id in out.sampled}
        if lookahead:
            out.drafts = self._propose(lookahead, out.sampled)
        return out

    def _update_states(self, sched: SchedulerOutput) -> None:
        dropped = self.requests.apply(sched)
        if self.proposer is not None:
            for req_id in dropped:
                self.proposer.forget(req_id)

    def prepare(self, entries: list[BatchEntry]) -> Batch:
        return prepare_batch(entries, self.attention, self.block_size, self.sliding_window)

    @torch.inference_mode()
    def last_logits(self, entries: list[BatchEntry]) -> torch.Tensor:
        """Logits [len(entries), vocab] after each entry's new tokens (all must sample, none carry a draft):
        what a draft model needs for its next token."""
        batch = self.prepare(entries)
        logits = self._logits(batch)
        index = {id(e): i for i, e in enumerate(batch.entries)}
        return logits[torch.tensor([index[id(e)] for e in entries])]

    def _logits(self, batch: Batch) -> torch.Tensor | None:
        hidden = self.model(batch.input_ids, batch.positions, batch.meta, self.kv_cache.layers)
        if len(batch.sample_rows) == 0:
            return None
        return self.model.compute_logits(hidden[batch.sample_rows])

    def _sample(self, logits: torch.Tensor, sampling: list[BatchEntry]) -> RunnerOutput:
        """Plain requests take one row each; drafted ones take k + 1 rows and go through verification."""
        out = RunnerOutput()
        plain_rows, plain, groups, drafted, row = [], [], [], [], 0
        for e in sampling:
            if e.draft_parents is not None:
                n = len(e.draft_token_ids) + 1
                tokens, accepted, lps = verify_tree(self.sampler, logits[row:row + n], e.state, e.draft_token_ids,
                                                    e.draft_parents)
                self._keep_path(e, accepted)
                out.sampled[e.req_id] = tokens
                if lps and lps[0] is not None:
                    out.logprobs[e.req_id] = lps
                row += n
            elif e.draft_token_ids:
                groups.append((row, DraftGroup(e.state, e.draft_token_ids)))
                drafted.append(e)
                row += len(e.draft_token_ids) + 1
            else:
                plain_rows.append(row)
                plain.append(e)
                row += 1
        if plain:
            rows = logits if len(plain_rows) == logits.shape[0] else logits[plain_rows]
            result = self.sampler(rows, [e.state for e in plain])
            for e, token, lp in zip(plain, result.token_ids, result.logprobs, strict=True):
                out.sampled[e.req_id] = [token]
                if lp is not None:
                    out.logprobs[e.req_id] = [lp]
        if groups:
            group_rows = torch.cat([torch.arange(start, start + len(g.draft) + 1) for start, g in groups])
            verified = verify(self.sampler, logits[group_rows], [g for _, g in groups])
            for e, (tokens, lps) in zip(drafted, verified, strict=True):
                out.sampled[e.req_id] = tokens
                if lps and lps[0] is not None:
                    out.logprobs[e.req_id] = lps
        return out

    def _keep_path(self, e: BatchEntry, accepted: list[int]) -> None:
        """Move the accepted tree nodes' K/V to the slots right after the known tokens, in path order."""
        bs, c = self.block_size, e.num_computed_tokens
        moves = [(c + 1 + node, c + 1 + depth) for depth, node in enumerate(accepted) if node != depth]
        if not moves:
            return
        table = e.block_table
        src = torch.tensor([table[p // bs] * bs + p % bs for p, _ in moves])
        dst = torch.tensor([table[p // bs] * bs + p % bs for _, p in moves])
        self.kv_cache.copy_slots(src, dst)

    def _propose(self, lookahead: dict[str, int], sampled: dict[str, list[int]]) -> dict[str, Draft]:
        """Drafts for the next step, from each request's tokens including the ones just sampled."""
        reqs = []
        for req_id in lookahead:
            req = self.requests[req_id]
            reqs.append(DraftRequest(req_id, req.token_ids() + sampled[req_id], len(req.prompt_token_ids),
                                     req.block_table))
        ks = [lookahead[r.req_id] for r in reqs]
        drafts = self.proposer.propose(reqs, ks)
        return {r.req_id: Draft(d.token_ids[:k], d.parents[:k] if d.parents else None)
                for r, k, d in zip(reqs, ks, drafts, strict=True)}
