"""The values that cross between a replica actor and the client that routes to it.

A replica sends, per poll, only what changed since the last one: each request's new tokens and text
(`OutputDelta`), the KV events of its prefix cache (`KVEvents`, numbered so a gap shows) and its load,
in numbered batches that it resends until the client acknowledges them.
The client rebuilds cumulative `RequestOutput`s itself, so a long answer costs O(n) bytes, not O(n^2),
and it holds every token already streamed: what a request needs to resume on another replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenforge.kv.block_hash import BlockKey
from tokenforge.sample.sampler import TokenLogprobs


@dataclass
class OutputDelta:
    req_id: str  # the attempt's id on the replica (see client.py)
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # set on the last delta of a request
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0  # prompt tokens the replica found in its prefix cache
    error: str | None = None  # the request failed on the replica (a ValueError's message)


@dataclass
class KVEvents:
    """Prefix-cache changes since the previous batch; `seq` counts batches from 1, so a gap means lost events."""

    seq: int
    stored: list[BlockKey] = field(default_factory=list)
    evicted: list[BlockKey] = field(default_factory=list)


@dataclass
class ReplicaLoad:
    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_steps: int  # steps completed: a replica with work whose count stalls past the step deadline hangs
    stats: dict  # the engine's whole stats() snapshot, for /metrics


@dataclass
class Batch:
    """What one poll made ready; kept by the replica and sent again until a later poll acknowledges it, so
    a reply lost on the way (a poll cancelled or timed out at the client) loses no token."""

    seq: int
    outputs: list[OutputDelta]
    events: KVEvents  # numbered like the batch


@dataclass
class PollResult:
    batches: list[Batch]  # every batch not yet acknowledged, oldest first
    load: ReplicaLoad


@dataclass(frozen=True)
class ReplicaInfo:
    """What a replica tells its client once it is up."""

    namespace: BlockKey  # the root of its block-key chains (model fingerprint, KV dtype, block size)
    block_size: int
    num_blocks: int
    bytes_per_block: int
    max_model_len: int
    pid: int
    node_id: str
