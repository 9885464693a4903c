"""The plain values passed between the engine's parts: scheduler -> runner -> scheduler -> caller.

Every message is a value: it shares no list with live state and survives a pickle round trip, because the
runner may live in another process or on another machine. As in vLLM v1, a request's data goes to the
runner once (`NewRequestData`), then each step carries only what changed (`ScheduledRequest`: new token
ids, new block ids, the computed-token count); the runner keeps its own copy of each live request,
including its sampling state, until `finished_req_ids` names it.

Speculative decoding travels the same way: the scheduler asks for drafts (`num_lookahead`), the runner
returns them (`RunnerOutput.drafts`) and the scheduler sends back, in the next step's entry, the part it
has room to verify (`draft_token_ids`).

KV tiers travel the same way (`kv/tiers.py` decides, `runner/kv_offload.py` moves bytes): the step's
`kv_ops` are applied in order before the forward pass (save an evicted block to host memory before the
step overwrites it, spill a host slot to disk, delete a file), `kv_saves_after` after it (write-through),
and `kv_loads` start asynchronous loads into blocks that no running request reads. The runner answers
with the loads and disk writes that finished (`kv_loads_done`, `kv_spills_done`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenforge.sample.sampler import TokenLogprobs
from tokenforge.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """Sent once, the first time a request is scheduled."""

    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    num_resumed_tokens: int = 0  # the prompt's last tokens were output streamed by another engine (resume)


@dataclass
class ScheduledRequest:
    """One request's share of a step, as a change to what the runner already holds for it."""

    req_id: str
    num_computed_tokens: int  # tokens already in the cache; this step's start at this position
    num_new_tokens: int  # known tokens to compute this step, plus the draft tokens to verify
    new_token_ids: list[int] = field(default_factory=list)  # appended to the request since the last message
    new_block_ids: list[int] = field(default_factory=list)  # appended to its block table
    draft_token_ids: list[int] = field(default_factory=list)  # speculative tokens to verify after the known ones
    draft_parents: list[int] | None = None  # a tree draft: parent index of each draft token, -1 the text
    num_lookahead: int = 0  # after this step, draft up to this many tokens for the next one


@dataclass
class KVSave:
    """Copy KV block `block_id` into host-memory slot `slot` (L1 -> L2)."""

    block_id: int
    slot: int


@dataclass
class KVSpill:
    """Write host-memory slot `slot` to the disk tier as the block keyed `key`, charged to `owner` (L2 -> L3);
    the slot's bytes are copied out at once, so a later op may reuse the slot."""

    slot: int
    key: bytes
    owner: bytes


@dataclass
class KVDelete:
    """Remove the disk tier's file of `key` (evicted from L3)."""

    key: bytes


@dataclass
class KVLoadJob:
    """Load blocks into `block_ids`: source i is (2, host slot) or (3, key). The job finishes as a whole."""

    job_id: int
    block_ids: list[int]
    sources: list[tuple[int, int | bytes]]


@dataclass
class KVLoadDone:
    job_id: int
    failed: list[int]  # indices into the job's blocks that could not be loaded (missing, corrupt, foreign)
    nbytes: dict[int, int]  # tier -> bytes loaded
    io_s: dict[int, float]  # tier -> seconds spent reading and copying
    latency_s: float  # submitted -> finished


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    requests: list[ScheduledRequest] = field(default_factory=list)
    preempted_req_ids: list[str] = field(default_factory=list)  # their blocks are gone; tables restart empty
    finished_req_ids: list[str] = field(default_factory=list)  # the runner drops their state
    kv_ops: list[KVSave | KVSpill | KVDelete] = field(default_factory=list)  # in order, before the forward pass
    kv_saves_after: list[KVSave] = field(default_factory=list)  # write-through: after the forward pass
    kv_loads: list[KVLoadJob] = field(default_factory=list)  # start these asynchronous loads
    kv_wait: bool = False  # nothing to compute: wait until a load finishes instead of returning at once

    @property
    def num_tokens(self) -> int:
        return sum(r.num_new_tokens for r in self.requests)


@dataclass
class Draft:
    """Proposed tokens for a request's next step: a chain, or a tree with each token's parent (-1: the text)."""

    token_ids: list[int]
    parents: list[int] | None = None


@dataclass
class RunnerOutput:
    # req_id -> new tokens: one, or a verified draft's accepted tokens plus the target's next one
    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # one per sampled token
    drafts: dict[str, Draft] = field(default_factory=dict)  # for each request that asked (num_lookahead)
    terminated: list[str] = field(default_factory=list)  # requests whose output constraint is now complete
    kv_loads_done: list[KVLoadDone] = field(default_factory=list)
    kv_spills_done: list[tuple[bytes, bool]] = field(default_factory=list)  # (key, written) per finished spill
    forward_s: float = 0.0  # time of this step's forward pass (the tiers' measure of prefill speed)


@dataclass
class CompletionOutput:
    index: int
    text: str  # all text so far
    token_ids: list[int]  # all output tokens so far (a copy)
    new_text: str = ""  # what this step added
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None  # one per output token so far (a copy)
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
    prompt_token_ids: tuple[int, ...]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
