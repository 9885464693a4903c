"""The tiers' index and policy with made-up requests and a fake runner: no model, no tensors, no files."""

from tokenforge.config import SchedulerConfig, TierConfig
from tokenforge.engine.messages import KVDelete, KVLoadDone, KVSave, KVSpill, RunnerOutput
from tokenforge.engine.scheduler import Scheduler
from tokenforge.kv import KVCacheManager
from tokenforge.kv.block_hash import NO_OWNER, compose_salt, owner_of
from tokenforge.kv.disk_store import DiskEntry
from tokenforge.kv.tier_index import TierIndex
from tokenforge.kv.tiers import DISK, HOST, KVTiers, TransferCosts
from tokenforge.request import Request, RequestStatus
from tokenforge.sampling_params import SamplingParams

BS = 4  # tokens per block
BLOCK = 100  # bytes per block in host memory
FILE = 150  # bytes per block file


def _tiers(host_blocks=4, disk_blocks=0, **cfg) -> KVTiers:
    config = TierConfig(offload_memory=host_blocks * BLOCK, disk_dir="unused" if disk_blocks else None,
                        disk_size=disk_blocks * FILE, load_policy="always", **cfg)
    return KVTiers(config, BLOCK, BS, FILE if disk_blocks else 0)


def _key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def _take(tiers: KVTiers):
    from tokenforge.engine.messages import SchedulerOutput

    out = SchedulerOutput()
    tiers.take(out)
    return out


def test_index_lru_quota_and_pins():
    index = TierIndex(3, quota=lambda owner: 2 if owner == b"a" else None, num_slots=3)
    for i, owner in enumerate([b"a", b"b", b"a"]):
        assert index.victim(owner) is None
        assert index.add(_key(i), owner).slot == i
    assert index.victim(b"a") == _key(0)  # at its quota: its own oldest block goes
    index.touch(_key(1))
    index.touch(_key(0))
    assert index.victim(b"c") == _key(2)  # full: the tier's least recently used (key 1 and 0 were touched)
    index.pin(_key(2))
    assert index.victim(b"c") == _key(1)  # pinned entries are never evicted
    index.pin(_key(1))
    index.pin(_key(0))
    assert index.victim(b"c") is False
    index.unpin(_key(0))
    index.remove(_key(0))
    assert index.free_slots == [0] and index.usage(b"a") == 1 and index.add(_key(9), b"c").slot == 0


def test_evictions_go_down_the_tiers_in_order():
    tiers = _tiers(host_blocks=2, disk_blocks=2)
    for i in range(3):
        tiers.on_evict(block_id=10 + i, key=_key(i), owner=NO_OWNER)
    ops = _take(tiers).kv_ops
    # the third save needs a slot: key 0's slot is spilled to disk before key 2 is saved into it
    assert ops == [KVSave(10, 0), KVSave(11, 1), KVSpill(0, _key(0), NO_OWNER), KVSave(12, 0)]
    assert tiers.disk.find(_key(0)) is None  # offered only once the write is confirmed
    tiers.on_output(_take(tiers), RunnerOutput(kv_spills_done=[(_key(0), True)]))
    assert tiers.disk.find(_key(0)) is not None
    for i in range(3, 5):
        tiers.on_evict(20 + i, _key(i), NO_OWNER)
    # key 1 is spilled next to key 0; then key 2's spill finds the disk full: key 0 (ready, least recently
    # used) is deleted, never key 1, whose write is not confirmed yet
    assert _take(tiers).kv_ops == [KVSpill(1, _key(1), NO_OWNER), KVSave(23, 1), KVDelete(_key(0)),
                                   KVSpill(0, _key(2), NO_OWNER), KVSave(24, 0)]
    assert list(tiers.disk.entries) == [_key(1), _key(2)]
    tiers.on_evict(31, _key(4), NO_OWNER)  # already in host memory: nothing to write
    assert _take(tiers).kv_ops == []


def test_a_failed_disk_write_degrades_to_host_memory_only():
    tiers = _tiers(host_blocks=1, disk_blocks=4)
    tiers.on_evict(1, _key(1), NO_OWNER)
    tiers.on_evict(2, _key(2), NO_OWNER)
    tiers.on_output(_take(tiers), RunnerOutput(kv_spills_done=[(_key(1), False)]))
    assert not tiers.disk_writable and len(tiers.disk) == 0
    tiers.on_evict(3, _key(3), NO_OWNER)
    assert not any(isinstance(op, KVSpill) for op in _take(tiers).kv_ops)


