"""The runner's side of speculative decoding: the proposer contract and the request view it drafts from.

After a step, the runner asks its proposer for up to k tokens for each request the scheduler named
(`ScheduledRequest.num_lookahead`); the drafts go back to the scheduler, which sends what it can verify in
the next step. A proposer returns a chain, or a tree (each token's parent index, -1 the known text; parents
before children, at most `tree_width` children per node) when built for trees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tokenforge.engine.messages import Draft


@dataclass
class DraftRequest:
    """A request as a proposer sees it: all its known tokens (the newest just sampled, not yet in the cache)
    and its block table in the target's cache (room for the draft's slots is already allocated)."""

    req_id: str
    all_token_ids: list[int]
    num_prompt_tokens: int
    block_table: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.all_token_ids[:self.num_prompt_tokens]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens


class Proposer(Protocol):
    costly: bool  # True when every try costs a forward pass (a model), even one that drafts nothing
    tree: bool  # drafts trees rather than chains

    def forget(self, req_id: str) -> None:
        """The request finished or was preempted: drop whatever the proposer keeps for it."""
        ...

    def propose(self, reqs: list[DraftRequest], ks: list[int]) -> list[Draft]:
        """For each request, up to k draft tokens to follow its known tokens."""
        ...
