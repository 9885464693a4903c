"""One request's state as the engine tracks it: tokens, progress through the KV cache, status and timings."""

from __future__ import annotations

import enum
import time

from tokenforge.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # holding its blocks while a lower KV tier loads them
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


class Request:
    """The scheduler's record of one request. Only the scheduler changes it; the runner holds its own copy of
    what it needs, kept in step by the messages (`engine/messages.py`)."""

    def __init__(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams, max_tokens: int,
                 eos_token_ids: frozenset[int], prompt: str | None = None, arrival_time: float | None = None,
                 cache_salt: str | None = None, num_resumed_tokens: int = 0):
        self.req_id = req_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)  # prompt + output: what must be in the cache
        self.params = params
        self.max_tokens = max_tokens  # resolved against the context length
        self.eos_token_ids = eos_token_ids
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        self.stopped_on_token = False  # ended by EOS or a stop token, which is not part of the text
        self.cache_salt = cache_salt  # enters the first block's key: different salts share no cached block
        # the prompt's last tokens that another engine generated and streamed already (a request resumed
        # after a failover or a prefill hand-off): the detokenizer reads them as output already sent
        self.num_resumed_tokens = num_resumed_tokens
        self.block_hashes: list[bytes] = []  # keys of the full blocks, filled in by the KV manager
        self.num_synced_tokens = 0  # tokens the runner has been sent (prompt, then outputs)
        self.num_synced_blocks = 0  # block-table entries the runner has been sent
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """Token-level stop rules after a new token; stop strings are the detokenizer's job."""
        last = self.output_token_ids[-1]
        params = self.params
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                self.stop_reason, self.stopped_on_token = None, True
                return RequestStatus.FINISHED_STOPPED
            if last in params.stop_token_ids:
                self.stop_reason, self.stopped_on_token = last, True
                return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
