"""Drafting with a model: a small draft model that shares the target's tokenizer, or a low-bit copy of the
target itself (self-speculation).

Drafts are greedy and batched: one forward pass per draft position for all drafting requests at once. A
request stops drafting early when the draft's top probability falls under `confidence`, since a token the
draft itself doubts is rarely accepted and costs a verification row. Greedy drafts are deterministic
proposals, so the target's rejection rule keeps sampled outputs exactly distributed as the target's.

Two ways to hold the draft's KV:
- a separate draft model keeps its own paged cache (its own block pool, one table per request) and, each
  step, first catches up on the tokens it has not seen: the prompt once, then what the target accepted;
- a quantized copy of the target has the target's layer shapes, so it reads and writes the target's own
  cache: the prompt's entries are already there, and the slots it writes for its drafts are exactly the
  ones the verification pass overwrites before reading them. No extra memory, no catch-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenforge.engine.messages import Draft
from tokenforge.kv.block_pool import BlockPool
from tokenforge.runner.batch import BatchEntry
from tokenforge.runner.model_runner import ModelRunner
from tokenforge.spec.proposer import DraftRequest


@dataclass
class _OwnCache:
    """A request's entries in the draft model's own cache: the tokens at positions 0..len(ids)-1."""

    block_table: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    num_known: int = 0  # leading ids that were the request's real tokens when written (not drafts)


@dataclass
class _Drafting:
    req: DraftRequest
    k: int
    start: int  # first position this step feeds
    table: list[int]
    chain: list[int] = field(default_factory=list)  # the greedy chain, one token per depth
    chain_probs: list[float] = field(default_factory=list)  # the draft's probability of each chain prefix
    leaves: list[tuple[float, int, int]] = field(default_factory=list)  # runners-up: (path prob, depth, token)
    tokens: list[int] = field(default_factory=list)  # the result: the chosen nodes, parents first
    parents: list[int] = field(default_factory=list)


class ModelProposer:
    costly = True  # every try is a forward pass of the draft, even one that drafts nothing

    def __init__(self, runner: ModelRunner, max_model_len: int, confidence: float, shares_target_cache: bool,
                 num_blocks: int | None = None, tree_width: int | None = None):
        """`shares_target_cache`: the draft reads and writes the target's cache through the request's own
        block table (it must have the target's KV layout). Otherwise `num_blocks` sizes the draft's own pool."""
        self.runner = runner
        self.block_size = runner.block_size
        self.max_model_len = max_model_len
        self.confidence = confidence
        self.shares_target_cache = shares_target_cache
        self.pool = None if shares_target_cache else BlockPool(num_blocks)
        self.tree = tree_width is not None
        self.width = tree_width or 1
        self._own: dict[str, _OwnCache] = {}

    # ---- the proposer interface -----------------------------------------------------------------------
    def forget(self, req_id: str) -> None:
        """The request finished or was preempted: free its entries in the draft's own cache."""
        own = self._own.pop(req_id, None)
        if own is not None:
            self.pool.release(own.block_table[::-1])

    def propose(self, reqs: list[DraftRequest], ks: list[int]) -> list[Draft]:
        """A chain: the draft's greedy tokens. A tree: the k nodes most likely to be reached, by the draft's
        probability of their path: the greedy chain and, at each depth, up to width - 1 runners-up as leaves."""
        jobs = self._draft(reqs, ks, self.width)
        if self.tree:
            return [Draft(j.tokens, j.parents if j.tokens else None) for j in jobs]
        return [Draft(j.tokens) for j in jobs]

    # ---- drafting -------------------------------------------------------------------------------------
    def _draft(self, reqs: list[DraftRequest], ks: list[int], width: int) -> list[_Drafting]:
        jobs = [self._start(req, k) for req, k in zip(reqs, ks, strict=True)]
        active = [j for j in jobs if j.k > 0]
        first = True
        while active:
            entries = [self._entry(j, first) for j in active]
            probs = torch.softmax(self.runner.last_logits(entries), dim=-1)
            top_p, top_i = probs.topk(min(width, probs.shape[-1]), dim=-1)
            if self.pool is not None:  # what this pass wrote is now in the draft's cache
                for j, e in zip(active, entries, strict=True):
                    own = self._own[j.req.req_id]
                    own.ids = own.ids[:e.num_computed_tokens] + e.token_ids
            active = [j for j, p, t in zip(active, top_p.tolist(), top_i.tolist(), strict=True)
                      if self._extend(j, p, t)]
            first = False
        for j in jobs:
            _choose(j)
        return jobs

    def _extend(self, j: _Drafting, probs: list[float], tokens: list[int]) -> bool:
        """Add this depth's chain node (unless the draft gives it less than `confidence`) and runners-up;
        True while a deeper node could still be among the k most likely."""
        if probs[0] < self.confidence:
            return False
        reach = j.chain_probs[-1] if j.chain_probs else 1.0
        depth = len(j.chain) + 1
        j.leaves += [(reach * p, depth, t) for p, t in zip(probs[1:], tokens[1:]) if p >= self.confidence]
        j.chain.append(tokens[0])
        j.chain_probs.append(reach * probs[0])
        if len(j.chain) >= j.k:
            return False
        # deeper nodes are no likelier than the chain's tip: stop once k nodes are at least as likely
        return len(j.chain) + sum(1 for p, _, _ in j.leaves if p >= j.chain_probs[-1]) < j.k

    def _start(self, req: DraftRequest, k: int) -> _Drafting:
        n = req.num_tokens
        k = min(k, self.max_model_len - n - 1)
        if k <= 0:
            return _Drafting(req, 0, n, [])
        if self.shares_target_cache:
            # the draft writes positions n-1 .. n+k-2 in the slots the scheduler set aside for this draft
            k = min(k, len(req.block_table) * self.block_size - n + 1)
            return _Drafting(req, max(k, 0), n - 1, req.block_table)
        own = self._own.setdefault(req.req_id, _OwnCache())
        known, ids = own.num_known, req.all_token_ids
        while known < min(len(own.ids), n) and own.ids[known] == ids[known]:
            known += 1  # drafts the target accepted are real tokens now
        own.ids, own.num_known = own.ids[:known], n
        need = -(-(n + k - 1) // self.block_size) - len(own.block_table)
        if need > self.pool.num_free_blocks:
            own.num_known = known
            return _Drafting(req, 0, n, [])
        if need > 0:
            own.block_table.extend(self.pool.allocate(need))
        return _Drafting(req, k, min(known, n - 1), own.block_table)

    def _entry(self, j: _Drafting, first: bool) -> BatchEntry:
        """The first pass feeds every token the draft has not seen (at least the last real one); later
        passes feed the chain's newest node."""
        ids = j.req.all_token_ids
        if first:
            return BatchEntry(j.req.req_id, ids[j.start:], j.start, j.table, [], None, True)
        return BatchEntry(j.req.req_id, j.chain[-1:], len(ids) + len(j.chain) - 1, j.table, [], None, True)


def _choose(j: _Drafting) -> None:
    """Keep the k likeliest nodes (ties: shallower first). A node is never likelier than its parent, so
    they form a tree; order them by depth, each depth's chain node first."""
    nodes = [(p, d, 0, t) for d, (p, t) in enumerate(zip(j.chain_probs, j.chain, strict=True), start=1)]
    nodes += [(p, d, 1, t) for p, d, t in j.leaves]
    kept = sorted(sorted(nodes, key=lambda n: (-n[0], n[1], n[2]))[:j.k], key=lambda n: (n[1], n[2], -n[0]))
    index_of_chain = {}  # depth -> index of the chain node there
    for i, (_, d, is_leaf, token) in enumerate(kept):
        if not is_leaf:
            index_of_chain[d] = i
        j.tokens.append(token)
        j.parents.append(index_of_chain.get(d - 1, -1))
