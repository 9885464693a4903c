"""A fixed pool of KV blocks: reference counts, a free list in LRU order, and the prefix-cache index.

A full block is indexed by its stable content key (`block_hash.block_key`). A freed block keeps its key and
stays findable until a new allocation takes it from the front of the free list, so cached prefixes are
evicted least-recently-freed first and only when free blocks run out. An eviction calls `on_evict` (if
set) with the block and the key it held, before the block is handed out again: the place where a lower
tier can take the block's content, or a router learn that the prefix is gone. Indexing a block calls
`on_store` (if set) with the block and its new key: how a router learns that the prefix is here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from tokenforge.kv.block_hash import BlockKey

EvictHook = Callable[[int, BlockKey], None]
StoreHook = Callable[[int, BlockKey], None]


class BlockPool:
    def __init__(self, num_blocks: int, on_evict: EvictHook | None = None, on_store: StoreHook | None = None):
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.on_evict = on_evict
        self.on_store = on_store
        self.ref_counts = [0] * num_blocks
        self.keys: list[BlockKey | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockKey, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take n blocks from the front of the free list, evicting whatever prefix they still held."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            key = self.keys[block_id]
            if key is not None:
                del self._cached[key]
                self.keys[block_id] = None
                if self.on_evict is not None:
                    self.on_evict(block_id, key)
            self.ref_counts[block_id] = 1
            blocks.append(block_id)
        return blocks

    def lookup(self, key: BlockKey) -> int | None:
        return self._cached.get(key)

    def acquire(self, block_id: int) -> None:
        """Share a cached block with one more request."""
        if self.ref_counts[block_id] == 0:
            del self._free[block_id]
        self.ref_counts[block_id] += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; unreferenced ones go to the back of the free list in this order."""
        for block_id in block_ids:
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._free[block_id] = None
            elif self.ref_counts[block_id] < 0:
                raise RuntimeError(f"KV block {block_id} released more often than acquired")

    def register(self, block_id: int, key: BlockKey) -> None:
        """Make a full block findable by later requests with the same prefix."""
        if self.keys[block_id] is not None or key in self._cached:
            return  # already indexed, or an identical block is (two requests computed the same prefix)
        self.keys[block_id] = key
        self._cached[key] = block_id
        if self.on_store is not None:
            self.on_store(block_id, key)

    def cached_keys(self) -> list[BlockKey]:
        """Every key findable now (a router's resync after lost events)."""
        return list(self._cached)

    def cached_blocks(self) -> list[tuple[int, BlockKey]]:
        """(block, key) of every indexed block: unreferenced ones least recently freed first, then those in use."""
        free = [b for b in self._free if self.keys[b] is not None]
        used = [b for b in range(self.num_blocks) if self.ref_counts[b] and self.keys[b] is not None]
        return [(b, self.keys[b]) for b in free + used]

    def free_count_if_acquired(self, block_ids: list[int]) -> int:
        """Free blocks left after acquiring these cached blocks (those unreferenced leave the free list)."""
        return len(self._free) - sum(1 for b in block_ids if self.ref_counts[b] == 0)
