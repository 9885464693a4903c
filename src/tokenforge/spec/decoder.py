"""The scheduler's side of speculative decoding: who drafts how many tokens, and what was accepted.

The proposer itself lives with the runner (`spec/proposer.py`); this part only decides. Each request keeps
its own draft length. With `adaptive`, it grows by one after a fully accepted draft and falls to one past
what was accepted otherwise, so a request whose text the proposer cannot predict costs almost nothing
extra; and a model proposer that declines to draft (not confident) pauses that request's drafting for a
growing number of steps, since each try costs a draft pass. Drafting also scales with the batch:
verification is nearly free only while the step's matmuls are thin, so with `disable_batch_size` requests
running or queued nobody drafts, and below it the drafts share what is left of `max_batch_tokens`.
"""

from __future__ import annotations

from tokenforge.config import SpeculativeConfig
from tokenforge.request import Request

MAX_PAUSE = 8  # the longest pause (steps) of a request whose model draft keeps coming back empty


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.costly = config.method != "ngram"  # model drafts cost a forward pass per try
        # the self-copy writes its draft's K/V into the target's cache: those slots must be allocated first
        self.needs_slots = config.method == "self"
        self._len: dict[str, int] = {}  # current draft length per request (adaptive)
        self._pause: dict[str, int] = {}  # steps left without drafting
        self._backoff: dict[str, int] = {}  # the last such pause
        self.num_drafts = 0  # verification steps that carried a draft
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def lookaheads(self, decoding: list[Request], num_requests: int) -> dict[str, int]:
        """How many tokens to draft, after this step, for each request that will then be decoding.

        `num_requests` counts running and queued requests: queued ones are about to join the batch, and
        drafts would only take token budget from their prefill."""
        cfg = self.config
        if num_requests >= cfg.disable_batch_size:
            return {}
        spare = cfg.max_batch_tokens - len(decoding)
        out = {}
        for req in decoding:
            if self._pause.get(req.req_id, 0) > 0:
                self._pause[req.req_id] -= 1
                continue
            # the step adds at least one token to the request
            k = min(self._len.get(req.req_id, cfg.num_speculative_tokens), spare, self.room(req, 1))
            if k > 0:
                out[req.req_id] = k
                spare -= k
        return out

    def room(self, req: Request, num_coming: int = 0) -> int:
        """Drafts past max_tokens or the context are wasted: the request ends before using them."""
        return min(req.max_tokens - req.num_output_tokens - num_coming - 1,
                   self.max_model_len - req.num_tokens - num_coming - 1)

    def on_draft(self, req_id: str, num_tokens: int) -> None:
        """A model that declined to draft (not confident) still cost a forward pass: pause that request's
        drafting for 1, 2, 4, then 8 steps while it keeps declining."""
        if not (self.config.adaptive and self.costly):
            return
        if num_tokens:
            self._backoff[req_id] = 0
        else:
            self._backoff[req_id] = min(max(1, 2 * self._backoff.get(req_id, 0)), MAX_PAUSE)
            self._pause[req_id] = self._backoff[req_id]

    def record(self, req_id: str, num_drafted: int, num_accepted: int) -> None:
        if num_drafted == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        if self.config.adaptive and not self.config.tree:  # a tree's budget stays as configured
            kmax = self.config.num_speculative_tokens
            self._len[req_id] = min(num_drafted + 1, kmax) if num_accepted == num_drafted else num_accepted + 1

    def forget(self, req_id: str) -> None:
        """The request finished: drop its lengths and pauses (preemption keeps them, as a pause would)."""
        self._len.pop(req_id, None)
        self._pause.pop(req_id, None)
        self._backoff.pop(req_id, None)

    def stats(self) -> dict:
        return {"spec_decode_num_drafts": self.num_drafts, "spec_decode_num_draft_tokens": self.num_draft_tokens,
                "spec_decode_num_accepted_tokens": self.num_accepted_tokens}
