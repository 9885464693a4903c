"""The attention contract: the batch layout a runner hands a backend, the metadata a backend builds from it,
and the operations a model layer calls (store the new K/V, attend).

A step's tokens are flattened into one [num_tokens] batch. A backend chooses the order of the requests in
that batch (`batch_order`) and builds its own metadata (`build_metadata`) from each request's layout. The
CPU backend (`attention/cpu.py`) puts requests doing decode-like work first (a few query tokens against a
long cache: plain decode, speculative verification) and serves them with the paged kernel, which reads
keys and values straight from the block pool; prefill chunks follow, each run as one dense causal
attention over its cached prefix plus its new tokens.

KV cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from tokenforge import kernels
from tokenforge.layers.rotary import Rotary


@dataclass
class SeqLayout:
    """One request's rows in a flattened step, as the runner lays them out."""

    query_start: int  # first row in the batch
    num_new_tokens: int  # rows (known tokens plus draft tokens)
    num_computed_tokens: int  # tokens already in the cache before this step
    block_table: np.ndarray  # int64 block ids covering num_computed_tokens + num_new_tokens
    # a draft tree's row masks (bit j of row i: row i sees new token j), None for causal rows
    tree_bits: list[int] | None = None


@dataclass
class PrefillChunk:
    query_start: int  # first row of this chunk in the flattened batch
    num_tokens: int  # query tokens in this chunk
    num_computed_tokens: int  # tokens already in the cache before this chunk
    block_table: torch.Tensor  # int64 block ids covering num_computed_tokens + num_tokens
    # a draft tree's [num_tokens, num_tokens] mask over the new tokens (None: causal); all of the cache is visible
    tree_mask: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V goes in the flat pool
    num_decode_tokens: int  # rows [0, num_decode_tokens) belong to the paged-kernel requests
    decode_block_tables: torch.Tensor  # [num_decode_reqs, max_blocks] int32
    decode_seq_lens: torch.Tensor  # [num_decode_reqs] int32, keys per request including the new tokens
    decode_query_start: torch.Tensor  # [num_decode_reqs + 1] int32
    prefills: list[PrefillChunk]
    block_size: int
    sliding_window: int | None = None
    # [num_decode_tokens] int64 when a paged-kernel request verifies a draft tree: bit i of row j says whether
    # the row sees its request's new token i (the tree's ancestry); earlier tokens are always visible
    decode_row_masks: torch.Tensor | None = None


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values ([num_tokens, kv_heads, head_dim]) at their slots."""
    flat_k = k_cache.view(-1, k_cache.shape[2], k_cache.shape[3])
    flat_v = v_cache.view(-1, v_cache.shape[2], v_cache.shape[3])
    flat_k.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def rotate_and_write_kv(qkv: torch.Tensor, rotary: Rotary, positions: torch.Tensor, num_heads: int,
                        num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    """Apply rotary embeddings in place to the q and k heads of a fused projection qkv [num_tokens,
    (num_heads + 2 num_kv_heads) * head_dim], then store k and v: one kernel pass where the compiled
    kernels exist. Positions must lie inside the rotary tables (the model checks once per forward)."""
    d = k_cache.shape[3]
    # the kernel reads positions and slots as int64 and indexes the tables and the cache with them unchecked
    if (kernels.fused_supported(qkv) and k_cache.dtype in (torch.float32, torch.bfloat16)
            and positions.dtype == slot_mapping.dtype == torch.int64
            and positions.is_contiguous() and slot_mapping.is_contiguous()):
        kernels.rotary_store_kv(qkv, num_heads, num_kv_heads, d, rotary.cos, rotary.sin, positions, k_cache,
                                v_cache, slot_mapping)
        return
    t, q_size, kv_size = qkv.shape[0], num_heads * d, num_kv_heads * d
    rotary.rotate_(qkv[:, :q_size + kv_size].view(t, num_heads + num_kv_heads, d), positions)
    write_kv(qkv[:, q_size:q_size + kv_size].view(t, num_kv_heads, d),
             qkv[:, q_size + kv_size:].view(t, num_kv_heads, d), k_cache, v_cache, slot_mapping)


class AttentionBackend(Protocol):
    """What a model's layers and the runner need from an attention implementation."""

    def batch_order(self, num_new_tokens: list[int]) -> list[int]:
        """The order (indices into the step's requests) in which to lay the requests out."""
        ...

    def build_metadata(self, seqs: list[SeqLayout], slot_mapping: torch.Tensor, block_size: int,
                       sliding_window: int | None) -> AttentionMetadata:
        """Metadata for one step; `seqs` in batch order, `slot_mapping` [num_tokens] int64."""
        ...

    def rotate_and_store(self, qkv: torch.Tensor, rotary: Rotary, positions: torch.Tensor, num_heads: int,
                         num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         meta: AttentionMetadata) -> None:
        """Rotary embeddings on q and k of the fused projection (in place), then store k and v."""
        ...

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Attention for the whole step; the new K/V are already in the cache."""
        ...
