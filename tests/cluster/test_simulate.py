"""The replica simulator on made-up costs: it batches and caches like the engine (a lone request's TTFT and
ITL are the cost model's), KV-aware routing keeps shared prefixes cached where round-robin thrashes, prefill/
decode hand-offs are counted and timed; and a cost model fitted from a real engine's steps (timed here, or
logged by a serving engine) is usable."""

import argparse
import json

import pytest

from tokenforge.bench.serve import build_requests
from tokenforge.cluster.simulate import (
    CostModel,
    SimConfig,
    Simulation,
    fit_cost_model,
    fit_from_step_logs,
    make_trace,
)

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


def test_an_engine_logs_each_step_shape_and_time(llama_dir, tmp_path):
    from tokenforge.engine.engine import LLMEngine
    from tokenforge.sampling_params import SamplingParams

    engine = LLMEngine.from_args(str(llama_dir), kv_cache_memory="16MiB", step_log_dir=str(tmp_path / "log"))
    prompts = [list(range(3, 3 + n)) for n in (20, 7)]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", params=SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                           prompt_token_ids=prompt)
    while engine.has_unfinished_requests():
        engine.step()
    engine.close()
    (log,) = (tmp_path / "log").glob("steps-*.jsonl")
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(steps) == engine.num_steps == 4  # both prompts in one step, then three decode steps
    assert steps[0]["prefill"] == 27 and steps[0]["decodes"] == 0 and steps[0]["pairs"] == 20 * 10 + 7 * 3
    assert [(s["decodes"], s["context"]) for s in steps[1:]] == [(2, 21 + 8), (2, 22 + 9), (2, 23 + 10)]
    assert [s["busy"] for s in steps] == [True, True, True, False]
    assert all(s["s"] > 0 for s in steps) and steps == sorted(steps, key=lambda s: s["start"])


def test_a_cost_model_fitted_from_step_logs_recovers_their_costs(tmp_path):
    """Steps made up from a known cost, logged as an engine would (busy steps end where the next starts, 2 ms
    of hand-over later): the fit gives back the cost with the hand-over in its per-step term."""
    import random

    truth = CostModel(a=0.004, b=0.0002, c=0.001, d=0.5, e=0.3)
    rnd, lines, now = random.Random(0), [], 1000.0
    for i in range(200):
        shape = dict(prefill=rnd.choice([0, 0, 16, 200]), decodes=rnd.randint(0, 12), context=rnd.randint(0, 4000),
                     pairs=rnd.randint(0, 90000))
        took = truth.step_seconds(shape["prefill"], shape["decodes"], shape["context"], shape["pairs"])
        busy = i % 50 != 49
        lines.append(json.dumps({"start": now, "s": took, **shape, "busy": busy}))
        now += took + (0.002 if busy else 5.0)  # idle gaps between bursts are not part of any step
    (tmp_path / "steps-1.jsonl").write_text("\n".join(lines) + "\n")
    cost = fit_from_step_logs([str(tmp_path)])
    assert cost.a == pytest.approx(truth.a + 0.002, rel=0.02)
    assert (cost.b, cost.c, cost.d, cost.e) == pytest.approx((truth.b, truth.c, truth.d, truth.e), rel=0.02)
    assert "1 engines, 199 steps" in cost.source
    with pytest.raises(ValueError, match="no step logs at .*missing: no such file"):
        fit_from_step_logs([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no step logs \(steps-\*.jsonl\) in"):
        fit_from_step_logs([str(tmp_path / "empty")])


def test_a_negative_term_is_refitted_without_it_not_clamped(tmp_path):
    """Decodes and their context tokens move together (every decode attends ~800 tokens): noise can make the
    per-decode coefficient negative against a larger per-context one. The fit drops that term and refits, so
    its steps still cost what they took; clamping it to 0 after one fit would not."""
    import random

    rnd, lines, now = random.Random(1), [], 0.0
    for _ in range(400):
        decodes = rnd.randint(1, 16)
        context = decodes * 800 + rnd.randint(-30, 30)
        took = 0.008 + 0.00002 * context + rnd.gauss(0, 0.0005)  # 0.02 ms per context token, none per decode
        lines.append(json.dumps({"start": now, "s": took, "prefill": 0, "decodes": decodes, "context": context,
                                 "pairs": 0, "busy": False}))
        now += took + 1.0
    (tmp_path / "steps-1.jsonl").write_text("\n".join(lines) + "\n")
    cost = fit_from_step_logs([str(tmp_path)])
    assert min(cost.a, cost.b, cost.c, cost.d, cost.e) >= 0
    for decodes in (1, 8, 16):
        want = 0.008 + 0.02e-3 * decodes * 800
        assert cost.step_seconds(0, decodes, decodes * 800) == pytest.approx(want, rel=0.02)  # clamped: +4-7 %
