"""Greedy generations through the whole engine are token-identical to transformers' greedy generate,
under continuous batching, small chunk budgets, forced preemption, and prefix caching on and off."""

import pytest

from tests.conftest import ARCHS, hf_greedy, hf_model, varied_prompts
from tokenforge import LLM, SamplingParams

NUM_PROMPTS = 16
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def references(checkpoints):
    """Per architecture: the prompts and transformers' greedy continuations."""
    refs = {}
    for arch in ARCHS:
        prompts = varied_prompts(NUM_PROMPTS, seed=11, lo=3, hi=60)
        model = hf_model(checkpoints[arch])
        refs[arch] = (prompts, [hf_greedy(model, p, NEW_TOKENS) for p in prompts])
    return refs


def _generate(path, prompts, **engine_args):
    llm = LLM(str(path), **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert llm.client.engine.kv.num_used_blocks == 0
    return llm, [o.outputs[0].token_ids for o in outs]


MODES = {
    "batched": dict(),
    "chunked": dict(max_num_batched_tokens=7),
    "preempt": dict(num_blocks=20, block_size=4, max_num_batched_tokens=64),
    "no-prefix-cache": dict(enable_prefix_caching=False, max_num_batched_tokens=32),
}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_matches_transformers(checkpoints, references, arch, mode):
    prompts, want = references[arch]
    llm, got = _generate(checkpoints[arch], prompts, **MODES[mode])
    assert got == want
    if mode == "preempt":
        assert llm.client.engine.scheduler.num_preemptions > 0


def test_prefix_cache_hits_give_same_output(checkpoints, references):
    prompts, want = references["llama"]
    shared = [prompts[0][:1] + [5] * 40 + p[1:] for p in prompts[:4]]
    llm = LLM(str(checkpoints["llama"]), block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    first = llm.generate(prompt_token_ids=shared, sampling_params=params)
    again = llm.generate(prompt_token_ids=shared, sampling_params=params)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]
    assert all(o.metrics.num_cached_tokens >= 40 for o in again)
    ref = hf_model(checkpoints["llama"])
    assert again[2].outputs[0].token_ids == hf_greedy(ref, shared[2], NEW_TOKENS)
    assert llm.client.engine.kv.num_used_blocks == 0
