"""Runs one scheduled step: builds the flattened batch and attention metadata, runs the model, samples.

Requests with a few new tokens (decodes) are placed first so the paged kernel serves them as one block of
rows; prefill chunks follow and attend densely. Only the last row of each sampling request goes through
the LM head.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenforge.attention import AttentionMetadata, PrefillChunk
from tokenforge.engine.messages import RunnerOutput, ScheduledRequest, SchedulerOutput
from tokenforge.sample.sampler import Sampler, SamplingState

# Requests with at most this many new tokens go through the paged kernel rather than dense attention.
DECODE_MAX_QUERY = 8


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int, sampler: Sampler, sliding_window: int | None = None):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler
        self.sliding_window = sliding_window

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        if not sched.requests:
            return RunnerOutput()
        reqs = sorted(sched.requests, key=lambda r: r.num_new_tokens > DECODE_MAX_QUERY)
        input_ids, positions, meta, sample_rows = self._prepare(reqs)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        sampling = [r for r in reqs if r.sample]
        if not sampling:
            return RunnerOutput()
        logits = self.model.compute_logits(hidden[sample_rows])
        states = [SamplingState(r.params, r.generator, r.prompt_token_ids, r.output_token_ids) for r in sampling]
        result = self.sampler(logits, states)
        out = RunnerOutput()
        for r, token, lp in zip(sampling, result.token_ids, result.logprobs):
            out.sampled[r.req_id] = token
            if lp is not None:
                out.logprobs[r.req_id] = lp
        return out

    def _prepare(self, reqs: list[ScheduledRequest]):
        bs = self.block_size
        ids, pos, slots, sample_rows, prefills = [], [], [], [], []
        num_decode = sum(1 for r in reqs if r.num_new_tokens <= DECODE_MAX_QUERY)
        max_blocks = max((len(r.block_table) for r in reqs[:num_decode]), default=1)
        tables = np.zeros((num_decode, max_blocks), dtype=np.int32)
        seq_lens = np.zeros(num_decode, dtype=np.int32)
        query_start = np.zeros(num_decode + 1, dtype=np.int32)
        row = 0
        for i, r in enumerate(reqs):
            c, n = r.num_computed_tokens, r.num_new_tokens
            ids.extend(r.all_token_ids[c:c + n])
            p = np.arange(c, c + n)
            table = np.asarray(r.block_table, dtype=np.int64)
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            if i < num_decode:
                tables[i, :len(table)] = table
                seq_lens[i] = c + n
                query_start[i + 1] = row + n
            else:
                prefills.append(PrefillChunk(row, n, c, torch.from_numpy(table)))
            row += n
            if r.sample:
                sample_rows.append(row - 1)
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)),
            num_decode_tokens=int(query_start[num_decode]),
            decode_block_tables=torch.from_numpy(tables), decode_seq_lens=torch.from_numpy(seq_lens),
            decode_query_start=torch.from_numpy(query_start), prefills=prefills, block_size=bs,
            sliding_window=self.sliding_window)
        positions = torch.from_numpy(np.concatenate(pos))
        return torch.tensor(ids, dtype=torch.long), positions, meta, torch.tensor(sample_rows, dtype=torch.long)
