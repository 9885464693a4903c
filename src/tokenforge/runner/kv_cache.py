"""The KV cache's one owner: a key and a value pool per layer, sized from a memory budget, with block-level
operations.

Layout per layer: [num_blocks, block_size, num_kv_heads, head_dim]; a slot is block_id * block_size +
offset. Besides handing the layers to the model, the cache copies blocks within the pool, moves single
slots (a verified draft tree's accepted path), and reads blocks out to a host buffer or writes them back
in: what a lower cache tier, a KV transfer between engines or a fork of a sequence needs.
"""

from __future__ import annotations

import torch

from tokenforge import kernels
from tokenforge.config import CacheConfig, ConfigError, ModelConfig


def kv_cache_dtype(weight_dtype: torch.dtype, choice: str = "auto") -> torch.dtype:
    """`choice` (CacheConfig.dtype) as a torch dtype; "auto": bf16 checkpoints keep a bf16 cache (half the
    bytes), others float32 (the kernels have no f16 path). A bf16 cache under float32 activations rounds each
    key and value once as it is stored (what llama.cpp's default f16 cache does too)."""
    if choice == "auto":
        return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[choice]


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


class KVCache:
    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        # not zeroed: every slot is written before it is read, and untouched pages cost no resident memory
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (torch.empty(shape, dtype=dtype, device=self.device), torch.empty(shape, dtype=dtype, device=self.device))
            for _ in range(model.num_layers)]
        self.block_shape = shape[1:]
        self.bytes_per_block = bytes_per_block(model, block_size, dtype)
        # the compiled block copy (one memcpy per block and pool) where the pools live in host memory
        self._copier = kernels.ACTIVE if self.device.type == "cpu" else None
        self._pool_list = [pool for pair in self.layers for pool in pair]  # k0, v0, k1, v1, ...
        self._pool_ptrs = kernels.kv_pool_pointers(self._pool_list) if self._copier is not None else None

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Block dst[i] becomes a copy of block src[i] in every layer (a copy-on-write fork, a defrag)."""
        if len(src) != len(dst):
            raise ValueError(f"copy_blocks needs as many sources as destinations, got {len(src)} and {len(dst)}")
        s, d = self._index(src), self._index(dst)
        for pool in self._pool_list:
            pool.index_copy_(0, d, pool.index_select(0, s))

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Slot dst[i] (block * block_size + offset) takes the K/V of slot src[i] in every layer; all sources
        are read before any destination is written."""
        for pool in self._pool_list:
            flat = pool.view(-1, *self.block_shape[1:])
            flat.index_copy_(0, dst, flat.index_select(0, src))

    def read_blocks(self, block_ids: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks' K/V as one host tensor [len(block_ids), layers, 2, block_size, kv_heads, head_dim],
        block-major so each block's bytes are contiguous (a tier stores or ships one block at a time).
        `out` may be a preallocated (pinned) buffer of that shape and dtype."""
        shape = (len(block_ids), len(self.layers), 2, *self.block_shape)
        if out is None:
            out = torch.empty(shape, dtype=self.dtype)
        elif tuple(out.shape) != shape or out.dtype != self.dtype:
            raise ValueError(f"read_blocks needs a buffer of shape {shape} and dtype {self.dtype}, got "
                             f"{tuple(out.shape)} {out.dtype}")
        self.save_blocks(block_ids, out, list(range(len(block_ids))))
        return out

    def save_blocks(self, block_ids: list[int], host: torch.Tensor, rows: list[int]) -> None:
        """Row rows[i] of host [rows, layers, 2, block_size, kv_heads, head_dim] takes block block_ids[i]."""
        index, at = self._index(block_ids), self._rows(host, rows)
        _check_distinct(rows, "rows")
        if not block_ids:
            return
        if self._copier is not None and host.is_contiguous():
            self._copier.kv_copy_blocks(self._pool_list, self._pool_ptrs, index, at, self._flat(host), True)
            return
        for layer, (k_cache, v_cache) in enumerate(self.layers):
            host[:, layer, 0].index_copy_(0, at, k_cache.index_select(0, index).to(host.device))
            host[:, layer, 1].index_copy_(0, at, v_cache.index_select(0, index).to(host.device))

    def load_blocks(self, host: torch.Tensor, rows: list[int], block_ids: list[int]) -> None:
        """The inverse of save_blocks: block block_ids[i] takes row rows[i] of host."""
        index, at = self._index(block_ids), self._rows(host, rows)
        _check_distinct(block_ids, "block ids")
        if not block_ids:
            return
        if self._copier is not None and host.is_contiguous() and host.dtype == self.dtype:
            self._copier.kv_copy_blocks(self._pool_list, self._pool_ptrs, index, at, self._flat(host), False)
            return
        data = host.index_select(0, at)
        for layer, (k_cache, v_cache) in enumerate(self.layers):
            k_cache.index_copy_(0, index, data[:, layer, 0].to(self.device, self.dtype))
            v_cache.index_copy_(0, index, data[:, layer, 1].to(self.device, self.dtype))

    def _flat(self, host: torch.Tensor) -> torch.Tensor:
        return host.view(host.shape[0], 2 * len(self.layers), *self.block_shape)

    def _rows(self, host: torch.Tensor, rows: list[int]) -> torch.Tensor:
        shape = (len(self.layers), 2, *self.block_shape)
        if tuple(host.shape[1:]) != shape:
            raise ValueError(f"a host block buffer must be [rows, {', '.join(map(str, shape))}], got "
                             f"{tuple(host.shape)}")
        return _id_tensor(rows, host.shape[0], "rows", "cpu")

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """The inverse of read_blocks: data [len(block_ids), layers, 2, ...] goes into these blocks."""
        shape = (len(block_ids), len(self.layers), 2, *self.block_shape)
        if tuple(data.shape) != shape:
            raise ValueError(f"write_blocks needs data of shape {shape}, got {tuple(data.shape)}")
        self.load_blocks(data, list(range(len(block_ids))), block_ids)

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        return _id_tensor(block_ids, self.num_blocks, "block ids", self.device)


def _check_distinct(targets: list[int], what: str) -> None:
    """The copies run in parallel: two of them into one target would leave a mix of both."""
    if len(set(targets)) != len(targets):
        raise ValueError(f"{what} to copy into must be distinct, got {targets}")


def _id_tensor(ids: list[int], bound: int, what: str, device) -> torch.Tensor:
    """ids as an int64 tensor, once each is in [0, bound) (checked on the list: no tensor reductions)."""
    if ids and (min(ids) < 0 or max(ids) >= bound):
        raise ValueError(f"{what} must be in [0, {bound}), got {ids}")
    return torch.tensor(ids, dtype=torch.long, device=device)
