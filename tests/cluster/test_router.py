"""Routing decisions against a made-up index, and the index's healing: no Ray, no model."""

from tokenforge.cluster.messages import KVEvents
from tokenforge.cluster.router import (
    KVAwareRouter,
    KVIndex,
    LeastLoadedRouter,
    ReplicaView,
    RoundRobinRouter,
    make_router,
)
from tokenforge.kv.block_hash import kv_namespace, prefix_keys

NS = kv_namespace("model", "torch.float32", 4)
SYSTEM_A = list(range(100, 132))  # 8 blocks of 4
SYSTEM_B = list(range(200, 232))


def keys(tokens):
    return prefix_keys(NS, tokens, 4)


def idle(*ids):
    return [ReplicaView(i, 0, 0) for i in ids]


def test_round_robin_and_least_loaded():
    rr = RoundRobinRouter()
    assert [rr.choose(idle(0, 1, 2), [], 0.0) for _ in range(4)] == [0, 1, 2, 0]
    views = [ReplicaView(0, 3, 10), ReplicaView(1, 1, 40), ReplicaView(2, 1, 5)]
    assert LeastLoadedRouter().choose(views, [], 0.0) == 2


def test_kv_aware_goes_where_the_prefix_is():
    index = KVIndex()
    index.apply(1, KVEvents(1, stored=keys(SYSTEM_A)))
    index.apply(0, KVEvents(1, stored=keys(SYSTEM_B)))
    router = KVAwareRouter(index)
    assert router.choose(idle(0, 1), keys(SYSTEM_A + [1, 2, 3, 4]), 0.0) == 1
    assert router.last_overlap == 8
    assert router.choose(idle(0, 1), keys(SYSTEM_B + [5, 6, 7, 8]), 0.0) == 0


def test_kv_aware_weighs_active_decode_blocks_against_prefill_saved():
    def router(weight):
        index = KVIndex()
        index.apply(1, KVEvents(1, stored=keys(SYSTEM_A)[:2]))  # replica 1 holds 2 of the 8 blocks
        return KVAwareRouter(index, prefill_weight=weight)

    views = [ReplicaView(0, 1, 2), ReplicaView(1, 1, 5)]
    # cost on 1: 6 uncached + 5 active = 11; on 0: 8 uncached + 2 active = 10
    assert router(1.0).choose(views, keys(SYSTEM_A), 0.0) == 0
    # a heavier prefill weight makes the saved prefill count more: 2x6 + 5 = 17 < 2x8 + 2 = 18
    assert router(2.0).choose(views, keys(SYSTEM_A), 0.0) == 1


def test_kv_aware_falls_back_to_load_when_badly_imbalanced():
    def choose(views):
        index = KVIndex()
        index.apply(1, KVEvents(1, stored=keys(SYSTEM_A)))
        return KVAwareRouter(index, max_imbalance=4).choose(views, keys(SYSTEM_A), 0.0)

    assert choose([ReplicaView(0, 0, 0), ReplicaView(1, 5, 0)]) == 0  # 5 more in flight than replica 0
    assert choose([ReplicaView(0, 0, 0), ReplicaView(1, 4, 0)]) == 1  # within the allowed imbalance


def test_a_routed_prefix_is_predicted_until_its_ttl():
    index = KVIndex(ttl=5.0)
    router = KVAwareRouter(index)
    prompt = keys(SYSTEM_A)
    first = router.choose(idle(0, 1), prompt, 100.0)
    # before any event arrives, the next user of the same prefix follows the first
    assert router.choose([ReplicaView(0, 1, 8), ReplicaView(1, 1, 8)], prompt, 101.0) == first
    assert index.overlap(first, prompt, 105.5) == 8  # predicted again at 101: fresh until 106
    assert index.overlap(first, prompt, 106.5) == 0  # no event confirmed it: the prediction expired
    index.predict(first, prompt, 200.0)
    index.apply(first, KVEvents(1, stored=prompt[:3]))  # confirmed blocks outlive the ttl
    assert index.overlap(first, prompt, 300.0) == 3


def test_evictions_lost_events_and_resync():
    index = KVIndex()
    prompt = keys(SYSTEM_A)
    assert index.apply(0, KVEvents(1, stored=prompt))
    assert index.apply(0, KVEvents(2, evicted=prompt[4:5]))
    assert index.overlap(0, prompt, 0.0) == 4  # the chain is cut at the evicted block
    assert not index.apply(0, KVEvents(4, evicted=prompt[:1]))  # batch 3 was lost: the caller must resync
    assert index.overlap(0, prompt, 0.0) == 4  # a batch after a gap is not applied
    index.resync(0, 5, prompt[:2])  # the replica's snapshot, taken before batch 5
    assert index.overlap(0, prompt, 0.0) == 2 and index.num_resyncs == 1
    assert index.apply(0, KVEvents(4, evicted=prompt[:1]))  # older than the snapshot: already reflected
    assert index.overlap(0, prompt, 0.0) == 2
    assert index.apply(0, KVEvents(5, stored=prompt[2:3]))
    assert index.overlap(0, prompt, 0.0) == 3
    index.drop(0)
    assert index.overlap(0, prompt, 0.0) == 0 and index.num_keys(0) == 0


def test_make_router_names():
    index = KVIndex()
    assert isinstance(make_router("kv-aware", index), KVAwareRouter)
    try:
        make_router("random", index)
    except ValueError as e:
        assert "kv-aware" in str(e)
    else:
        raise AssertionError("an unknown router name must be refused")
