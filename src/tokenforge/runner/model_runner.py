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
from tokenforge.sample.rejection import DraftGroup, verify, verify_tree
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
        reqs = sorted(sched.requests, key=_dense)
        logits = self._forward(reqs)
        if logits is None:
            return RunnerOutput()
        return self._sample(logits, [r for r in reqs if r.sample])

    @torch.inference_mode()
    def last_logits(self, reqs: list[ScheduledRequest]) -> torch.Tensor:
        """Logits [len(reqs), vocab] after each request's new tokens (all must sample, none carry a draft):
        what a draft model needs for its next token."""
        order = sorted(range(len(reqs)), key=lambda i: _dense(reqs[i]))
        logits = self._forward([reqs[i] for i in order])
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return logits[inverse]

    def _forward(self, reqs: list[ScheduledRequest]) -> torch.Tensor | None:
        input_ids, positions, meta, sample_rows = self._prepare(reqs)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        if len(sample_rows) == 0:
            return None
        return self.model.compute_logits(hidden[sample_rows])

    def _sample(self, logits: torch.Tensor, sampling: list[ScheduledRequest]) -> RunnerOutput:
        """Plain requests take one row each; drafted ones take k + 1 rows and go through verification."""
        out = RunnerOutput()
        plain_rows, plain, groups, drafted, row = [], [], [], [], 0
        for r in sampling:
            state = SamplingState(r.params, r.generator, r.prompt_token_ids, r.output_token_ids)
            if r.draft_parents is not None:
                n = len(r.draft_token_ids) + 1
                tokens, accepted, lps = verify_tree(self.sampler, logits[row:row + n], state, r.draft_token_ids,
                                                    r.draft_parents)
                self._keep_path(r, accepted)
                out.sampled[r.req_id] = tokens
                if lps and lps[0] is not None:
                    out.logprobs[r.req_id] = lps
                row += n
            elif r.draft_token_ids:
                groups.append((row, DraftGroup(state, r.draft_token_ids)))
                drafted.append(r)
                row += len(r.draft_token_ids) + 1
            else:
                plain_rows.append(row)
                plain.append((r, state))
                row += 1
        if plain:
            rows = logits if len(plain_rows) == logits.shape[0] else logits[plain_rows]
            result = self.sampler(rows, [state for _, state in plain])
            for (r, _), token, lp in zip(plain, result.token_ids, result.logprobs, strict=True):
                out.sampled[r.req_id] = [token]
                if lp is not None:
                    out.logprobs[r.req_id] = [lp]
        if groups:
            group_rows = torch.cat([torch.arange(start, start + len(g.draft) + 1) for start, g in groups])
            verified = verify(self.sampler, logits[group_rows], [g for _, g in groups])
            for r, (tokens, lps) in zip(drafted, verified, strict=True):
                out.sampled[r.req_id] = tokens
                if lps and lps[0] is not None:
                    out.logprobs[r.req_id] = lps
        return out

    def _keep_path(self, r: ScheduledRequest, accepted: list[int]) -> None:
        """Move the accepted tree nodes' K/V to the slots right after the known tokens, in path order."""
        bs, c = self.block_size, r.num_computed_tokens
        moves = [(c + 1 + node, c + 1 + depth) for depth, node in enumerate(accepted) if node != depth]
        if not moves:
            return
        table = r.block_table
        src = torch.tensor([table[p // bs] * bs + p % bs for p, _ in moves])
        dst = torch.tensor([table[p // bs] * bs + p % bs for _, p in moves])
        for k_cache, v_cache in self.kv_caches:
            for cache in (k_cache, v_cache):
                flat = cache.view(-1, cache.shape[2], cache.shape[3])
                flat.index_copy_(0, dst, flat.index_select(0, src))

    def _prepare(self, reqs: list[ScheduledRequest]):
        bs = self.block_size
        ids, pos, slots, sample_rows, prefills = [], [], [], [], []
        num_decode = sum(1 for r in reqs if not _dense(r))
        max_blocks = max((len(r.block_table) for r in reqs[:num_decode]), default=1)
        tables = np.zeros((num_decode, max_blocks), dtype=np.int32)
        seq_lens = np.zeros(num_decode, dtype=np.int32)
        query_start = np.zeros(num_decode + 1, dtype=np.int32)
        trees = any(r.draft_parents is not None for r in reqs[:num_decode])
        row_masks: list[int] = []
        row = 0
        for i, r in enumerate(reqs):
            c, n = r.num_computed_tokens, r.num_new_tokens
            d = len(r.draft_token_ids)
            ids.extend(r.all_token_ids[c:c + n - d])
            ids.extend(r.draft_token_ids)
            p = np.arange(c, c + n)
            table = np.asarray(r.block_table, dtype=np.int64)
            slots.append(table[p // bs] * bs + p % bs)  # a tree's nodes take consecutive slots too
            bits = None
            if r.draft_parents is not None:  # rotary positions follow each node's depth
                bits, depths = tree_bits(r.draft_parents)
                p = c + np.asarray(depths, dtype=np.int64)
            pos.append(p)
            if i < num_decode:
                tables[i, :len(table)] = table
                seq_lens[i] = c + n
                query_start[i + 1] = row + n
                if trees:  # causal rows for plain requests, the ancestry for a tree's
                    row_masks.extend(bits if bits is not None else [(2 << j) - 1 for j in range(n)])
            else:
                mask = None if bits is None else _bool_mask(bits)
                prefills.append(PrefillChunk(row, n, c, torch.from_numpy(table), mask))
            row += n
            if r.sample:  # a drafted request needs a row after each draft prefix
                sample_rows.extend(range(row - 1 - d, row))
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)),
            num_decode_tokens=int(query_start[num_decode]),
            decode_block_tables=torch.from_numpy(tables), decode_seq_lens=torch.from_numpy(seq_lens),
            decode_query_start=torch.from_numpy(query_start), prefills=prefills, block_size=bs,
            sliding_window=self.sliding_window,
            decode_row_masks=torch.tensor(row_masks, dtype=torch.int64) if row_masks else None)
        positions = torch.from_numpy(np.concatenate(pos))
        return torch.tensor(ids, dtype=torch.long), positions, meta, torch.tensor(sample_rows, dtype=torch.long)


def _dense(r: ScheduledRequest) -> bool:
    """Long chunks attend densely; decodes, drafts and small draft trees (with a row mask) use the paged kernel."""
    return r.num_new_tokens > DECODE_MAX_QUERY


def tree_bits(parents: list[int]) -> tuple[list[int], list[int]]:
    """Row masks and depths of [known token, node 0, node 1, ...]: bit j of row i says whether row i sees
    row j (the known token sees itself; a node sees it, its ancestors and itself), as the paged kernel
    takes them; the depth is the position offset from the known token."""
    bits, depths = [1], [0]
    for j, parent in enumerate(parents):
        bits.append(bits[parent + 1] | (1 << (j + 1)))
        depths.append(depths[parent + 1] + 1)
    return bits, depths


def _bool_mask(bits: list[int]) -> torch.Tensor:
    """The [n, n] bool form of row masks, for dense attention."""
    n = len(bits)
    return torch.tensor([[(b >> j) & 1 for j in range(n)] for b in bits], dtype=torch.bool)
