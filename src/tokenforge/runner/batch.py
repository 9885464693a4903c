"""The runner's side of each request and the layout of one forward pass.

`RunnerRequest` is the runner's own copy of a live request: its tokens, block table, sampling parameters
and random generator, built from `NewRequestData` and kept in step by each `ScheduledRequest`. `BatchEntry`
is one request's rows in one forward pass; `prepare_batch` flattens entries into the model's inputs in the
order the attention backend asks for.

A batch row is one token: a request's known tokens from `num_computed_tokens` on, then its draft tokens.
Positions follow the tokens, except in a draft tree, where each node's position is the known token's plus
the node's depth. Only sampling rows (the last known token, and each draft prefix) reach the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenforge.attention import AttentionBackend, AttentionMetadata, SeqLayout
from tokenforge.engine.messages import NewRequestData, ScheduledRequest, SchedulerOutput
from tokenforge.sample.sampler import SamplingState
from tokenforge.sampling_params import SamplingParams


class RunnerRequest:
    """What the runner keeps for one live request (until the scheduler reports it finished); `constraints`
    (grammar state, bias, allowed ids, bad words) only for a request that asks for any."""

    def __init__(self, new: NewRequestData, constraints=None):
        self.req_id = new.req_id
        self.params: SamplingParams = new.params
        self.prompt_token_ids = list(new.prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.block_table: list[int] = []
        # a seeded request draws only from its own generator, so its tokens do not depend on the batch
        self.generator = torch.Generator().manual_seed(new.params.seed) if new.params.seed is not None else None
        self.state = SamplingState(self.params, self.generator, self.prompt_token_ids, self.output_token_ids)
        self.constraints = constraints

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def update(self, entry: ScheduledRequest) -> None:
        """Apply one step's changes: tokens the scheduler appended and blocks it added."""
        if entry.new_token_ids:
            self.output_token_ids.extend(entry.new_token_ids)
        if entry.new_block_ids:
            self.block_table.extend(entry.new_block_ids)

    def known_tokens(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) without copying the whole sequence."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]


class RequestStates(dict[str, RunnerRequest]):
    """The runner's copies of the live requests, by id, kept in step by applying each SchedulerOutput.
    `make_constraints(params)` builds a new request's constraint state (None: no constraints supported)."""

    def __init__(self, make_constraints=None):
        super().__init__()
        self.make_constraints = make_constraints

    def apply(self, sched: SchedulerOutput) -> list[str]:
        """Apply one step's message; returns the ids whose drafting state must be dropped (finished or
        preempted requests)."""
        for req_id in sched.finished_req_ids:
            self.pop(req_id, None)
        for req_id in sched.preempted_req_ids:  # its blocks are gone; it comes back with a new table
            self[req_id].block_table = []
        for new in sched.new_requests:
            constraints = self.make_constraints(new.params) if self.make_constraints is not None else None
            if constraints is not None and new.num_resumed_tokens:  # the grammar goes on where the other left off
                if not constraints.accept(new.prompt_token_ids[-new.num_resumed_tokens:]):
                    raise ValueError(f"request {new.req_id}: its resumed tokens do not fit its grammar")
            self[new.req_id] = RunnerRequest(new, constraints)
        for entry in sched.requests:
            self[entry.req_id].update(entry)
        return sched.finished_req_ids + sched.preempted_req_ids

    def entry(self, r: ScheduledRequest) -> BatchEntry:
        """The batch rows of one scheduled request."""
        req = self[r.req_id]
        c, d = r.num_computed_tokens, len(r.draft_token_ids)
        end = c + r.num_new_tokens - d
        return BatchEntry(r.req_id, req.known_tokens(c, end), c, req.block_table, r.draft_token_ids,
                          r.draft_parents, end == req.num_tokens, req.state)


@dataclass
class BatchEntry:
    """One request's rows in one forward pass."""

    req_id: str
    token_ids: list[int]  # the new known tokens, positions num_computed_tokens onwards
    num_computed_tokens: int
    block_table: list[int]
    draft_token_ids: list[int]
    draft_parents: list[int] | None
    sample: bool  # the rows reach the end of the known tokens: sample after them (and after each draft prefix)
    state: SamplingState | None = None  # None for a pass that only needs logits (a draft model's)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids) + len(self.draft_token_ids)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [rows for the LM head] int64
    entries: list[BatchEntry]  # in batch order


def prepare_batch(entries: list[BatchEntry], backend: AttentionBackend, block_size: int,
                  sliding_window: int | None) -> Batch:
    """Flatten entries (reordered as the backend asks) into the model's inputs and attention metadata."""
    entries = [entries[i] for i in backend.batch_order([e.num_new_tokens for e in entries])]
    ids, pos, slots, sample_rows, seqs = [], [], [], [], []
    row = 0
    for e in entries:
        c, n, d = e.num_computed_tokens, e.num_new_tokens, len(e.draft_token_ids)
        ids.extend(e.token_ids)
        ids.extend(e.draft_token_ids)
        p = np.arange(c, c + n)
        table = np.asarray(e.block_table, dtype=np.int64)
        slots.append(table[p // block_size] * block_size + p % block_size)  # a tree's nodes take consecutive slots
        bits = None
        if e.draft_parents is not None:  # rotary positions follow each node's depth
            bits, depths = tree_bits(e.draft_parents)
            p = c + np.asarray(depths, dtype=np.int64)
        pos.append(p)
        seqs.append(SeqLayout(row, n, c, table, bits))
        row += n
        if e.sample:  # a drafted request needs a row after each draft prefix
            sample_rows.extend(range(row - 1 - d, row))
    slot_mapping = torch.from_numpy(np.concatenate(slots))
    meta = backend.build_metadata(seqs, slot_mapping, block_size, sliding_window)
    return Batch(torch.tensor(ids, dtype=torch.long), torch.from_numpy(np.concatenate(pos)), meta,
                 torch.tensor(sample_rows, dtype=torch.long), entries)


def tree_bits(parents: list[int]) -> tuple[list[int], list[int]]:
    """Row masks and depths of [known token, node 0, node 1, ...]: bit j of row i says whether row i sees
    row j (the known token sees itself; a node sees it, its ancestors and itself), as the paged kernel
    takes them; the depth is the position offset from the known token."""
    bits, depths = [1], [0]
    for j, parent in enumerate(parents):
        bits.append(bits[parent + 1] | (1 << (j + 1)))
        depths.append(depths[parent + 1] + 1)
    return bits, depths
