"""The engine's side of speculative decoding: who drafts how many tokens this step, and what was accepted.

Each request keeps its own draft length. With `adaptive`, it grows by one after a fully accepted draft and
falls to one past what was accepted otherwise, so a request whose text the proposer cannot predict costs
almost nothing extra; and a model proposer that declines to draft (not confident) pauses that request's
drafting for a growing number of steps, since each try costs a draft pass. Drafting also scales with the
batch: verification is nearly free only while the step's matmuls are thin, so with `disable_batch_size`
requests running or queued nobody drafts, and below it the drafts share what is left of `max_batch_tokens`.
"""

from __future__ import annotations

from typing import Protocol

from tokenforge.config import SpeculativeConfig
from tokenforge.request import Request
from tokenforge.spec.ngram import NgramProposer

MAX_PAUSE = 8  # the longest pause (steps) of a request whose model draft keeps coming back empty


class Proposer(Protocol):
    costly: bool  # True when every try costs a forward pass (a model), even one that drafts nothing

    def forget(self, req_id: str) -> None:
        """The request finished or was preempted: drop whatever the proposer keeps for it."""
        ...

    def propose(self, reqs: list[Request], ks: list[int]) -> list[list[int]]:
        """For each request, up to k draft tokens to follow req.all_token_ids."""
        ...

    def propose_tree(self, reqs: list[Request], ks: list[int], width: int) -> list[tuple[list[int], list[int]]]:
        """For each request, up to k tokens forming a tree (tokens, parent index or -1), parents before
        children, at most `width` children per node."""
        ...


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, max_model_len: int, proposer: Proposer | None = None):
        self.config = config
        self.proposer = proposer or NgramProposer(config.ngram_min, config.ngram_max)
        self.max_model_len = max_model_len
        self.num_drafts = 0  # verification steps that carried a draft
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def propose(self, running: list[Request], num_waiting: int = 0) -> None:
        """Set `draft_token_ids` on every running request (empty where it should not draft).

        Queued requests count towards the batch: they are about to join it, and drafts would only take
        token budget from their prefill."""
        cfg = self.config
        decoding = [r for r in running if r.num_computed_tokens == r.num_tokens - 1]
        for req in running:
            req.draft_token_ids = []
            req.draft_parents = None
        if len(running) + num_waiting >= cfg.disable_batch_size:
            return
        spare = cfg.max_batch_tokens - len(decoding)
        reqs, ks = [], []
        for req in decoding:
            if req.spec_pause > 0:
                req.spec_pause -= 1
                continue
            k = min(self._length(req), spare, self._room(req))
            if k > 0:
                reqs.append(req)
                ks.append(k)
                spare -= k
        if not reqs:
            return
        if cfg.tree:
            for req, (draft, parents) in zip(reqs, self.proposer.propose_tree(reqs, ks, cfg.tree_width), strict=True):
                req.draft_token_ids = draft
                req.draft_parents = parents if draft else None
        else:
            for req, k, draft in zip(reqs, ks, self.proposer.propose(reqs, ks), strict=True):
                req.draft_token_ids = draft[:k]
        if cfg.adaptive and self.proposer.costly:
            for req in reqs:
                self._pause_if_empty(req)

    @staticmethod
    def _pause_if_empty(req: Request) -> None:
        """A model that declined to draft (not confident) still cost a forward pass: pause that request's
        drafting for 1, 2, 4, then 8 steps while it keeps declining."""
        if req.draft_token_ids:
            req.spec_backoff = 0
        else:
            req.spec_backoff = min(max(1, 2 * req.spec_backoff), MAX_PAUSE)
            req.spec_pause = req.spec_backoff

    def _length(self, req: Request) -> int:
        if req.spec_len is None:
            req.spec_len = self.config.num_speculative_tokens
        return req.spec_len

    def _room(self, req: Request) -> int:
        """Drafts past max_tokens or the context are wasted: the request ends before using them."""
        return min(req.max_tokens - req.num_output_tokens - 1, self.max_model_len - req.num_tokens - 1)

    def forget(self, req: Request) -> None:
        self.proposer.forget(req.req_id)

    def record(self, req: Request, num_drafted: int, num_accepted: int) -> None:
        if num_drafted == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        if self.config.adaptive and not self.config.tree:  # a tree's budget stays as configured
            kmax = self.config.num_speculative_tokens
            req.spec_len = min(num_drafted + 1, kmax) if num_accepted == num_drafted else num_accepted + 1

    def stats(self) -> dict:
        return {"spec_decode_num_drafts": self.num_drafts, "spec_decode_num_draft_tokens": self.num_draft_tokens,
                "spec_decode_num_accepted_tokens": self.num_accepted_tokens}
