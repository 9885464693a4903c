"""Two Ray nodes on one machine (Ray's own test cluster: a head and a worker node, each its own raylet), joined
with `ray_address` as `tokenforge serve --ray-address` does: one replica lands on each node, and greedy
output equals one engine's."""

from __future__ import annotations

import asyncio

import pytest

from tests.cluster.conftest import alive, descendants, reference, start_client, wait_until
from tests.conftest import varied_prompts
from tokenforge import LLM, SamplingParams

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def two_nodes():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "an earlier test left this process connected to Ray"

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ours = descendants()
        cluster.shutdown()
        assert wait_until(lambda: not alive(ours), 30), f"Ray processes left behind: {alive(ours)}"


def test_replicas_spread_over_two_nodes(two_nodes, llama_dir):
    client = start_client(llama_dir, num_replicas=2, ray_address=two_nodes.address)
    try:
        import ray

        infos = ray.get([actor.info.remote() for actor in client.actors().values()], timeout=30)
        assert len({info.node_id for info in infos}) == 2  # one CPU per node: one replica on each
        prompts = varied_prompts(4, seed=41)
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        outs = LLM(client=client).generate(prompt_token_ids=prompts, sampling_params=params)
        assert [o.outputs[0].token_ids for o in outs] == reference(llama_dir, prompts, params)
    finally:
        asyncio.run(client.shutdown())  # the client joined Ray, so it also disconnects from it
    assert not ray.is_initialized()
