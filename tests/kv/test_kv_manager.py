"""Block pool and KV manager bookkeeping with made-up requests: no model, no tensors."""

from tokenforge.kv import BlockPool, KVCacheManager
from tokenforge.request import Request
from tokenforge.sampling_params import SamplingParams


def _req(req_id, tokens):
    return Request(req_id, tokens, SamplingParams(), 8, frozenset())


def test_pool_lru_eviction_and_refcounts():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    assert pool.num_free_blocks == 0
    pool.register(a, (0, (1, 2)))
    pool.release([a, b])
    assert pool.num_free_blocks == 2 and pool.lookup((0, (1, 2))) == a
    pool.acquire(a)  # a cached block comes back into use
    assert pool.num_free_blocks == 1
    pool.release([a])
    assert pool.allocate(1) == [b]  # b was freed before a: least recently freed goes first
    assert pool.lookup((0, (1, 2))) == a
    assert pool.allocate(1) == [a]  # now a is taken and its prefix evicted
    assert pool.lookup((0, (1, 2))) is None


def test_prefix_reuse_shares_blocks_and_leaves_last_token():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    first = _req("a", list(range(10)))
    assert kv.allocate_slots(first, 10)
    first.num_computed_tokens = 10
    second = _req("b", list(range(10)) + [99])
    blocks, n = kv.find_cached_prefix(second)
    assert n == 8 and blocks == kv.block_tables["a"][:2]
    exact = _req("c", list(range(8)))  # fully cached prompt: its last block must be recomputed
    assert kv.find_cached_prefix(exact)[1] == 4
    assert kv.allocate_slots(second, 3, blocks)
    assert kv.block_tables["b"][:2] == kv.block_tables["a"][:2]
    assert kv.pool.ref_counts[blocks[0]] == 2
    kv.free(first)
    kv.free(second)
    assert kv.num_used_blocks == 0


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = _req("a", list(range(12)))
    assert not kv.allocate_slots(r, 12)
    assert kv.num_used_blocks == 0 and "a" not in kv.block_tables
    assert kv.allocate_slots(r, 8)
    assert kv.num_used_blocks == 2


def test_prefix_caching_off_finds_nothing():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = _req("a", list(range(9)))
    kv.allocate_slots(a, 9)
    assert kv.find_cached_prefix(_req("b", list(range(9)))) == ([], 0)


def test_chained_keys_distinguish_prefixes():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = _req("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)
    b = _req("b", [9, 9, 3, 4, 5])  # same second block, different first block
    assert kv.find_cached_prefix(b) == ([], 0)
