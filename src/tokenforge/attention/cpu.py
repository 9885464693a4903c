"""The CPU attention path: the compiled paged kernel for decode rows, dense SDPA for prefill chunks.

Without the compiled kernel (no compiler at install, an unusual head size) the decode rows go through
the torch reference, which gives the same numbers more slowly.
"""

from __future__ import annotations

import torch

from tokenforge import kernels
from tokenforge.attention.base import AttentionMetadata
from tokenforge.attention.torch_ref import dense_attention, gather_kv, paged_attention_ref


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
