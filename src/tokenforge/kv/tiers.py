"""The scheduler's side of the KV tiers below the block pool (L1): host memory (L2) and disk (L3).

It knows which keys each tier holds (`TierIndex`: LRU order, owners, quotas, pins) and decides every move,
which the runner's offloader (`runner/kv_offload.py`) carries out from the step's `SchedulerOutput`:
- a cached block evicted from L1 is saved to L2 (`KVSave`, before the step's forward pass overwrites it),
  or, with write-through, every block is saved once it is full (after the forward pass that fills it);
- L2's victim is spilled to L3 (`KVSpill`); L3's victim is deleted (`KVDelete`); both LRU, and an owner
  (a tenant, `block_hash.owner_of`) at its quota gives up its own oldest block first;
- at admission, the keys after the L1 prefix are looked up in L2 then L3, and the leading run of found
  blocks is loaded (`KVLoadJob`) when loading is cheaper than recomputing: load seconds from the measured
  bandwidth of each tier against the measured prefill seconds per token (`TransferCosts`).
Keys are the stable chained block hashes, so a key names one content in every tier and across restarts.
"""

from __future__ import annotations

import bisect
from itertools import count

from tokenforge.config import TierConfig
from tokenforge.engine.messages import (
    KVDelete,
    KVLoadDone,
    KVLoadJob,
    KVSave,
    KVSpill,
    RunnerOutput,
    SchedulerOutput,
)
from tokenforge.kv.block_hash import BlockKey, owner_of
from tokenforge.kv.disk_store import DiskEntry
from tokenforge.kv.tier_index import TierIndex

