"""The replica simulator on made-up costs: it batches and caches like the engine (a lone request's TTFT and
ITL are the cost model's), KV-aware routing keeps shared prefixes cached where round-robin thrashes, prefill/
decode hand-offs are counted and timed; and a cost model fitted from a real engine's steps is usable."""

import argparse

import pytest

from tokenforge.bench.serve import build_requests
from tokenforge.cluster.simulate import CostModel, SimConfig, Simulation, fit_cost_model, make_trace

COST = CostModel(a=0.01, b=0.001, c=0.002, d=0.0)


def shared_prefix_trace(num_prompts=300, rate=10.0, num_prefixes=5):
    args = argparse.Namespace(dataset="shared-prefix", num_prompts=num_prompts, input_len=(8, 32), output_len=(8, 8),
                              range_ratio=0.0, seed=0, prefix_len=256, num_prefixes=num_prefixes)
    return make_trace(build_requests(args, 1000), rate, seed=0)


def test_a_lone_request_costs_what_the_model_says():
    trace = [(0.0, list(range(3, 103)), 4)]  # 100 prompt tokens, 4 output tokens
    figures = Simulation(SimConfig(num_replicas=1), COST).run(trace)
    assert figures["ttft_ms"]["median"] == pytest.approx(1000 * (0.01 + 0.001 * 100))
    assert figures["itl_ms"]["median"] == pytest.approx(1000 * (0.01 + 0.002))


def test_kv_aware_keeps_prefixes_cached_where_round_robin_thrashes():
    # 5 prefixes of 16 blocks; a replica holds 60 blocks: 3 prefixes at most, never all 5
    trace = shared_prefix_trace()
    runs = {router: Simulation(SimConfig(num_replicas=2, router=router, num_blocks=60), COST).run(trace)
            for router in ("round-robin", "kv-aware")}
    assert runs["kv-aware"]["prefix_hit_rate"] > 0.8 > 0.3 > runs["round-robin"]["prefix_hit_rate"]
    assert runs["kv-aware"]["ttft_ms"]["median"] * 2 < runs["round-robin"]["ttft_ms"]["median"]
    again = Simulation(SimConfig(num_replicas=2, router="kv-aware", num_blocks=60), COST).run(trace)
    again["simulated_in_s"] = runs["kv-aware"]["simulated_in_s"]
    assert again == runs["kv-aware"]  # deterministic: the same trace gives the same figures


def test_prefill_decode_hand_offs_are_counted_and_take_transfer_time():
    trace = [(0.0, list(range(3, 303)), 8), (0.0, list(range(3, 20)), 8)]  # one long prompt, one short
    slow = SimConfig(num_replicas=2, num_prefill=1, pd_threshold=100, bytes_per_block=1_000_000,
                     transfer_bandwidth=1e8, transfer_latency=0.0)
    fast = SimConfig(**{**vars(slow), "bytes_per_block": 0})
    slow_run, fast_run = Simulation(slow, COST).run(trace), Simulation(fast, COST).run(trace)
    assert slow_run["pd_transfers"] == fast_run["pd_transfers"] == 1
    # 18 blocks of 1 MB at 100 MB/s: the long request's second token comes 0.18 s later
    assert slow_run["itl_ms"]["p99"] - fast_run["itl_ms"]["p99"] == pytest.approx(180, abs=1)


def test_a_fitted_cost_model_is_positive_and_saved(llama_dir, tmp_path):
    cost = fit_cost_model(str(llama_dir), threads=1, kv_cache_memory="16MiB", num_requests=8)
    assert min(cost.a, cost.b, cost.c, cost.d, cost.e) >= 0 and cost.a + cost.b + cost.c > 0
    cost.save(tmp_path / "cost.json")
    assert CostModel.load(tmp_path / "cost.json") == cost


def test_fitting_under_load_pools_the_steps_of_concurrent_engines(llama_dir):
    """--fit-concurrent 2: two engines in two processes step at once and both contribute their steps."""
    alone = fit_cost_model(str(llama_dir), threads=1, kv_cache_memory="16MiB", num_requests=4)
    loaded = fit_cost_model(str(llama_dir), threads=1, kv_cache_memory="16MiB", num_requests=4, concurrent=2)
    steps = lambda c: int(c.source.rsplit(", ", 1)[1].split()[0])
    assert "2 engines at once" in loaded.source
    assert steps(alone) < steps(loaded) <= 2 * steps(alone) + 2  # the second engine's seed differs a little
    assert min(loaded.a, loaded.b, loaded.c, loaded.d, loaded.e) >= 0
