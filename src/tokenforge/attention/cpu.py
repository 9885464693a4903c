"""The CPU attention backend: the compiled paged kernel for decode rows and short chunks, dense SDPA for
long prefill chunks.

Requests with few new tokens go first in the batch and through the paged kernel: with the kernel, up to
`PAGED_MAX_QUERY` (decodes, verified drafts and trees, and the short chunk after a long cached prefix, such
as a chat's next question, which SDPA would serve only after copying the whole prefix out of the pool);
without it, up to `DECODE_MAX_QUERY`. Longer chunks attend densely. Without the compiled kernel (no compiler
at install, an unusual head size) the decode rows go through the torch reference, which gives the same
numbers more slowly.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenforge import kernels
from tokenforge.attention.base import AttentionMetadata, PrefillChunk, SeqLayout, rotate_and_write_kv
from tokenforge.attention.torch_ref import dense_attention, gather_kv, paged_attention_ref
from tokenforge.config import MAX_DRAFT_TOKENS
from tokenforge.layers.rotary import Rotary

# The most query rows of one request the paged kernel serves: the known token plus the longest draft.
DECODE_MAX_QUERY = MAX_DRAFT_TOKENS + 1
# With the kernel: the most new tokens of a request it serves (row masks hold 63 bits once shifted in int64).
PAGED_MAX_QUERY = 48


def kernel_available(head_dim: int, cache_dtype: torch.dtype) -> bool:
    return kernels.paged_attention_supported(head_dim, cache_dtype)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, query_start: torch.Tensor, scale: float,
                 sliding_window: int | None, use_kernel: bool = True,
                 row_masks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [n, H, D] (float32) for requests whose keys all live in the paged cache."""
    if not (use_kernel and kernel_available(q.shape[-1], k_cache.dtype)):
        return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale,
                                   sliding_window, row_masks)
    return kernels.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale,
                                   sliding_window, row_masks)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    use_kernel: bool = True) -> torch.Tensor:
    """Attention for a whole flattened step; the new K/V (k, v) must already be in the cache."""
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd:
        out[:nd] = paged_decode(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens,
                                meta.decode_query_start, scale, meta.sliding_window, use_kernel,
                                meta.decode_row_masks)
    for chunk in meta.prefills:
        s, n = chunk.query_start, chunk.num_tokens
        if chunk.num_computed_tokens == 0:  # nothing cached yet: use the new rows as they are
            ck, cv = k[s:s + n], v[s:s + n]
        else:
            kv_len = chunk.num_computed_tokens + n
            ck = gather_kv(k_cache, chunk.block_table, kv_len)
            cv = gather_kv(v_cache, chunk.block_table, kv_len)
        out[s:s + n] = dense_attention(q[s:s + n], ck, cv, chunk.num_computed_tokens, scale, meta.sliding_window,
                                       chunk.tree_mask)
    return out


class CpuAttention:
    """The CPU backend (see the module notes); `use_kernel=False` forces the torch reference everywhere."""

    def __init__(self, use_kernel: bool = True):
        self.use_kernel = use_kernel
        self.max_query = PAGED_MAX_QUERY if use_kernel and kernels.ACTIVE is not None else DECODE_MAX_QUERY

    def batch_order(self, num_new_tokens: list[int]) -> list[int]:
        return sorted(range(len(num_new_tokens)), key=lambda i: num_new_tokens[i] > self.max_query)

    def build_metadata(self, seqs: list[SeqLayout], slot_mapping: torch.Tensor, block_size: int,
                       sliding_window: int | None) -> AttentionMetadata:
        decodes = [s for s in seqs if s.num_new_tokens <= self.max_query]
        n = len(decodes)
        tables = np.zeros((n, max((len(s.block_table) for s in decodes), default=1)), dtype=np.int32)
        seq_lens = np.zeros(n, dtype=np.int32)
        query_start = np.zeros(n + 1, dtype=np.int32)
        trees = any(s.tree_bits is not None for s in decodes)
        row_masks: list[int] = []
        for i, s in enumerate(decodes):
            tables[i, :len(s.block_table)] = s.block_table
            seq_lens[i] = s.num_computed_tokens + s.num_new_tokens
            query_start[i + 1] = s.query_start + s.num_new_tokens
            if trees:  # causal rows for plain requests, the ancestry for a tree's
                row_masks.extend(s.tree_bits or [(2 << j) - 1 for j in range(s.num_new_tokens)])
        prefills = [PrefillChunk(s.query_start, s.num_new_tokens, s.num_computed_tokens,
                                 torch.from_numpy(s.block_table),
                                 None if s.tree_bits is None else bool_mask(s.tree_bits))
                    for s in seqs[n:]]
        return AttentionMetadata(
            slot_mapping=slot_mapping, num_decode_tokens=int(query_start[n]),
            decode_block_tables=torch.from_numpy(tables), decode_seq_lens=torch.from_numpy(seq_lens),
            decode_query_start=torch.from_numpy(query_start), prefills=prefills, block_size=block_size,
            sliding_window=sliding_window,
            decode_row_masks=torch.tensor(row_masks, dtype=torch.int64) if row_masks else None)

    @staticmethod
    def rotate_and_store(qkv: torch.Tensor, rotary: Rotary, positions: torch.Tensor, num_heads: int,
                         num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         meta: AttentionMetadata) -> None:
        rotate_and_write_kv(qkv, rotary, positions, num_heads, num_kv_heads, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        return paged_attention(q, k, v, k_cache, v_cache, meta, scale, self.use_kernel)


def bool_mask(bits: list[int]) -> torch.Tensor:
    """The [n, n] bool form of row masks, for dense attention."""
    n = len(bits)
    return torch.tensor([[(b >> j) & 1 for j in range(n)] for b in bits], dtype=torch.bool)
