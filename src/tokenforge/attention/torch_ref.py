"""Attention in plain torch: the path for prefill chunks, the fallback for the kernel, and the test oracle.

Gathers one request's keys and values from its blocks and runs scaled-dot-product attention with the
causal (and sliding-window) mask of its query positions.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F


def _causal_lower_right(n: int, kv_len: int):
    # imported on first use: torch.nn.attention.bias pulls in torch._dynamo, 1.2 s of a 5 s cold start
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(n, kv_len)


def preload() -> threading.Thread:
    """Import the lower-right causal mask's module on a background thread (servers call this once ready,
    so the first chunk after a cached prefix does not pay for the import); returns the thread."""
    thread = threading.Thread(target=lambda: _causal_lower_right(1, 1), name="tokenforge-preload", daemon=True)
    thread.start()
    return thread


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_tokens, kv_heads, head_dim] for one request, copied out of its blocks."""
    blocks = cache.index_select(0, block_table[: (num_tokens + cache.shape[1] - 1) // cache.shape[1]])
    return blocks.flatten(0, 1)[:num_tokens]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_computed_tokens: int,
                    scale: float, sliding_window: int | None, tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [n, H, D] at positions num_computed_tokens.. against k, v [num_computed_tokens + n, KVH, D].

    With `tree_mask` ([n, n], a draft tree's ancestry), the new tokens see all of the cache and, among
    themselves, only what the mask allows."""
    n, kv_len = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype)
    if tree_mask is not None:
        mask = torch.ones(n, kv_len, dtype=torch.bool)
        mask[:, num_computed_tokens:] = tree_mask
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(0, 1)
    if num_computed_tokens == 0 and sliding_window is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(0, 1)
    if sliding_window is None:  # causal aligned to the end: runs on SDPA's flash path, no dense mask
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=_causal_lower_right(n, kv_len), scale=scale,
                                             enable_gqa=True)
        return out.transpose(0, 1)
    q_pos = torch.arange(num_computed_tokens, num_computed_tokens + n).unsqueeze(1)
    k_pos = torch.arange(kv_len).unsqueeze(0)
    mask = (k_pos <= q_pos) & (k_pos > q_pos - sliding_window)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor,
                        scale: float, sliding_window: int | None,
                        row_masks: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for the paged kernel: same arguments, one request at a time."""
    out = torch.empty_like(q)
    for b in range(len(seq_lens)):
        s, e, seq_len = int(query_start[b]), int(query_start[b + 1]), int(seq_lens[b])
        if e == s:
            continue
        table = block_tables[b].long()
        k = gather_kv(k_cache, table, seq_len)
        v = gather_kv(v_cache, table, seq_len)
        tree = None
        if row_masks is not None:  # bit i of row j -> may see new token i
            bits = row_masks[s:e].unsqueeze(1) >> torch.arange(e - s).unsqueeze(0)
            tree = (bits & 1).bool()
        out[s:e] = dense_attention(q[s:e], k, v, seq_len - (e - s), scale, sliding_window, tree)
    return out
