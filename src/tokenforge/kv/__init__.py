"""The paged KV cache's bookkeeping: a pool of blocks with prefix reuse, and the scheduler's API to it."""

from tokenforge.kv.block_pool import BlockPool
from tokenforge.kv.kv_manager import KVCacheManager

__all__ = ["BlockPool", "KVCacheManager"]
