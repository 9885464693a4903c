"""Block pool and KV manager bookkeeping with made-up requests: no model, no tensors."""

import subprocess
import sys

from tokenforge.kv import BlockPool, KVCacheManager
from tokenforge.kv.block_hash import block_key, kv_namespace
from tokenforge.request import Request
from tokenforge.sampling_params import SamplingParams

KEY = b"k" * 32


def _req(req_id, tokens, salt=None):
    return Request(req_id, tokens, SamplingParams(), 8, frozenset(), cache_salt=salt)


def test_pool_lru_eviction_refcounts_and_the_eviction_hook():
    evicted = []
    pool = BlockPool(3, on_evict=lambda block, key: evicted.append((block, key)))
    a, b, c = pool.allocate(3)
    assert pool.num_free_blocks == 0
    pool.register(a, KEY)
    pool.release([a, b])
    assert pool.num_free_blocks == 2 and pool.lookup(KEY) == a
    pool.acquire(a)  # a cached block comes back into use
    assert pool.num_free_blocks == 1
    pool.release([a])
    assert pool.allocate(1) == [b]  # b was freed before a: least recently freed goes first
    assert pool.lookup(KEY) == a and evicted == []  # b held no prefix: nothing evicted
    assert pool.allocate(1) == [a]  # now a is taken and its prefix evicted
    assert pool.lookup(KEY) is None and evicted == [(a, KEY)]


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
    keys_a, keys_b = kv.block_keys(a, 2), kv.block_keys(b, 2)
    assert kv.pool.lookup(keys_a[1]) == kv.block_tables["a"][1]
    assert keys_b[1] != keys_a[1] and kv.pool.lookup(keys_b[1]) is None  # the second key carries the first
    assert kv.find_cached_prefix(b) == ([], 0)


def test_salt_separates_tenants_and_namespace_separates_models():
    kv = KVCacheManager(num_blocks=8, block_size=2, namespace=kv_namespace("model-a", "torch.float32", 2))
    tokens = [1, 2, 3, 4, 5]
    owner = _req("a", tokens, salt="tenant-1")
    kv.allocate_slots(owner, 5)
    assert kv.find_cached_prefix(_req("same", tokens, salt="tenant-1"))[1] == 4
    assert kv.find_cached_prefix(_req("other", tokens, salt="tenant-2")) == ([], 0)
    assert kv.find_cached_prefix(_req("unsalted", tokens)) == ([], 0)
    other_model = KVCacheManager(num_blocks=8, block_size=2, namespace=kv_namespace("model-b", "torch.float32", 2))
    assert other_model.block_keys(_req("x", tokens), 2) != kv.block_keys(_req("y", tokens), 2)


def test_block_keys_are_equal_across_processes():
    ns = kv_namespace("fingerprint", "torch.bfloat16", 16)
    here = block_key(block_key(ns, range(16), "salt"), range(16, 32)).hex()
    code = ("from tokenforge.kv.block_hash import block_key, kv_namespace; "
            "ns = kv_namespace('fingerprint', 'torch.bfloat16', 16); "
            "print(block_key(block_key(ns, range(16), 'salt'), range(16, 32)).hex())")
    for seed in ("1", "2"):  # Python's own hash() differs with PYTHONHASHSEED; these keys must not
        env = {"PYTHONHASHSEED": seed, "PATH": ""}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        assert out.stdout.strip() == here
