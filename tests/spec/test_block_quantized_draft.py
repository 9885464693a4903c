"""Self-speculation with a Q8_0 or Q4_0 copy of the target (ggml blocks made at load time) instead of int8:
greedy output stays token-identical to plain decoding, and the option is validated and reaches the config;
a model whose weights are already quantized has nothing to copy and is refused."""

import pytest

from tests.conftest import varied_prompts
from tokenforge import LLM, SamplingParams
from tokenforge.cli import build_parser, engine_kwargs
from tokenforge.config import ConfigError, SpeculativeConfig
from tokenforge.layers.linear import Linear
from tokenforge.layers.quant_linear import QuantLinear

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.mark.parametrize("quantization", ["q8_0", "q4_0"])
def test_block_quantized_self_draft_keeps_greedy_output(llama_dir, quantization):
    prompts = varied_prompts(8, seed=41)
    plain = [o.outputs[0].token_ids for o in LLM(str(llama_dir)).generate(prompt_token_ids=prompts,
                                                                         sampling_params=GREEDY)]
    spec = SpeculativeConfig(method="self", num_speculative_tokens=4, disable_batch_size=64, max_batch_tokens=512,
                             draft_confidence=0.0, draft_quantization=quantization)
    llm = LLM(str(llama_dir), speculative=spec, max_num_batched_tokens=64)
    draft = llm.client.engine.runner.proposer.runner.model
    assert all(isinstance(m, QuantLinear) for m in draft.modules() if isinstance(m, (Linear, QuantLinear)))
    assert draft.layers[0].qkv_proj.qtype == quantization
    got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)]
    assert got == plain
    stats = llm.stats()
    assert stats["spec_decode_num_accepted_tokens"] > 0
    assert stats["kv_blocks_used"] == 0


def test_draft_quantization_is_validated_and_reaches_the_config():
    with pytest.raises(ConfigError, match=r"draft_quantization must be one of \('int8', 'q8_0', 'q4_0'\)"):
        SpeculativeConfig(method="self", draft_quantization="q2_k")
    args = build_parser().parse_args(["generate", "hi", "--speculative", "self", "--spec-draft-quantization", "q4_0"])
    assert engine_kwargs(args, "x")["speculative"].draft_quantization == "q4_0"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--spec-draft-quantization", "q5_0"])


def test_self_speculation_needs_dense_weights(make_gguf):
    path = make_gguf("llama", "q8_0")
    with pytest.raises(ConfigError, match="already quantized"):
        LLM(str(path), speculative=SpeculativeConfig(method="self"))