def test_tenant_quota_keeps_one_tenant_from_flushing_the_others():
    quota = 2 * BLOCK
    tiers = _tiers(host_blocks=6, tenant_quota=quota, tenant_quotas=(("big", 4 * BLOCK),))
    quiet, loud, big = owner_of("quiet"), owner_of("loud"), owner_of("big")
    tiers.on_evict(0, _key(0), quiet)
    for i in range(1, 9):
        tiers.on_evict(i, _key(i), loud)
    assert tiers.host.usage(loud) == 2 and tiers.host.find(_key(0)) is not None  # the quiet one kept its block
    assert [k for k in tiers.host.entries if tiers.host.entries[k].owner == loud] == [_key(7), _key(8)]
    for i in range(10, 16):
        tiers.on_evict(i, _key(i), big)
    assert tiers.host.usage(big) == 4  # its own, larger quota from the keys file
    assert owner_of(compose_salt("loud", "user-1")) == loud  # a tenant's finer salts are charged to it


def test_quotas_also_bound_the_disk_and_start_up_keeps_what_fits():
    entries = [DiskEntry(_key(i), owner_of("t"), mtime=i) for i in range(5)]
    config = TierConfig(offload_memory=BLOCK, disk_dir="unused", disk_size=3 * FILE, tenant_quota=2 * FILE)
    tiers = KVTiers(config, BLOCK, BS, FILE, entries)
    assert list(tiers.disk.entries) == [_key(3), _key(4)]  # the newest the quota allows
    assert [op.key for op in _take(tiers).kv_ops] == [_key(0), _key(1), _key(2)]  # the rest are deleted


def test_load_only_when_cheaper_than_recomputing():
    costs = TransferCosts()
    assert costs.blocks_worth_loading([HOST, DISK], BLOCK, BS) == 2  # unmeasured: load
    costs.record_step(num_tokens=64, seconds=64 * 1e-3)  # 1 ms a token: 4 ms a block
    costs.bytes_per_s = {HOST: BLOCK / 1e-4, DISK: BLOCK / 1e-2}  # 0.1 ms and 10 ms a block
    assert costs.blocks_worth_loading([HOST, HOST, DISK], BLOCK, BS) == 2  # the disk block costs more
    assert costs.blocks_worth_loading([DISK, HOST, HOST, HOST, HOST], BLOCK, BS) == 5  # worth it overall
    assert costs.blocks_worth_loading([DISK], BLOCK, BS) == 0


def _req(req_id, tokens, max_tokens=2, salt=None):
    return Request(req_id, tokens, SamplingParams(max_tokens=max_tokens), max_tokens, frozenset(), cache_salt=salt)


def _sched(num_blocks=8, budget=64, tiers=None):
    tiers = tiers or _tiers(host_blocks=16)
    kv = KVCacheManager(num_blocks, BS, namespace=b"ns", tiers=tiers)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget), kv, 1000)


def _run(s, req):
    """Step a request to the end with a fake runner that finishes every load at once, nothing failed."""
    s.add_request(req)
    while s.has_unfinished_requests():
        _step(s)


def _step(s, failed=()):
    out = s.schedule()
    done = [KVLoadDone(job.job_id, list(failed), {}, {}, 0.0) for job in out.kv_loads]
    sampled = {r.req_id: [7] for r in out.requests
               if r.num_computed_tokens + r.num_new_tokens == s.requests[r.req_id].num_tokens}
    s.update_from_output(out, RunnerOutput(sampled=sampled, kv_loads_done=done))
    return out


