"""The runner's side of the KV tiers: it owns the bytes below the block pool and moves them as the step's
`SchedulerOutput` says (`kv/tiers.py` decides what and where; nothing is decided here).

- L2 is one host tensor of `num_host_blocks` slots, allocated once (pinned on CUDA), so its budget is
  exact and a save is one copy (on a CPU, one memcpy per block and layer: `KVCache.save_blocks`). Saves
  run on the stepping thread before the forward pass, since the pass overwrites the evicted blocks;
  write-through saves run after it, once the blocks are full.
- L3 is a `DiskStore`. A spill copies the slot's bytes out at once (the slot may be reused in the same
  step) and a writer thread writes the file, reporting each write as done or failed.
- Loads run on a loader thread: host slots or verified files are copied into the blocks the scheduler
  allocated for them, which no running request reads, while the engine keeps stepping. On CUDA the
  copies go through a side stream that is synchronized before the load is reported done.
Both threads use one torch thread: an op on them would otherwise start a second OpenMP team, and with more
OpenMP threads than cores every step of the engine thread slows down (see `engine/async_engine.py`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from tokenforge.engine.messages import KVDelete, KVLoadDone, KVLoadJob, KVSave, KVSpill, RunnerOutput, SchedulerOutput
from tokenforge.kv.disk_store import DiskStore
from tokenforge.runner.kv_cache import KVCache

logger = logging.getLogger(__name__)

HOST, DISK = 2, 3
WAIT_S = 0.05  # how long an idle step waits for a load to finish before handing control back


class KVOffloader:
    def __init__(self, kv_cache: KVCache, num_host_blocks: int, disk: DiskStore | None = None):
        self.kv_cache = kv_cache
        self.block_shape = (len(kv_cache.layers), 2, *kv_cache.block_shape)
        cuda = kv_cache.device.type == "cuda"
        # torch.empty leaves pages untouched on a CPU, so an unused budget costs no memory
        self.host = torch.empty((num_host_blocks, *self.block_shape), dtype=kv_cache.dtype, pin_memory=cuda)
        self.disk = disk if disk is not None and disk.usable else None
        self._stream = torch.cuda.Stream(kv_cache.device) if cuda else None
        self._loads: queue.Queue = queue.Queue()
        self._loaded: queue.Queue[KVLoadDone] = queue.Queue()
        self._writes: queue.Queue = queue.Queue()
        self._written: queue.Queue[tuple[bytes, bool]] = queue.Queue()
        self._num_loading = 0  # jobs submitted and not yet reported
        self._staging: torch.Tensor | None = None  # the loader's reused gather buffer
        self._disk_failed = False
        self._threads = [threading.Thread(target=self._load_loop, name="tokenforge-kv-loader", daemon=True)]
        if self.disk is not None:
            self._threads.append(threading.Thread(target=self._write_loop, name="tokenforge-kv-writer", daemon=True))
        for thread in self._threads:
            thread.start()

    # ---- on the stepping thread ---------------------------------------------------------------------
    def before_forward(self, sched: SchedulerOutput) -> None:
        """Apply the step's ops in order, then start its loads."""
        saves: list[KVSave] = []
        for op in sched.kv_ops:
            if isinstance(op, KVSave):
                saves.append(op)
                continue
            self._save(saves)  # a run of saves goes in one copy; later ops may reuse their slots
            saves = []
            if isinstance(op, KVSpill):
                self._spill(op)
            elif isinstance(op, KVDelete) and self.disk is not None:
                self._writes.put((op.key, None, None))
        self._save(saves)
        for job in sched.kv_loads:
            self._num_loading += 1
            self._loads.put((job, time.perf_counter()))

    def after_forward(self, sched: SchedulerOutput) -> None:
        self._save(sched.kv_saves_after)

    def collect(self, out: RunnerOutput, wait: bool) -> None:
        """Report the loads and disk writes finished so far; with `wait` (nothing else to do this step) wait
        a little for a load rather than spin."""
        if wait and self._num_loading and self._loaded.empty():
            try:
                out.kv_loads_done.append(self._loaded.get(timeout=WAIT_S))
            except queue.Empty:
                pass
        out.kv_loads_done.extend(_drain(self._loaded))
        self._num_loading -= len(out.kv_loads_done)
        out.kv_spills_done.extend(_drain(self._written))

    def _save(self, saves: list[KVSave]) -> None:
        """One copy for a run of saves. A slot saved twice in the run (its block was evicted from host memory
        again within the step, with nowhere to spill) takes the later block only."""
        if saves:
            last = {s.slot: s.block_id for s in saves}
            self.kv_cache.save_blocks(list(last.values()), self.host, list(last))

    def _spill(self, op: KVSpill) -> None:
        if self.disk is None or self._disk_failed:
            self._written.put((op.key, False))
            return
        payload = self.host[op.slot].view(torch.uint8).numpy().tobytes()  # a copy: the slot is free for reuse
        self._writes.put((op.key, op.owner, payload))

    def close(self, flush: list[KVSpill | KVDelete] | None = None) -> None:
        """Apply the last ops (the shutdown's flush to disk), finish every write and stop the threads."""
        self.before_forward(SchedulerOutput(kv_ops=flush or []))
        for q in (self._loads, self._writes):
            q.put(None)
        for thread in self._threads:
            thread.join()

    # ---- on the loader thread -----------------------------------------------------------------------
    def _load_loop(self) -> None:
        torch.set_num_threads(1)  # this thread's own setting: the stepping thread keeps its team
        while (item := self._loads.get()) is not None:
            job, submitted = item
            try:
                self._loaded.put(self._load(job, submitted))
            except Exception:  # a bug, not a bad file: fail the job (recomputed) rather than hang its request
                logger.exception("KV load failed")
                self._loaded.put(KVLoadDone(job.job_id, list(range(len(job.block_ids))), {}, {},
                                            time.perf_counter() - submitted))

    def _load(self, job: KVLoadJob, submitted: float) -> KVLoadDone:
        """Host slots go straight into their blocks on a CPU (through a pinned staging copy on CUDA); files
        are read into a reused staging tensor (fresh memory would cost a page fault per 4 KiB), then written."""
        failed, nbytes, io_s = [], {HOST: 0, DISK: 0}, {HOST: 0.0, DISK: 0.0}
        host_rows = [i for i, (tier, _) in enumerate(job.sources) if tier == HOST]
        staged: list[int] = []  # the sources whose bytes sit in staging rows 0, 1, ...
        staging = self._staging_rows(len(job.block_ids))
        start = time.perf_counter()
        if host_rows and self._stream is None:
            self.kv_cache.load_blocks(self.host, [job.sources[i][1] for i in host_rows],
                                      [job.block_ids[i] for i in host_rows])
        elif host_rows:
            torch.index_select(self.host, 0, torch.tensor([job.sources[i][1] for i in host_rows]),
                               out=staging[:len(host_rows)])
            staged += host_rows
        io_s[HOST] = time.perf_counter() - start
        nbytes[HOST] = len(host_rows) * self.kv_cache.bytes_per_block
        for i, (tier, key) in enumerate(job.sources):
            if tier != DISK:
                continue
            start = time.perf_counter()
            view = staging[len(staged)].view(torch.uint8).numpy().data.cast("B")
            if self.disk is None or self.disk.read(key, out=view) is None:
                failed.append(i)
                continue
            staged.append(i)
            io_s[DISK] += time.perf_counter() - start
            nbytes[DISK] += self.disk.payload_bytes
        if staged:
            start = time.perf_counter()
            self._write([job.block_ids[i] for i in staged], staging[:len(staged)])
            seconds = time.perf_counter() - start  # the copy into the pool, shared by the staged tiers by bytes
            staged_host = sum(1 for i in staged if job.sources[i][0] == HOST) * self.kv_cache.bytes_per_block
            for tier, share in ((HOST, staged_host), (DISK, nbytes[DISK])):
                io_s[tier] += seconds * share / max(1, staged_host + nbytes[DISK])
        return KVLoadDone(job.job_id, failed, nbytes, io_s, time.perf_counter() - submitted)

    def _staging_rows(self, n: int) -> torch.Tensor:
        if self._staging is None or self._staging.shape[0] < n:
            self._staging = torch.empty((max(n, 64), *self.block_shape), dtype=self.kv_cache.dtype)
        return self._staging

    def _write(self, block_ids: list[int], data: torch.Tensor) -> None:
        if self._stream is None:
            self.kv_cache.write_blocks(block_ids, data)
            return
        with torch.cuda.stream(self._stream):
            self.kv_cache.write_blocks(block_ids, data.pin_memory())
        self._stream.synchronize()

    # ---- on the writer thread -----------------------------------------------------------------------
    def _write_loop(self) -> None:
        while (item := self._writes.get()) is not None:
            key, owner, payload = item
            if payload is None:
                self.disk.delete(key)
                continue
            try:
                self.disk.write(key, owner, payload)
                self._written.put((key, True))
            except OSError as e:
                if not self._disk_failed:
                    logger.warning("KV disk tier: writing to %s failed (%s); continuing with host memory only",
                                   self.disk.dir, e.strerror or e)
                self._disk_failed = True
                self._written.put((key, False))


def _drain(q: queue.Queue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
