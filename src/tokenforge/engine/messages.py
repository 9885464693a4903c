"""The plain data passed between the engine's parts: scheduler -> runner -> scheduler -> caller."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenforge.sample.sampler import TokenLogprobs
from tokenforge.sampling_params import SamplingParams


@dataclass
class ScheduledRequest:
    """One request's share of a step. Lists are the request's own (read-only here), not copies."""

    req_id: str
    num_computed_tokens: int  # tokens already in the cache; the new ones start at this position
    num_new_tokens: int
    all_token_ids: list[int]  # the new tokens are all_token_ids[num_computed_tokens:][:num_new_tokens]
    block_table: list[int]
    sample: bool  # this step reaches the end of the known tokens, so a next token is drawn
    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # speculative tokens to verify after the request's known ones (counted in num_new_tokens)
    draft_token_ids: list[int] = field(default_factory=list)
    draft_parents: list[int] | None = None  # a tree draft: parent index of each draft token, -1 the text


@dataclass
class SchedulerOutput:
    requests: list[ScheduledRequest] = field(default_factory=list)
    preempted_req_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(r.num_new_tokens for r in self.requests)


@dataclass
class RunnerOutput:
    # req_id -> new tokens: one, or a verified draft's accepted tokens plus the target's next one
    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # one per sampled token


@dataclass
class CompletionOutput:
    index: int
    text: str  # all text so far
    token_ids: list[int]  # all output tokens so far
    new_text: str = ""  # what this step added
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token that ended it


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_cached_tokens: int
    num_preemptions: int


@dataclass
class RequestOutput:
    req_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
