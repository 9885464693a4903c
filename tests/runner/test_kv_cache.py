"""The KV cache's block operations: copies within the pool, reads out to a host buffer and writes back."""

import pytest
import torch

from tokenforge.config import ModelConfig
from tokenforge.runner.kv_cache import KVCache

CFG = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=16,
                                 intermediate_size=8, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2), "x")


def _filled(dtype=torch.float32) -> KVCache:
    cache = KVCache(CFG, num_blocks=6, block_size=4, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for k, v in cache.layers:
        k.copy_(torch.randn(k.shape, generator=g))
        v.copy_(torch.randn(v.shape, generator=g))
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_then_write_round_trips_blocks(dtype):
    cache = _filled(dtype)
    before = [(k.clone(), v.clone()) for k, v in cache.layers]
    data = cache.read_blocks([4, 1])
    assert data.shape == (2, 3, 2, 4, 2, 4) and data.dtype == dtype
    assert torch.equal(data[0, 2, 1], before[2][1][4])  # block 4, layer 2, values
    cache.write_blocks([0, 5], data)
    for (k, v), (k0, v0) in zip(cache.layers, before, strict=True):
        assert torch.equal(k[0], k0[4]) and torch.equal(v[5], v0[1])
        assert torch.equal(k[2], k0[2])  # untouched
    buffer = torch.empty_like(data)
    assert cache.read_blocks([0, 5], out=buffer) is buffer and torch.equal(buffer, data)
    with pytest.raises(ValueError, match="shape"):
        cache.write_blocks([0], data)
    with pytest.raises(ValueError, match="block ids"):
        cache.read_blocks([6])


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_load_blocks_by_row(dtype, compiled):
    """A lower tier's copies: blocks to chosen rows of a host buffer and back, the compiled memcpy (where a
    kernel library is loaded) and the torch path alike."""
    cache = _filled(dtype)
    if not compiled:
        cache._copier = None
    elif cache._copier is None:
        pytest.skip("no compiled CPU kernels are loaded (TOKENFORGE_CPU_ISA=none or not built)")
    host = torch.zeros(5, 3, 2, 4, 2, 4, dtype=dtype)
    cache.save_blocks([4, 1], host, [3, 0])
    assert torch.equal(host[3], cache.read_blocks([4])[0]) and torch.equal(host[0, 2, 1], cache.layers[2][1][1])
    assert not host[[1, 2, 4]].any()  # other rows untouched
    before = [(k.clone(), v.clone()) for k, v in cache.layers]
    cache.load_blocks(host, [0, 3], [5, 2])
    for (k, v), (k0, v0) in zip(cache.layers, before, strict=True):
        assert torch.equal(k[5], k0[1]) and torch.equal(v[2], v0[4]) and torch.equal(k[0], k0[0])
    with pytest.raises(ValueError, match="rows must be in"):
        cache.save_blocks([0], host, [5])
    with pytest.raises(ValueError, match="host block buffer"):
        cache.load_blocks(host[:, :2], [0], [0])


def test_copy_blocks_and_slots():
    cache = _filled()
    before = [(k.clone(), v.clone()) for k, v in cache.layers]
    cache.copy_blocks([1, 2], [3, 4])
    for (k, v), (k0, v0) in zip(cache.layers, before, strict=True):
        assert torch.equal(k[3], k0[1]) and torch.equal(v[4], v0[2]) and torch.equal(k[1], k0[1])
    cache.copy_slots(torch.tensor([0 * 4 + 1, 1 * 4 + 3]), torch.tensor([1 * 4 + 3, 5 * 4 + 0]))
    for (k, _), (k0, _) in zip(cache.layers, before, strict=True):
        assert torch.equal(k[1, 3], k0[0, 1]) and torch.equal(k[5, 0], k0[1, 3])  # sources read before writes


def test_copies_into_one_target_twice_are_refused():
    """The copies run in parallel, so a repeated destination would end as a mix of both sources."""
    cache = _filled()
    host = torch.zeros(3, 3, 2, 4, 2, 4)
    with pytest.raises(ValueError, match="rows to copy into must be distinct"):
        cache.save_blocks([1, 2], host, [0, 0])
    with pytest.raises(ValueError, match="block ids to copy into must be distinct"):
        cache.load_blocks(host, [0, 1], [4, 4])
    cache.save_blocks([1, 1], host, [0, 2])  # one block to two rows is fine
    assert torch.equal(host[0], host[2])


def test_kv_cache_dtype_choices():
    from tokenforge.config import CacheConfig, ConfigError
    from tokenforge.runner.kv_cache import kv_cache_dtype

    assert kv_cache_dtype(torch.float32) == torch.float32 and kv_cache_dtype(torch.bfloat16) == torch.bfloat16
    assert kv_cache_dtype(torch.float32, "bfloat16") == torch.bfloat16
    assert kv_cache_dtype(torch.bfloat16, "float32") == torch.float32
    with pytest.raises(ConfigError, match="kv cache dtype must be one of auto, float32, bfloat16"):
        CacheConfig(dtype="float16")


def test_a_bf16_cache_under_a_float32_model(llama_dir):
    """Twice the blocks in the same memory; the first token's logprobs within bf16's rounding of the float32
    cache's; a prompt found in the prefix cache gives what computing it gave (chunked prefill included)."""
    from tokenforge.engine.engine import LLMEngine
    from tokenforge.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    prompt = list(range(5, 45))

    def run(dtype: str) -> tuple[LLMEngine, list]:
        engine = LLMEngine.from_args(str(llama_dir), kv_cache_memory="4MiB", kv_cache_dtype=dtype,
                                     max_num_batched_tokens=16)
        outs = []
        for i in range(2):  # the second request finds the first's blocks in the prefix cache
            engine.add_request(str(i), params=params, prompt_token_ids=prompt)
            while engine.has_unfinished_requests():
                outs += [o for o in engine.step() if o.finished]
        return engine, outs

    e32, f32 = run("auto")
    e16, b16 = run("bfloat16")
    assert e16.runner.kv_cache.layers[0][0].dtype == torch.bfloat16
    assert e16.num_blocks == 2 * e32.num_blocks
    assert b16[1].metrics.num_cached_tokens > 0 and b16[1].outputs[0].token_ids == b16[0].outputs[0].token_ids
    first32, first16 = f32[0].outputs[0].logprobs[0], b16[0].outputs[0].logprobs[0]
    top32, top16 = dict(first32.top_logprobs), dict(first16.top_logprobs)
    assert first16.token_id == first32.token_id
    assert max(abs(top16[t] - lp) for t, lp in top32.items() if t in top16) < 0.05
