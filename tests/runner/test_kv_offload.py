"""The runner's side of the KV tiers: the step's saves land in host memory as the scheduler ordered them."""

import torch

from tests.runner.test_kv_cache import _filled
from tokenforge.engine.messages import KVSave, SchedulerOutput
from tokenforge.runner.kv_offload import KVOffloader


def test_a_slot_saved_twice_in_one_step_keeps_the_later_block():
    """With host memory full and no disk to spill to, a block saved at eviction can itself be evicted in the
    same step and its slot handed to the next one: the slot must end up with the later block, whole."""
    cache = _filled()
    offloader = KVOffloader(cache, num_host_blocks=3)
    try:
        offloader.before_forward(SchedulerOutput(kv_ops=[KVSave(1, 0), KVSave(4, 2), KVSave(2, 0), KVSave(3, 1)]))
        want = cache.read_blocks([2, 3, 4])
        assert torch.equal(offloader.host[0], want[0])
        assert torch.equal(offloader.host[1], want[1]) and torch.equal(offloader.host[2], want[2])
    finally:
        offloader.close()
