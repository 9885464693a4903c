"""KV tiers in the engine on a tiny checkpoint: greedy outputs are token-identical with tiers off, host memory
only, and host memory + disk on a workload whose pool is far too small for it (so blocks are evicted and
loaded back), with chunked prefill after partial hits, preemption, speculative decoding and aborts during a
load; every tier's accounting ends clean. A second engine on the same folder hits the first one's blocks;
damaged, foreign and unwritable disks are detected and recomputed with the same output.
"""

from __future__ import annotations

import errno
import logging
import subprocess
import time

import pytest

from tests.conftest import varied_prompts
from tokenforge.engine.engine import LLMEngine
from tokenforge.kv.block_file import HEADER_SIZE
from tokenforge.kv.block_hash import kv_namespace
from tokenforge.kv.disk_store import DiskStore
from tokenforge.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
POOL = dict(num_blocks=24, block_size=4, max_num_batched_tokens=64)  # ~2 requests' worth of blocks
BLOCK_BYTES = 2048  # the tiny llama: 2 layers x (K, V) x 4 tokens x 2 heads x 16 dims x 4 bytes


def _workload() -> list[list[int]]:
    """Prompts that share prefixes (partial hits) and are sent twice (whole hits after eviction)."""
    base = varied_prompts(6, seed=21, lo=24, hi=56)
    shared = [base[0][:20] + p[1:12] for p in base[1:4]]
    return base + shared


def _run(engine: LLMEngine, prompts: list[list[int]], rounds: int = 2, tag: str = "") -> dict[str, list[int]]:
    outs = {}
    for r in range(rounds):
        for i, p in enumerate(prompts):
            engine.add_request(f"{tag}{r}-{i}", prompt_token_ids=p, params=GREEDY)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outs[out.req_id.removeprefix(tag)] = out.outputs[0].token_ids
    return outs


def _assert_clean(engine: LLMEngine) -> None:
    """No leaked blocks, pins, jobs or slots, in any tier."""
    s, tiers = engine.scheduler, engine.kv.tiers
    assert engine.kv.num_used_blocks == 0 and not s.loading and not s._load_jobs and not s._orphan_loads
    if tiers is None:
        return
    assert tiers.num_jobs == 0
    for index in (tiers.host, tiers.disk):
        if index is not None:
            assert all(e.pins == 0 for e in index.entries.values())
    assert len(tiers.host) + len(tiers.host.free_slots) == tiers.host.capacity
    assert len(set(e.slot for e in tiers.host.entries.values())) == len(tiers.host)


def _close_and_check_disk(engine: LLMEngine, folder) -> None:
    """After close every write has landed: the files are exactly the disk index's keys."""
    engine.close()
    tiers = engine.kv.tiers
    files = {p.stem for p in folder.glob("*/*/*.kvb")}
    assert files == {k.hex() for k in tiers.disk.entries}


@pytest.fixture(scope="module")
def reference(llama_dir):
    """Tiers off, a roomy pool: the outputs every other configuration must reproduce."""
    engine = LLMEngine.from_args(str(llama_dir), max_num_batched_tokens=64)
    return _run(engine, _workload())


