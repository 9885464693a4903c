"""The KV cache tensors: one key and one value pool per layer, sized from a memory budget."""

from __future__ import annotations

import torch

from tokenforge.config import CacheConfig, ConfigError, ModelConfig


def kv_cache_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """bf16 checkpoints keep a bf16 cache (half the bytes); others use float32 (the kernel has no f16 path)."""
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * itemsize


def num_blocks_for(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = bytes_per_block(model, cache.block_size, dtype)
    n = cache.kv_cache_memory // per_block
    needed = -(-model.max_model_len // cache.block_size)
    if n < needed:
        raise ConfigError(f"kv_cache_memory={cache.kv_cache_memory} bytes holds {n} blocks of {cache.block_size} "
                          f"tokens ({per_block} bytes each), fewer than one full-length sequence needs "
                          f"({needed} for max_model_len={model.max_model_len}); raise --kv-cache-memory "
                          f"to at least {needed * per_block} or lower --max-model-len")
    return n


def allocate_kv_caches(model: ModelConfig, num_blocks: int, block_size: int,
                       dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(model.num_layers)]
