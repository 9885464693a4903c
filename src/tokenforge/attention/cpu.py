"""The CPU attention path: the compiled paged kernel for decode rows, dense SDPA for prefill chunks.

The kernel is a plain C++ shared library built at install time (setup.py) and called through ctypes; it
uses torch's own OpenMP runtime, so it shares torch's thread count. Without it (no compiler at install,
an unusual head size) the same rows go through the torch reference, which gives the same numbers slower.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
from pathlib import Path

import torch

from tokenforge.attention.base import AttentionMetadata
from tokenforge.attention.torch_ref import dense_attention, gather_kv, paged_attention_ref

logger = logging.getLogger(__name__)


def _load_kernel() -> ctypes.CDLL | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_paged_attention_cpu{suffix}"
        if path.exists():
            lib = ctypes.CDLL(str(path))
            lib.tf_paged_attention.restype = ctypes.c_int
            lib.tf_paged_attention.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 5 + [
                ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 4 + [ctypes.c_float, ctypes.c_int]
            lib.tf_supported_head_dim.restype = ctypes.c_int
            return lib
    logger.warning("compiled paged-attention kernel not found in %s; using the slower torch path "
                   "(reinstall with a C++ compiler: make install)", here)
    return None


_KERNEL = _load_kernel()


def kernel_available(head_dim: int, cache_dtype: torch.dtype) -> bool:
    return (_KERNEL is not None and bool(_KERNEL.tf_supported_head_dim(head_dim))
            and cache_dtype in (torch.float32, torch.bfloat16))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, query_start: torch.Tensor, scale: float,
                 sliding_window: int | None, use_kernel: bool = True) -> torch.Tensor:
    """Attention of q [n, H, D] (float32) for requests whose keys all live in the paged cache."""
    head_dim = q.shape[-1]
    if not (use_kernel and kernel_available(head_dim, k_cache.dtype)):
        return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale,
                                   sliding_window)
    q = q.contiguous()
    out = torch.empty_like(q)
    rc = _KERNEL.tf_paged_attention(
        int(k_cache.dtype == torch.bfloat16), head_dim, q.data_ptr(), out.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(),
        query_start.data_ptr(), len(seq_lens), q.shape[1], k_cache.shape[2], k_cache.shape[1], scale,
        sliding_window or 0)
    if rc != 0:
        raise RuntimeError(f"paged attention kernel failed with code {rc}")
    return out


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    use_kernel: bool = True) -> torch.Tensor:
    """Attention for a whole flattened step; the new K/V (k, v) must already be in the cache."""
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd:
        out[:nd] = paged_decode(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens,
                                meta.decode_query_start, scale, meta.sliding_window, use_kernel)
    for chunk in meta.prefills:
        s, n = chunk.query_start, chunk.num_tokens
        if chunk.num_computed_tokens == 0:  # nothing cached yet: use the new rows as they are
            ck, cv = k[s:s + n], v[s:s + n]
        else:
            kv_len = chunk.num_computed_tokens + n
            ck = gather_kv(k_cache, chunk.block_table, kv_len)
            cv = gather_kv(v_cache, chunk.block_table, kv_len)
        out[s:s + n] = dense_attention(q[s:s + n], ck, cv, chunk.num_computed_tokens, scale, meta.sliding_window)
    return out
