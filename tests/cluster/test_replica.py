"""The replica's poll protocol in-process (no Ray): batches are resent until acknowledged, so a lost reply
loses no token; KV events ride along, numbered; a resync snapshot says which batch follows it."""

import asyncio

import pytest

from tests.conftest import varied_prompts
from tokenforge.cluster.replica import EngineReplica
from tokenforge.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def replica(llama_dir):
    return EngineReplica(str(llama_dir), dict(kv_cache_memory="16MiB", num_threads=1))


def test_unacknowledged_batches_are_resent_and_events_are_numbered(replica):
    prompt = varied_prompts(1, seed=31, lo=40, hi=41)[0]  # 41 tokens: 2 full blocks of 16

    async def main():
        refused = await replica.add("r", prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        assert refused is None
        first = await replica.poll(0, 5.0)
        assert [b.seq for b in first.batches] == [1]
        second = await replica.poll(0, 5.0)  # the reply to the first poll was "lost": it comes again
        assert [b.seq for b in second.batches] == [1, 2]
        assert second.batches[0].outputs == first.batches[0].outputs
        tokens, stored, acked = [], [], 0
        batches = second.batches
        while True:
            for batch in batches:
                if batch.seq > acked:
                    acked = batch.seq
                    tokens += [t for d in batch.outputs for t in d.new_token_ids]
                    stored += batch.events.stored
                    assert batch.events.seq == batch.seq
            if len(tokens) == 6:
                break
            batches = (await replica.poll(acked, 5.0)).batches
        next_seq, keys = await replica.cached_keys()
        assert next_seq == acked + 1 and set(keys) == set(stored) and len(stored) == 2
        bad = await replica.add("bad", [], SamplingParams())
        assert "empty" in bad  # refused at once, with the engine's message
        await replica.shutdown()
        return tokens

    assert len(asyncio.run(main())) == 6
