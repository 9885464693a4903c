"""Replicas on a local Ray instance, end to end: greedy output equal to one engine, KV-aware routing that finds
the prefix, aborts that reach the right replica and free its KV, a replica killed with SIGKILL or hung
mid-stream (its requests resume elsewhere: nothing lost, nothing repeated, token by token), prefill/decode
hand-off identical to one engine across the length threshold, and the HTTP server over it all."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest

from tests.cluster.conftest import collect, reference, run, start_client, wait_until
from tests.conftest import varied_prompts
from tests.server.conftest import LiveServer
from tokenforge import LLM, SamplingParams
from tokenforge.cluster.pd import PDConfig
from tokenforge.server.api import build_app

pytestmark = pytest.mark.timeout(180)

STEP_DEADLINE_S = 3.0
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def mixed(ray_instance, llama_dir):
    client = start_client(llama_dir, num_replicas=2, router="kv-aware", step_deadline=STEP_DEADLINE_S,
                          poll_timeout=0.2, failover_timeout=60)
    yield client
    asyncio.run(client.shutdown())


@pytest.fixture(scope="module")
def pd(ray_instance, llama_dir):
    client = start_client(llama_dir, pd=PDConfig(1, 1, threshold=24), router="least-loaded", poll_timeout=0.2)
    yield client
    asyncio.run(client.shutdown())


def set_step_delay(client, seconds: float) -> None:
    import ray

    ray.get([actor.set_step_delay.remote(seconds) for actor in client.actors().values()], timeout=30)


def test_replicas_give_one_engines_greedy_output(mixed, llama_dir):
    prompts = varied_prompts(6, seed=21)
    outs = LLM(client=mixed).generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference(llama_dir, prompts, GREEDY)
    assert wait_until(lambda: all_idle(mixed), 10)


def test_kv_aware_routing_sends_a_shared_prefix_where_it_is_cached(mixed):
    llm = LLM(client=mixed)
    system = varied_prompts(1, seed=22, lo=64, hi=65)[0][:64]  # 4 full blocks
    users = [system + p[1:] for p in varied_prompts(4, seed=23, lo=5, hi=9)]
    params = SamplingParams(temperature=0, max_tokens=4)
    cached = [llm.generate(prompt_token_ids=[u], sampling_params=params)[0].metrics.num_cached_tokens for u in users]
    assert cached == [0, 64, 64, 64]  # every later user found the prefix: it went to the same replica


def test_an_abort_reaches_the_right_replica_and_frees_its_kv(mixed):
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    a_prompt, b_prompt = varied_prompts(2, seed=24, lo=30, hi=31)
    set_step_delay(mixed, 0.02)

    def replica_stats(replica_id):
        return next(r for r in mixed.stats()["replicas"] if r["replica"] == replica_id)

    async def main():
        a = mixed.generate(params=long, req_id="a", prompt_token_ids=a_prompt)
        b = mixed.generate(params=long, req_id="b", prompt_token_ids=b_prompt)
        await a.__anext__()
        await b.__anext__()
        where_a, where_b = mixed.replica_of("a"), mixed.replica_of("b")
        assert where_a != where_b  # b's replica had no work: the router spread them
        await a.aclose()  # what a client disconnecting does
        for _ in range(100):
            await asyncio.sleep(0.1)
            if replica_stats(where_a).get("kv_blocks_used") == 0:
                break
        after_a, other = replica_stats(where_a), replica_stats(where_b)
        assert after_a["kv_blocks_used"] == 0 and after_a["num_running"] == 0
        assert other["num_running"] == 1 and other["kv_blocks_used"] > 0  # b runs on, untouched
        steps = after_a["num_steps"]
        await b.aclose()
        return steps

    try:
        steps = run(mixed, main(), timeout=60)
    finally:
        set_step_delay(mixed, 0)
    assert steps < 150  # a was stopped long before its 200 tokens


def _busiest(client) -> int:
    counts = {}
    for req_id in list(client._streams):
        where = client.replica_of(req_id)
        if where is not None:
            counts[where] = counts.get(where, 0) + 1
    return max(counts, key=counts.get)


def _fault_drill(client, model, fault) -> dict:
    """Six greedy streams; once each has a few tokens, `fault(client, replica_id)` strikes the busiest
    replica. Every stream must equal an undisturbed engine's, token by token; the replica comes back."""
    prompts = varied_prompts(6, seed=25)
    expected = reference(model, prompts, GREEDY)
    set_step_delay(client, 0.03)
    struck = {}
    health = []

    async def on_output(_out):
        if not struck and sum(1 for s in client._streams.values() if len(s.token_ids) >= 3) == len(prompts):
            struck["replica"] = replica = _busiest(client)
            struck["pid"] = client.health_report()["replicas"][replica]["pid"]
            fault(client, replica)

    async def watch():
        while client.health_report()["status"] == "ok":
            await asyncio.sleep(0.05)
        health.append(client.health_report())
        while client.health_report()["status"] != "ok":  # until Ray has restarted it
            await asyncio.sleep(0.2)
        health.append(client.health_report())

    async def main():
        watcher = asyncio.ensure_future(watch())
        streams = await asyncio.gather(*[collect(client, f"s{i}", p, GREEDY, on_output)
                                         for i, p in enumerate(prompts)])
        await asyncio.wait_for(watcher, 90)
        return streams

    try:
        streams = run(client, main(), timeout=150)
    finally:
        set_step_delay(client, 0)
    assert struck, "the fault never struck"
    for i, (deltas, want) in enumerate(zip(streams, expected, strict=True)):
        # nothing lost, nothing repeated, the same tokens
        assert [t for d in deltas for t in d] == want, (i, deltas, want, client.stats()["cluster"])
    degraded, recovered = health
    assert degraded["status"] == "degraded" and degraded["replicas_up"] == 1
    replica = recovered["replicas"][struck["replica"]]
    assert recovered["status"] == "ok" and replica["restarts"] >= 1 and replica["pid"] != struck["pid"]
    return client.stats()["cluster"]


