"""What a request needs to move between engines, on two in-process engines (no Ray): resuming with the tokens
already streamed continues the text exactly (stop strings included), and a prefill's KV blocks exported from
one engine and imported into another are found by the second engine's prefix lookup, with identical output."""

import pytest

from tests.conftest import varied_prompts
from tokenforge.engine.engine import LLMEngine
from tokenforge.kv.block_hash import prefix_keys
from tokenforge.sampling_params import SamplingParams

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def engines(llama_dir):
    return [LLMEngine.from_args(str(llama_dir), kv_cache_memory="16MiB", num_threads=1) for _ in range(2)]


def run(engine, req_id, ids, params, num_resumed=0, stop_after=None):
    """(text streamed, tokens streamed, last output); with stop_after, abort after that many tokens."""
    engine.add(engine.make_request(req_id, None, params, ids, num_resumed_tokens=num_resumed))
    text, tokens, last = "", [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.outputs[0].new_text
            tokens += out.outputs[0].new_token_ids
            last = out
        if stop_after is not None and len(tokens) >= stop_after and not last.finished:
            engine.abort_request(req_id)
            engine.step()
            break
    return text, tokens, last


def remaining(params, n):
    return SamplingParams(**{**vars(params), "max_tokens": params.max_tokens - n})


@pytest.mark.parametrize("cut", [1, 5, 13])
def test_a_resumed_request_continues_text_and_tokens_exactly(engines, cut):
    first, second = engines
    prompt = varied_prompts(1, seed=11, lo=20, hi=21)[0]
    plain = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    ref_text, ref_tokens, _ = run(first, "ref", prompt, plain)
    stop = ref_text[len(ref_text) * 2 // 3:][:3]  # a stop string late in the text, across tokens or not
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, stop=[stop])
    full_text, full_tokens, full_last = run(first, "full", prompt, params)
    assert full_last.outputs[0].finish_reason == "stop" and full_text == ref_text[:ref_text.index(stop)]
    cut = min(cut, len(full_tokens) - 1)
    head_text, head_tokens, _ = run(first, "head", prompt, params, stop_after=cut)
    head_tokens = head_tokens[:cut]  # what "the client" had received when the engine went away
    tail_text, tail_tokens, last = run(second, f"tail-{cut}", prompt + head_tokens, remaining(params, cut),
                                       num_resumed=cut)
    assert head_tokens + tail_tokens == full_tokens
    assert head_text + tail_text == full_text
    assert last.outputs[0].finish_reason == "stop" and last.outputs[0].stop_reason == stop
    assert first.kv.num_used_blocks == 0 and second.kv.num_used_blocks == 0


@pytest.mark.parametrize("cut", [2, 5])
def test_a_resumed_constrained_request_continues_its_grammar(engines, cut):
    first, second = engines
    prompt = varied_prompts(1, seed=14, lo=20, hi=21)[0]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured_outputs={"regex": "import [a-f]{20,40}"})
    full_text, full_tokens, _ = run(first, "full-c", prompt, params)
    assert len(full_tokens) > cut
    head_text, head_tokens, _ = run(first, "head-c", prompt, params, stop_after=cut)
    head_tokens = head_tokens[:cut]
    tail_text, tail_tokens, _ = run(second, f"tail-c-{cut}", prompt + head_tokens, remaining(params, cut),
                                    num_resumed=cut)
    assert head_tokens + tail_tokens == full_tokens  # a grammar restarted at the resume would differ


def test_exported_prefill_blocks_are_found_by_the_importing_engine(engines):
    prefill, decode = engines
    prompt = varied_prompts(1, seed=12, lo=50, hi=51)[0]  # 51 tokens: 3 full blocks of 16
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    _, ref_tokens, _ = run(prefill, "ref", prompt, params)
    _, first, _ = run(prefill, "prefill", prompt, remaining(params, MAX_TOKENS - 1))
    keys, data = prefill.export_prefix(prefill.prefix_keys(prompt))
    assert len(keys) == 3 and data.shape[0] == 3
    assert decode.prefix_keys(prompt) == prefix_keys(decode.kv.namespace, prompt, 16)
    stored = []
    decode.kv.pool.on_store = lambda block, key: stored.append(key)
    try:
        assert decode.import_prefix(keys, data) == 3
    finally:
        decode.kv.pool.on_store = None
    assert stored == keys  # a router hears about imported blocks like any others
    assert decode.import_prefix(keys, data) == 3  # already cached: nothing written twice
    _, tail, last = run(decode, "decode", prompt + first, remaining(params, 1), num_resumed=1)
    assert first + tail == ref_tokens
    assert last.metrics.num_cached_tokens == 48  # only the partial block and the first token were computed
    assert decode.kv.num_used_blocks == 0


def test_import_stops_where_free_blocks_run_out(llama_dir):
    small = LLMEngine.from_args(str(llama_dir), num_blocks=2, block_size=16, num_threads=1, max_model_len=32)
    big = LLMEngine.from_args(str(llama_dir), kv_cache_memory="16MiB", num_threads=1, block_size=16)
    prompt = varied_prompts(1, seed=13, lo=60, hi=61)[0]
    run(big, "p", prompt, SamplingParams(temperature=0, max_tokens=1))
    keys, data = big.export_prefix(big.prefix_keys(prompt))
    assert len(keys) == 3
    assert small.import_prefix(keys, data) == 2
    assert small.kv.num_used_blocks == 0