MODES = {
    "tiers-off": dict(),
    "host": dict(kv_offload_memory=64 * BLOCK_BYTES),
    "host-auto-policy": dict(kv_offload_memory=64 * BLOCK_BYTES, kv_load_policy="auto"),
    "host-write-through": dict(kv_offload_memory=64 * BLOCK_BYTES, kv_write_through=True),
    "host+disk": dict(kv_offload_memory=8 * BLOCK_BYTES, disk=True),
    "host+disk-chunked": dict(kv_offload_memory=8 * BLOCK_BYTES, disk=True, max_num_batched_tokens=7),
    "host+disk-preempt": dict(kv_offload_memory=8 * BLOCK_BYTES, disk=True, num_blocks=16),
    "host+disk-ngram": dict(kv_offload_memory=8 * BLOCK_BYTES, disk=True, speculative="ngram"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_outputs_are_identical_with_every_tier_setup(llama_dir, reference, tmp_path, mode):
    args = {**POOL, "kv_load_policy": "always", **MODES[mode]}
    if args.pop("disk", False):
        args["kv_disk_dir"] = str(tmp_path)
    engine = LLMEngine.from_args(str(llama_dir), **args)
    assert _run(engine, _workload()) == reference
    _assert_clean(engine)
    stats = engine.stats()
    if mode != "tiers-off":
        assert stats["kv_tier2_hits"] + stats["kv_tier3_hits"] > 0
        assert stats["kv_tier2_bytes_loaded"] + stats["kv_tier3_bytes_loaded"] > 0
    if "kv_disk_dir" in args:
        assert stats["kv_tier3_hits"] > 0 and stats["kv_tier3_bytes_loaded"] > 0
        _close_and_check_disk(engine, tmp_path)
    if mode.endswith("preempt"):
        assert engine.scheduler.num_preemptions > 0


def _slow_loads(engine: LLMEngine, seconds: float) -> None:
    load = engine.runner.offloader._load

    def slow(job, submitted):
        time.sleep(seconds)
        return load(job, submitted)

    engine.runner.offloader._load = slow


def test_aborts_during_a_load_and_everyone_else_unaffected(llama_dir, reference, tmp_path):
    engine = LLMEngine.from_args(str(llama_dir), **POOL, kv_load_policy="always",
                                 kv_offload_memory=8 * BLOCK_BYTES, kv_disk_dir=str(tmp_path))
    prompts = _workload()
    _run(engine, prompts, rounds=1, tag="warm-")
    _slow_loads(engine, 0.05)
    for i, p in enumerate(prompts):
        engine.add_request(f"1-{i}", prompt_token_ids=p, params=GREEDY)
    aborted, outs = set(), {}
    while engine.has_unfinished_requests():
        for req_id in list(engine.scheduler.loading)[:1]:  # abort whoever is loading, at most one per step
            if len(aborted) < 2:
                engine.abort_request(req_id)
                aborted.add(req_id)
        for out in engine.step():
            if out.finished:
                outs[out.req_id] = out.outputs[0].token_ids
    assert len(aborted) == 2 and not aborted & set(outs)
    assert outs == {k: v for k, v in reference.items() if k.startswith("1-") and k not in aborted}
    _assert_clean(engine)


@pytest.mark.parametrize("num_blocks", [24, 400])  # evicting all along, or holding everything until shutdown
def test_a_restarted_engine_hits_the_last_ones_blocks_on_disk(llama_dir, reference, tmp_path, num_blocks):
    args = dict(**{**POOL, "num_blocks": num_blocks}, kv_offload_memory=8 * BLOCK_BYTES, kv_disk_dir=str(tmp_path))
    first = LLMEngine.from_args(str(llama_dir), **args)
    prompts = _workload()
    assert _run(first, prompts, rounds=1) == {k: v for k, v in reference.items() if k.startswith("0-")}
    _close_and_check_disk(first, tmp_path)
    second = LLMEngine.from_args(str(llama_dir), **args)
    assert len(second.kv.tiers.disk) > 0
    assert _run(second, prompts, rounds=1) == {k: v for k, v in reference.items() if k.startswith("0-")}
    stats = second.stats()
    assert stats["kv_tier3_hits"] > 0 and stats["kv_tier3_bytes_loaded"] > 0
    if num_blocks == 400:  # every full prompt block was flushed at shutdown and is found again
        assert stats["kv_tier3_misses"] == 0
    _assert_clean(second)


def _damage(folder, elsewhere) -> None:
    """Flip a payload byte in one file, cut another short, replace a third with another model's block."""
    files = sorted(folder.glob("*/*.kvb"))
    assert len(files) >= 3
    data = bytearray(files[0].read_bytes())
    data[HEADER_SIZE + 7] ^= 0xFF
    files[0].write_bytes(bytes(data))
    files[1].write_bytes(files[1].read_bytes()[:-100])
    other = DiskStore(elsewhere, kv_namespace("another-model", "torch.float32", 4), BLOCK_BYTES)
    key = bytes.fromhex(files[2].stem)
    other.write(key, bytes(16), bytes(BLOCK_BYTES))
    files[2].write_bytes(other.path(key).read_bytes())


def test_damaged_and_foreign_files_are_recomputed_with_the_same_output(llama_dir, reference, tmp_path):
    args = dict(**POOL, kv_offload_memory=8 * BLOCK_BYTES, kv_disk_dir=str(tmp_path / "kv"), kv_load_policy="always")
    first = LLMEngine.from_args(str(llama_dir), **args)
    _run(first, _workload(), rounds=1)
    _close_and_check_disk(first, tmp_path / "kv")
    _damage(tmp_path / "kv" / first.kv.namespace.hex()[:16], tmp_path / "other")
    second = LLMEngine.from_args(str(llama_dir), **args)
    # the truncated and the foreign file fail their header checks at start-up; the flipped byte at its load
    assert _run(second, _workload(), rounds=1) == {k: v for k, v in reference.items() if k.startswith("0-")}
    _assert_clean(second)
    assert second.stats()["kv_tier_blocks_failed"] >= 1  # the flipped byte, found when loaded
    assert second.runner.offloader.disk.num_rejected >= 1


def test_a_failing_disk_degrades_to_host_memory_with_one_warning(llama_dir, reference, tmp_path, monkeypatch,
                                                                  caplog):
    def full(self, key, owner, payload):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DiskStore, "write", full)
    engine = LLMEngine.from_args(str(llama_dir), **POOL, kv_load_policy="always",
                                 kv_offload_memory=64 * BLOCK_BYTES, kv_disk_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert _run(engine, _workload()) == reference
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    stats = engine.stats()
    assert not stats["kv_tier3_writable"] and stats["kv_tier3_blocks"] == 0 and stats["kv_tier2_hits"] > 0
    _assert_clean(engine)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 48 KiB tmpfs (room for ~20 block files), where the machine lets us mount one."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_degrades_with_the_same_output(llama_dir, reference, tiny_tmpfs):
    engine = LLMEngine.from_args(str(llama_dir), **POOL, kv_load_policy="always",
                                 kv_offload_memory=8 * BLOCK_BYTES, kv_disk_dir=str(tiny_tmpfs))
    assert _run(engine, _workload()) == reference
    assert not engine.stats()["kv_tier3_writable"]  # the bound (50 GiB) is far above what the disk holds
    _assert_clean(engine)
    engine.close()


def test_an_unwritable_folder_degrades_at_start_up(llama_dir, reference, tmp_path, caplog):
    (tmp_path / "file").write_text("a file, not a folder")
    with caplog.at_level(logging.WARNING):
        engine = LLMEngine.from_args(str(llama_dir), **POOL, kv_load_policy="always",
                                     kv_offload_memory=8 * BLOCK_BYTES, kv_disk_dir=str(tmp_path / "file" / "kv"))
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert engine.kv.tiers.disk is None and engine.runner.offloader.disk is None
    assert _run(engine, _workload()) == reference
    _assert_clean(engine)


def test_a_size_bound_keeps_the_disk_within_it(llama_dir, reference, tmp_path):
    bound = 10 * (HEADER_SIZE + BLOCK_BYTES)
    engine = LLMEngine.from_args(str(llama_dir), **POOL, kv_load_policy="always", kv_disk_size=bound,
                                 kv_offload_memory=8 * BLOCK_BYTES, kv_disk_dir=str(tmp_path))
    assert _run(engine, _workload()) == reference
    _close_and_check_disk(engine, tmp_path)
    assert sum(p.stat().st_size for p in tmp_path.glob("*/*/*.kvb")) <= bound


def test_a_bf16_cache_goes_through_both_tiers_and_a_restart(llama_dir, tmp_path, pin_plans):
    # A block loaded from a tier was computed in another step than its recomputation in the reference run,
    # and rounding K and V to bf16 can turn a last-bit difference between the two into a flipped token.
    # So every step here gives each row the same sums whatever the batch: at most 16 rows (one tile of the
    # panel kernel, or the bf16 dot product for bf16 weights on a CPU with one; a measured plan may hand more
    # rows to oneDNN, whose sums depend on the batch).
    from tokenforge.matmul_plan import MatmulPlan

    row_kernel = lambda cands: next((MatmulPlan.single(p) for p in ("panel", "bf16_dot") if p in cands), None)
    pin_plans(row_kernel)
    args = dict(**{**POOL, "max_num_batched_tokens": 16}, dtype="bfloat16", kv_load_policy="always")
    want = _run(LLMEngine.from_args(str(llama_dir), **args), _workload())
    tiers = dict(kv_offload_memory=8 * BLOCK_BYTES // 2, kv_disk_dir=str(tmp_path))  # bf16: half the bytes
    first = LLMEngine.from_args(str(llama_dir), **args, **tiers)
    assert _run(first, _workload()) == want
    _close_and_check_disk(first, tmp_path)
    second = LLMEngine.from_args(str(llama_dir), **args, **tiers)
    assert _run(second, _workload()) == want and second.stats()["kv_tier3_hits"] > 0
    _assert_clean(second)
