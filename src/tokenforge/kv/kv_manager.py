"""The scheduler's only door to the KV cache: per-request block tables, prefix lookup, allocation, freeing,
and, with lower tiers (`kv/tiers.py`), the lookup below L1 and the blocks that loads fill."""

from __future__ import annotations

from tokenforge.kv.block_hash import NO_OWNER, BlockKey, block_key, owner_of
from tokenforge.kv.block_pool import BlockPool, EvictHook
from tokenforge.kv.tiers import KVTiers
from tokenforge.request import Request


class KVCacheManager:
    """`namespace` roots every key chain (see `block_hash.kv_namespace`); `on_evict` is the pool's hook;
    `tiers` (optional) takes evicted blocks and serves lookups below the pool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 namespace: BlockKey = b"", on_evict: EvictHook | None = None, tiers: KVTiers | None = None):
        self.pool = BlockPool(num_blocks, self._evicted)
        self.on_evict = on_evict
        self.tiers = tiers if enable_prefix_caching else None
        self._owners = [NO_OWNER] * num_blocks  # the owner (tenant) of each indexed block, for tier quotas
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.namespace = namespace
        self.block_tables: dict[str, list[int]] = {}
        self._num_registered: dict[str, int] = {}  # leading full blocks of the request already indexed
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found in the cache

    def block_keys(self, req: Request, num_blocks: int) -> list[BlockKey]:
        """Keys of the request's first `num_blocks` full blocks, computed once and kept on the request."""
        keys, bs = req.block_hashes, self.block_size
        if num_blocks * bs > req.num_tokens:
            raise ValueError(f"request {req.req_id} has {req.num_tokens} tokens, not {num_blocks} full blocks")
        while len(keys) < num_blocks:
            i = len(keys)
            salt = req.cache_salt if i == 0 else None
            keys.append(block_key(keys[-1] if keys else self.namespace, req.all_token_ids[i * bs:(i + 1) * bs], salt))
        return keys

    def find_cached_prefix(self, req: Request) -> tuple[list[int], int]:
        """Cached blocks holding the request's leading tokens, and how many tokens they cover.

        The last token is always left to compute, since its logits are needed to sample.
        """
        if not self.enable_prefix_caching:
            return [], 0
        blocks = []
        for key in self.block_keys(req, (req.num_tokens - 1) // self.block_size):
            block_id = self.pool.lookup(key)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks, len(blocks) * self.block_size

    def plan_load(self, req: Request, num_l1_blocks: int, first: bool) -> list[tuple[BlockKey, int]]:
        """The (key, tier) of the blocks after the L1 prefix worth loading from lower tiers (none without
        tiers). The last token is always left to compute, as in `find_cached_prefix`."""
        if self.tiers is None:
            return []
        num_blocks = (req.num_tokens - 1) // self.block_size
        return self.tiers.plan_load(self.block_keys(req, num_blocks), num_l1_blocks, num_blocks, first)

    def allocate_for_load(self, req: Request, cached_blocks: list[int], num_blocks: int) -> list[int] | None:
        """Share the cached blocks and take num_blocks more for a load to fill; these stay out of the prefix
        index until `finish_load` (nobody may read them before). None, changing nothing, when the pool is short."""
        if num_blocks > self.pool.free_count_if_acquired(cached_blocks):
            return None
        for block_id in cached_blocks:
            self.pool.acquire(block_id)
        new = self.pool.allocate(num_blocks)
        self.block_tables[req.req_id] = list(cached_blocks) + new
        self._num_registered[req.req_id] = len(cached_blocks)
        return new

    def finish_load(self, req: Request, num_loaded: int) -> None:
        """The first num_loaded blocks after the request's indexed ones now hold their keys' content."""
        done = self._num_registered.get(req.req_id, 0) + num_loaded
        self._register_full_blocks(req, done * self.block_size)

    def cached_blocks(self) -> list[tuple[int, BlockKey, bytes]]:
        """(block, key, owner) of every block L1 indexes, least recently used first (for a shutdown's flush)."""
        return [(b, key, self._owners[b]) for b, key in self.pool.cached_blocks()]

    def release_blocks(self, block_ids: list[int]) -> None:
        """Drop blocks held apart from any request (a finished load whose request was aborted)."""
        self.pool.release(block_ids)

    def _evicted(self, block_id: int, key: BlockKey) -> None:
        if self.tiers is not None:
            self.tiers.on_evict(block_id, key, self._owners[block_id])
        if self.on_evict is not None:
            self.on_evict(block_id, key)

    def allocate_slots(self, req: Request, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Make room for num_new_tokens after req.num_computed_tokens (or after cached_blocks for a new
        request). Returns False, changing nothing, when the pool is too small."""
        table = self.block_tables.get(req.req_id, [])
        cached_blocks = cached_blocks or []
        num_computed = len(cached_blocks) * self.block_size if cached_blocks else req.num_computed_tokens
        num_needed = -(-(num_computed + num_new_tokens) // self.block_size) - len(table) - len(cached_blocks)
        if max(num_needed, 0) > self.pool.free_count_if_acquired(cached_blocks):
            return False
        for block_id in cached_blocks:
            self.pool.acquire(block_id)
        table = table + cached_blocks + (self.pool.allocate(num_needed) if num_needed > 0 else [])
        self.block_tables[req.req_id] = table
        self._register_full_blocks(req, num_computed + num_new_tokens)
        return True

    def _register_full_blocks(self, req: Request, num_tokens: int) -> None:
        """Index blocks that will be full of known tokens once this step has written num_tokens tokens."""
        if not self.enable_prefix_caching:
            return
        start = self._num_registered.get(req.req_id, 0)
        end = min(num_tokens, req.num_tokens) // self.block_size
        if end <= start:
            return
        table, keys = self.block_tables[req.req_id], self.block_keys(req, end)
        owner = owner_of(req.cache_salt)
        write_through = self.tiers is not None and self.tiers.config.write_through
        for i in range(start, end):
            self.pool.register(table[i], keys[i])
            if self.pool.keys[table[i]] == keys[i]:  # indexed now (not a duplicate of a block indexed before)
                self._owners[table[i]] = owner
                if write_through:
                    self.tiers.on_full(table[i], keys[i], owner)
        self._num_registered[req.req_id] = end

    def free(self, req: Request, hold: frozenset[int] = frozenset()) -> None:
        """Release the request's blocks, tail first, so a shared prefix outlives the request's own suffix;
        blocks in `hold` (a load still writing into them) are left for `release_blocks`."""
        table = self.block_tables.pop(req.req_id, [])
        self._num_registered.pop(req.req_id, None)
        self.pool.release([b for b in table[::-1] if b not in hold])

    def record_prefix_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_tokens

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks
