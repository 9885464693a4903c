"""KV tier load bandwidth: the runner's loader thread alone moving 128 blocks of a model's cache from host
memory (L2) and from disk files (L3) into the pool, best of 5, nothing else running in the process.

    python scripts/kv_load_bandwidth.py /tmp/models/smol-f32 [DISK_DIR]
"""

import shutil
import sys
import time

import torch

from tokenforge.config import ModelConfig
from tokenforge.engine.messages import KVLoadJob, KVSave, KVSpill, RunnerOutput, SchedulerOutput
from tokenforge.kv.disk_store import DiskStore
from tokenforge.runner.kv_cache import KVCache
from tokenforge.runner.kv_offload import KVOffloader

NUM_BLOCKS = 128
REPEATS = 5


def main() -> None:
    config = ModelConfig.from_pretrained(sys.argv[1])
    folder = sys.argv[2] if len(sys.argv) > 2 else "/tmp/tokenforge-kv-bandwidth"
    cache = KVCache(config, 2 * NUM_BLOCKS + 44, 16, torch.float32)
    for k, v in cache.layers:
        k.normal_()
        v.normal_()
    shutil.rmtree(folder, ignore_errors=True)
    offloader = KVOffloader(cache, NUM_BLOCKS, DiskStore(folder, b"n" * 32, cache.bytes_per_block))
    keys = [i.to_bytes(32, "big") for i in range(NUM_BLOCKS)]
    ops = [KVSave(i, i) for i in range(NUM_BLOCKS)] + [KVSpill(i, keys[i], bytes(16)) for i in range(NUM_BLOCKS)]
    offloader.before_forward(SchedulerOutput(kv_ops=ops))
    written = []
    while len(written) < NUM_BLOCKS:
        out = RunnerOutput()
        offloader.collect(out, False)
        written += out.kv_spills_done
        time.sleep(0.05)
    assert all(ok for _, ok in written)
    targets = list(range(NUM_BLOCKS + 20, 2 * NUM_BLOCKS + 20))
    for tier, sources in ((2, [(2, i) for i in range(NUM_BLOCKS)]), (3, [(3, k) for k in keys])):
        best = 0.0
        for r in range(REPEATS):
            offloader.before_forward(SchedulerOutput(kv_loads=[KVLoadJob(r, targets, sources)]))
            out = RunnerOutput()
            while not out.kv_loads_done:
                offloader.collect(out, True)
            done = out.kv_loads_done[0]
            assert not done.failed
            best = max(best, done.nbytes[tier] / done.io_s[tier] / 1e9)
        print(f"L{tier} -> pool: {best:.2f} GB/s ({NUM_BLOCKS} blocks, "
              f"{NUM_BLOCKS * cache.bytes_per_block / 1e6:.0f} MB, best of {REPEATS})")
    offloader.close()


if __name__ == "__main__":
    main()