def test_a_replica_killed_mid_stream_loses_no_request(mixed, llama_dir):
    before = dict(mixed.stats()["cluster"])
    after = _fault_drill(mixed, llama_dir, lambda client, replica: os.kill(
        client.health_report()["replicas"][replica]["pid"], signal.SIGKILL))
    assert after["failovers"] == before["failovers"] + 1
    assert after["resumed_requests"] > before["resumed_requests"]


def test_a_hung_replica_is_restarted_and_its_requests_resume(mixed, llama_dir):
    before = dict(mixed.stats()["cluster"])
    after = _fault_drill(mixed, llama_dir, lambda client, replica: client.actors()[replica].set_step_delay.remote(3600))
    assert after["failovers"] == before["failovers"] + 1
    assert after["resumed_requests"] > before["resumed_requests"]


def test_a_replica_added_serves_and_a_drained_one_finishes_its_requests_first(mixed, llama_dir):
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = varied_prompts(3, seed=27)
    expected = reference(llama_dir, prompts, long)

    async def main():
        new = mixed.add_replica()
        while mixed.health_report()["replicas_up"] < 3:
            await asyncio.sleep(0.2)
        set_step_delay(mixed, 0.03)
        streams = [asyncio.ensure_future(collect(mixed, f"d{i}", p, long)) for i, p in enumerate(prompts)]
        while sum(1 for i in range(3) if mixed.replica_of(f"d{i}") is not None) < 3:
            await asyncio.sleep(0.05)
        assert sorted(mixed.replica_of(f"d{i}") for i in range(3)) == sorted(mixed.actors())  # one on each
        drained = mixed.drain_replica()
        busy = [f"d{i}" for i in range(3) if mixed.replica_of(f"d{i}") == drained]
        assert drained in mixed.actors()  # still there: its request runs on
        late = await collect(mixed, "late", prompts[0], SamplingParams(temperature=0, max_tokens=2))
        results = await asyncio.gather(*streams)
        while drained in mixed.actors():
            await asyncio.sleep(0.05)
        return new, drained, busy, results, late

    try:
        new, drained, busy, results, late = run(mixed, main())
    finally:
        set_step_delay(mixed, 0)
    assert drained == new and busy  # the newest of the equally busy replicas went
    assert [[t for d in deltas for t in d] for deltas in results] == expected
    assert mixed.health_report()["replicas_total"] == 2
    assert mixed.stats()["cluster"]["scale_ups"] == mixed.stats()["cluster"]["scale_downs"] == 1


def test_prefill_decode_hand_off_is_token_identical_across_the_threshold(pd, llama_dir):
    lengths = [5, 23, 24, 25, 40, 70]  # threshold 24: the last four are prefilled on the prefill replica
    prompts = [p[:n] for p, n in zip(varied_prompts(6, seed=26, lo=70, hi=71), lengths, strict=True)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = LLM(client=pd).generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.outputs[0].token_ids for o in outs] == reference(llama_dir, prompts, params)
    cluster = pd.stats()["cluster"]
    assert cluster["pd_transfers"] == 4 and cluster["pd_transfer_blocks"] == 1 + 1 + 2 + 4
    assert cluster["pd_transfer_bytes"] > 0 and cluster["pd_transfer_seconds"] > 0
    decode = next(r for r in pd.stats()["replicas"] if r["role"] == "decode")
    assert decode["prefix_cache_hits"] == 16 * (1 + 1 + 2 + 4)  # the shipped blocks were not recomputed
    assert wait_until(lambda: all_idle(pd), 10)  # the prefill replica freed what the hand-off stopped


def all_idle(client) -> bool:
    import ray

    stats = ray.get([actor.stats.remote() for actor in client.actors().values()], timeout=10)
    return all(s["kv_blocks_used"] == 0 and s["num_running"] == 0 for s in stats)


def test_the_server_over_replicas_streams_and_reports_each_replica(mixed):
    # The last test of the module on `mixed`: the app's lifespan shuts the client down when the server stops.
    with LiveServer(build_app(mixed, "tiny", request_timeout=60)) as live:
        health = httpx.get(f"{live.url}/health", timeout=10).json()
        assert health["status"] == "ok" and health["replicas_total"] == 2
        body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        plain = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
        with httpx.stream("POST", f"{live.url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        import json

        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == plain
        metrics = httpx.get(f"{live.url}/metrics", timeout=10).text
        assert 'tokenforge_replica_num_running{replica="0",role="mixed"}' in metrics
        assert 'tokenforge_replica_up{replica="1",role="mixed"} 1.0' in metrics
        assert "tokenforge_cluster_failovers_total 2.0" in metrics