HOST, DISK = 2, 3  # tier numbers, L1 being the block pool
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Before anything is measured: conservative bandwidths (a loaded machine's memcpy and a slow SSD).
PRIOR_BYTES_PER_S = {HOST: 2e9, DISK: 2e8}
EMA = 0.2  # weight of each new measurement
MIN_PREFILL_TOKENS = 32  # steps with fewer tokens measure per-step overhead, not prefill speed


class TransferCosts:
    """Moving averages of load bandwidth per tier and of prefill seconds per token."""

    def __init__(self):
        self.bytes_per_s = dict(PRIOR_BYTES_PER_S)
        self.s_per_token: float | None = None  # unknown until a prefill-sized step was timed

    def record_load(self, tier: int, nbytes: int, seconds: float) -> None:
        if nbytes and seconds > 0:
            self.bytes_per_s[tier] += EMA * (nbytes / seconds - self.bytes_per_s[tier])

    def record_step(self, num_tokens: int, seconds: float) -> None:
        if num_tokens >= MIN_PREFILL_TOKENS and seconds > 0:
            rate = seconds / num_tokens
            self.s_per_token = rate if self.s_per_token is None else self.s_per_token + EMA * (rate - self.s_per_token)

    def blocks_worth_loading(self, tiers: list[int], block_bytes: int, block_size: int) -> int:
        """How many of the leading found blocks to load: the run with the largest saving over recomputing
        (all of them while the prefill speed is unmeasured: on a CPU a load wins by far)."""
        if self.s_per_token is None:
            return len(tiers)
        recompute = block_size * self.s_per_token
        best, best_n, saving = 0.0, 0, 0.0
        for i, tier in enumerate(tiers):
            saving += recompute - block_bytes / self.bytes_per_s[tier]
            if saving > best:
                best, best_n = saving, i + 1
        return best_n


class TierStats:
    """Counters per tier (1-3) for the metrics: hits, misses, bytes written and loaded, load latencies."""

    def __init__(self):
        self.hits = {1: 0, HOST: 0, DISK: 0}
        self.misses = {1: 0, HOST: 0, DISK: 0}
        self.bytes_written = {HOST: 0, DISK: 0}
        self.bytes_loaded = {HOST: 0, DISK: 0}
        self.load_s = {HOST: 0.0, DISK: 0.0}  # I/O seconds, for the achieved bandwidth
        self.latency_counts = {HOST: [0] * (len(LATENCY_BUCKETS) + 1), DISK: [0] * (len(LATENCY_BUCKETS) + 1)}
        self.latency_sum = {HOST: 0.0, DISK: 0.0}
        self.blocks_failed = 0  # loads that found a missing or bad block and recomputed it

    def record_lookup(self, num_blocks: int, num_l1: int, found: list[int]) -> None:
        """One admission's walk: num_blocks looked up, the L1 prefix, then the tier of each found block."""
        queried = num_blocks
        for tier, hits in ((1, num_l1), (HOST, found.count(HOST)), (DISK, found.count(DISK))):
            self.hits[tier] += hits
            self.misses[tier] += queried - hits
            queried -= hits

    def record_latency(self, tier: int, seconds: float) -> None:
        self.latency_counts[tier][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum[tier] += seconds


class KVTiers:
    """`block_bytes`: one block in host memory; `file_bytes`: one block file on disk (0: no disk tier);
    `disk_entries`: what the disk store found at start-up, oldest first."""

    def __init__(self, config: TierConfig, block_bytes: int, block_size: int, file_bytes: int = 0,
                 disk_entries: list[DiskEntry] | None = None):
        self.config = config
        self.block_bytes = block_bytes
        self.block_size = block_size
        quotas = {owner_of(salt): size for salt, size in config.tenant_quotas}

        def quota(unit: int):
            def blocks(owner: bytes) -> int | None:
                size = quotas.get(owner, config.tenant_quota)
                return None if size is None else size // unit
            return blocks

        num_host = config.offload_memory // block_bytes
        self.host = TierIndex(num_host, quota(block_bytes), num_slots=num_host)
        self.disk = TierIndex(config.disk_size // file_bytes, quota(file_bytes)) if file_bytes else None
        self.disk_writable = self.disk is not None
        self.costs = TransferCosts()
        self.stats = TierStats()
        self._ops: list[KVSave | KVSpill | KVDelete] = []
        self._saves_after: list[KVSave] = []
        self._loads: list[KVLoadJob] = []
        self._pinned_after: list[BlockKey] = []  # write-through targets, pinned until their step is done
        self._jobs: dict[int, list[tuple[BlockKey, int]]] = {}
        self._job_ids = count()
        for entry in disk_entries or []:
            self._adopt(entry)

    def _adopt(self, entry: DiskEntry) -> None:
        """Index a file the last run left; newer files push older ones out if the bound shrank."""
        if self._make_room(self.disk, entry.owner):
            self.disk.add(entry.key, entry.owner)
        else:
            self._ops.append(KVDelete(entry.key))

    # ---- moves down ---------------------------------------------------------------------------------
    def on_evict(self, block_id: int, key: BlockKey, owner: bytes) -> None:
        """L1 is about to reuse block_id: keep its content in L2 (unless L2 has it already)."""
        if key in self.host.entries:
            self.host.touch(key)
            return
        if self._make_room(self.host, owner):
            self._ops.append(KVSave(block_id, self.host.add(key, owner).slot))
            self.stats.bytes_written[HOST] += self.block_bytes

    def on_full(self, block_id: int, key: BlockKey, owner: bytes) -> None:
        """Write-through: block_id will be full of key's tokens after this step's forward pass."""
        if key in self.host.entries:
            return
        if self._make_room(self.host, owner):
            entry = self.host.add(key, owner)
            self.host.pin(key)  # its bytes arrive after the forward pass: no op this step may spill the slot
            self._pinned_after.append(key)
            self._saves_after.append(KVSave(block_id, entry.slot))
            self.stats.bytes_written[HOST] += self.block_bytes

    def _make_room(self, tier: TierIndex, owner: bytes) -> bool:
        while True:
            victim = tier.victim(owner)
            if victim is None:
                return True
            if victim is False:
                return False
            self._evict(tier, victim)

    def _evict(self, tier: TierIndex, key: BlockKey) -> None:
        entry = tier.remove(key)
        if tier is self.disk:
            self._ops.append(KVDelete(key))
        elif self.disk_writable and key not in self.disk.entries and self._make_room(self.disk, entry.owner):
            self.disk.add(key, entry.owner, ready=False)  # offered to lookups once the runner confirms the write
            self._ops.append(KVSpill(entry.slot, key, entry.owner))

    def flush(self, l1_blocks: list[tuple[int, BlockKey, bytes]]) -> list[KVSave | KVSpill | KVDelete]:
        """At shutdown: make the disk hold what the caches hold, so the next start finds it (as far as the
        disk's bound and quotas allow). L1's cached blocks (least recently used first) pass through host
        memory as evictions do; then every host-memory block the disk lacks is spilled, newest first.
        Returns the ops for the runner."""
        if self.disk_writable:
            for block_id, key, owner in l1_blocks:
                if key not in self.disk.entries:
                    self.on_evict(block_id, key, owner)
            for key in reversed(list(self.host.entries)):
                entry = self.host.entries[key]
                if entry.pins:
                    continue
                if key not in self.disk.entries and self._make_room(self.disk, entry.owner):
                    self.disk.add(key, entry.owner, ready=False)
                    self._ops.append(KVSpill(entry.slot, key, entry.owner))
        ops, self._ops = self._ops, []
        return ops

    # ---- moves up -----------------------------------------------------------------------------------
    def plan_load(self, keys: list[BlockKey], num_l1: int, num_blocks: int, first: bool) -> list[tuple[BlockKey, int]]:
        """After an L1 prefix of num_l1 blocks, the (key, tier) of the blocks to load: the leading run found
        in L2 or L3, cut where recomputing gets cheaper. `first`: the request's first admission (counted)."""
        found = []
        for key in keys[num_l1:num_blocks]:
            tier = HOST if self.host.find(key) else DISK if self.disk is not None and self.disk.find(key) else None
            if tier is None:
                break
            found.append((key, tier))
        if first:
            self.stats.record_lookup(num_blocks, num_l1, [t for _, t in found])
        if self.config.load_policy == "always":
            return found
        return found[:self.costs.blocks_worth_loading([t for _, t in found], self.block_bytes, self.block_size)]

    def pin(self, plan: list[tuple[BlockKey, int]], pin: bool = True) -> None:
        """Keep the planned entries from eviction (the allocation for their load may evict), or let them go."""
        for key, tier in plan:
            index = self.host if tier == HOST else self.disk
            index.pin(key) if pin else index.unpin(key)

    def start_load(self, block_ids: list[int], plan: list[tuple[BlockKey, int]]) -> int:
        """Queue a load of the pinned, planned blocks into block_ids; they stay pinned until it is done."""
        job_id = next(self._job_ids)
        sources: list[tuple[int, int | bytes]] = []
        for key, tier in plan:
            index = self.host if tier == HOST else self.disk
            index.touch(key)
            sources.append((HOST, index.entries[key].slot) if tier == HOST else (DISK, key))
        self._jobs[job_id] = plan
        self._loads.append(KVLoadJob(job_id, list(block_ids), sources))
        return job_id

    # ---- the step's messages ------------------------------------------------------------------------
    def take(self, out: SchedulerOutput) -> None:
        """Move the moves decided during this schedule into its output."""
        out.kv_ops, self._ops = self._ops, []
        out.kv_saves_after, self._saves_after = self._saves_after, []
        out.kv_loads, self._loads = self._loads, []

    @property
    def num_jobs(self) -> int:
        return len(self._jobs)

    def on_output(self, sched: SchedulerOutput, result: RunnerOutput) -> list[KVLoadDone]:
        """Take the runner's answers: confirmed or failed disk writes, finished loads (returned, for the
        scheduler to resume their requests), and the step's timing for the prefill-speed estimate."""
        for key in self._pinned_after:
            self.host.unpin(key)
        self._pinned_after = []
        for key, written in result.kv_spills_done:
            self._spill_done(key, written)
        for done in result.kv_loads_done:
            self._load_done(done)
        if result.forward_s:
            self.costs.record_step(sched.num_tokens, result.forward_s)
        return result.kv_loads_done

    def _spill_done(self, key: BlockKey, written: bool) -> None:
        entry = self.disk.entries.get(key) if self.disk is not None else None
        if entry is None:
            return
        if written:
            entry.ready = True
            self.stats.bytes_written[DISK] += self.block_bytes
        else:  # a full disk or a vanished folder: keep going with host memory only (the runner warned once)
            self.disk.remove(key)
            self.disk_writable = False

    def _load_done(self, done: KVLoadDone) -> None:
        plan = self._jobs.pop(done.job_id)
        failed = set(done.failed)
        for i, (key, tier) in enumerate(plan):
            index = self.host if tier == HOST else self.disk
            index.unpin(key)
            if i in failed and key in index.entries and not index.entries[key].pins:
                index.remove(key)  # missing or bad: never offered again (the disk store deleted the file)
        self.stats.blocks_failed += len(failed)
        for tier in (HOST, DISK):
            self.stats.bytes_loaded[tier] += done.nbytes.get(tier, 0)
            self.stats.load_s[tier] += done.io_s.get(tier, 0.0)
            self.costs.record_load(tier, done.nbytes.get(tier, 0), done.io_s.get(tier, 0.0))
        self.stats.record_latency(max(t for _, t in plan), done.latency_s)

    def snapshot(self) -> dict:
        """Counters and gauges for `LLMEngine.stats()` (keys `kv_tier_*`)."""
        s = self.stats
        out = {"kv_tier_blocks_failed": s.blocks_failed}
        for tier in (1, HOST, DISK):
            out[f"kv_tier{tier}_hits"] = s.hits[tier]
            out[f"kv_tier{tier}_misses"] = s.misses[tier]
        for tier, index in ((HOST, self.host), (DISK, self.disk)):
            out[f"kv_tier{tier}_blocks"] = len(index) if index is not None else 0
            out[f"kv_tier{tier}_capacity_blocks"] = index.capacity if index is not None else 0
            out[f"kv_tier{tier}_bytes_written"] = s.bytes_written[tier]
            out[f"kv_tier{tier}_bytes_loaded"] = s.bytes_loaded[tier]
            out[f"kv_tier{tier}_load_seconds"] = s.load_s[tier]
            out[f"kv_tier{tier}_load_latency"] = (list(LATENCY_BUCKETS), list(s.latency_counts[tier]),
                                                  s.latency_sum[tier])
        out["kv_tier3_writable"] = self.disk_writable
        return out
