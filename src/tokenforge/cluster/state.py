"""What the client keeps per replica and per request, and the request's options after a resume."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from tokenforge.cluster.config import MIXED
from tokenforge.cluster.messages import ReplicaInfo
from tokenforge.sampling_params import SamplingParams


class Lost:
    """Put on a stream's queue when its attempt's replica failed: the stream resumes elsewhere."""

    def __init__(self, reason: str):
        self.reason = reason


class ReplicaState:
    def __init__(self, replica_id: int, role: str, actor):
        self.replica_id = replica_id
        self.role = role
        self.actor = actor
        self.state = "starting"  # -> up -> down (failed, Ray restarting it) -> up ...; or draining -> removed
        self.info: ReplicaInfo | None = None
        self.attempts: set[str] = set()
        self.stats: dict = {}
        self.num_restarts = 0
        self.killed_pid: int | None = None  # a hung process we killed: revive waits for another one
        self.poller: asyncio.Task | None = None
        self.reviver: asyncio.Task | None = None
        self.last_steps = -1
        self.acked = 0  # the last poll batch processed (batches restart at 1 with each new process)
        self.last_progress = time.monotonic()
        self.last_resync = time.monotonic()

    def takes(self, role: str) -> bool:
        return self.state == "up" and (self.role == role or self.role == MIXED)


class StreamState:
    """One user request: what it asked for, what has been streamed, where it runs now."""

    def __init__(self, req_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 cache_salt: str | None):
        self.req_id = req_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.cache_salt = cache_salt
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list | None = [] if params.logprobs is not None else None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.attempt: str | None = None
        self.replica: ReplicaState | None = None
        self.num_attempts = 0
        self.prefilling = False  # this attempt is a prefill, to be handed off after its first token
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self.num_cached_tokens = 0
        self.shared_blocks = 0  # prompt blocks the router expected its replica to hold already


def remaining_params(params: SamplingParams, num_done: int) -> SamplingParams | None:
    """The request's options for what is left after num_done tokens; None when nothing is left."""
    if num_done == 0:
        return params
    if params.max_tokens is not None and params.max_tokens <= num_done:
        return None
    return dataclasses.replace(params, max_tokens=None if params.max_tokens is None else params.max_tokens - num_done,
                               min_tokens=max(params.min_tokens - num_done, 0))