def test_a_request_waits_for_its_load_while_others_step():
    s = _sched(num_blocks=10)
    prompt = list(range(100, 121))  # 5 full blocks, then one token
    _run(s, _req("first", prompt))
    _run(s, _req("flush", list(range(300, 337))))  # 8 blocks: the first prompt's blocks leave L1 for L2
    assert s.kv.pool.lookup(s.kv.block_keys(_req("x", prompt), 1)[0]) is None
    s.add_request(_req("decoding", [1, 2, 3], max_tokens=50))
    _step(s)
    s.add_request(_req("again", prompt))
    out = s.schedule()
    assert [r.req_id for r in out.requests] == ["decoding"]  # "again" is loading, the decode goes on
    assert len(out.kv_loads) == 1 and len(out.kv_loads[0].block_ids) == 5
    assert all(src[0] == HOST for src in out.kv_loads[0].sources)
    again = s.loading["again"]
    assert again.status == RequestStatus.WAITING_FOR_KV
    s.update_from_output(out, RunnerOutput(sampled={"decoding": [7]}))  # the load is not done yet
    out = s.schedule()
    assert "again" in s.loading and [r.req_id for r in out.requests] == ["decoding"]
    job = s._load_jobs and next(iter(s._load_jobs))
    s.update_from_output(out, RunnerOutput(sampled={"decoding": [7]},
                                           kv_loads_done=[KVLoadDone(job, [], {}, {}, 0.0)]))
    out = s.schedule()
    entry = next(r for r in out.requests if r.req_id == "again")
    assert entry.num_computed_tokens == 20 and entry.num_new_tokens == 1  # only the last token is computed
    assert again.num_cached_tokens == 20 and s.kv.tiers.stats.hits[HOST] == 5


def test_a_failed_block_is_recomputed_from_there_on():
    s = _sched(num_blocks=10)
    prompt = list(range(100, 121))
    _run(s, _req("first", prompt))
    _run(s, _req("flush", list(range(300, 337))))
    s.add_request(_req("again", prompt))
    _step(s, failed=[2, 4])  # the third and fifth blocks were bad
    out = s.schedule()
    assert out.requests[0].num_computed_tokens == 8 and out.requests[0].num_new_tokens == 13
    assert len(s.kv.tiers.host) + len(s.kv.tiers.host.free_slots) == s.kv.tiers.host.capacity
    assert s.kv.tiers.stats.blocks_failed == 2


def test_abort_during_a_load_keeps_its_blocks_until_the_load_is_done():
    s = _sched(num_blocks=10)
    prompt = list(range(100, 121))
    _run(s, _req("first", prompt))
    _run(s, _req("flush", list(range(300, 337))))
    s.add_request(_req("again", prompt))
    out = s.schedule()
    s.update_from_output(out, RunnerOutput())
    targets = out.kv_loads[0].block_ids
    s.finish_requests("again", RequestStatus.FINISHED_ABORTED)
    assert all(s.kv.pool.ref_counts[b] == 1 for b in targets)  # the loader may still be writing into them
    assert s.has_unfinished_requests()
    out = s.schedule()
    assert out.kv_wait and not out.requests
    s.update_from_output(out, RunnerOutput(kv_loads_done=[KVLoadDone(out_job(s), [], {}, {}, 0.0)]))
    assert s.kv.num_used_blocks == 0 and not s.has_unfinished_requests()
    assert all(e.pins == 0 for e in s.kv.tiers.host.entries.values())


def out_job(s) -> int:
    return next(iter(s._orphan_loads))


def test_salts_share_no_block_in_any_tier():
    s = _sched(num_blocks=10, tiers=_tiers(host_blocks=64))
    prompt = list(range(100, 121))
    _run(s, _req("a", prompt, salt="tenant-a"))
    _run(s, _req("flush", list(range(300, 337))))
    _run(s, _req("b", prompt, salt="tenant-b"))
    assert s.kv.tiers.stats.hits == {1: 0, HOST: 0, DISK: 0}
    _run(s, _req("flush2", list(range(400, 437))))
    _run(s, _req("a2", prompt, salt="tenant-a"))
    assert s.kv.tiers.stats.hits[HOST] == 5
    owners = {e.owner for e in s.kv.tiers.host.entries.values()}
    assert {owner_of("tenant-a"), owner_of("tenant-b"), NO_OWNER} <= owners


def test_write_through_saves_each_block_once_full_after_the_forward_pass():
    s = _sched(num_blocks=16, tiers=_tiers(host_blocks=16, write_through=True))
    s.add_request(_req("a", list(range(100, 110))))
    out = s.schedule()
    assert out.kv_ops == [] and [op.block_id for op in out.kv_saves_after] == s.kv.block_tables["a"][:2]
    assert all(s.kv.tiers.host.entries[k].pins == 1 for k in s.kv.tiers.host.entries)  # until the step is done
    s.update_from_output(out, RunnerOutput(sampled={"a": [7]}))
    assert all(e.pins == 0 for e in s.kv.tiers.host.entries.values())
