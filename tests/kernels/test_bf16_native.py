"""bf16 checkpoints on a CPU with bf16 dot products keep bf16 weights for every matmul: the vdpbf16ps
kernel for few rows, oneDNN's bf16 GEMM for many, activations rounded to bf16, float32 sums, a bf16 KV cache
read directly by the paged kernel. Against the widened path (the same bf16 weights times float32
activations), logits agree within a bf16 tolerance and greedy tokens agree wherever the top-2 margin
exceeds twice it.

Where the CPU lacks avx512_bf16 this runs on the emulated variant (the same kernel source with vdpbf16ps
computed in AVX-512F); the real-instruction variant runs it where the CPU has the flag.
"""

import pytest
import torch

from tests import kernel_variants
from tests.conftest import make_checkpoint, varied_prompts
from tests.reference.test_logits import _logits_by_steps
from tokenforge import LLM, SamplingParams, kernels, matmul_plan
from tokenforge.config import ModelConfig
from tokenforge.layers import linear
from tokenforge.matmul_plan import MatmulPlan
from tokenforge.models.registry import load_model

# Largest logit difference allowed between the native and widened paths. Rounding activations to bf16
# moves each matmul input by <= 2^-9 relatively; through two layers of this 64-wide model the logits
# (magnitude ~5) moved by at most ~0.02 in trials, so 0.06 leaves a 3x margin.
LOGIT_TOL = 0.06
NATIVE = MatmulPlan(((8, "bf16_dot"), (16, "onednn_bf16")))
WIDENED = MatmulPlan(((8, "skinny"), (16, "onednn")))


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, tokenizer_dir):
    return make_checkpoint("llama", tmp_path_factory.mktemp("bf16") / "llama", tokenizer_dir, dtype=torch.bfloat16)


def _native_variant():
    for name in ("avx512bf16", "avx512bf16emu"):  # the real instruction first
        got = kernel_variants._load(name)
        if not isinstance(got, str):
            return got
    pytest.skip(f"no variant with a bf16 dot product runs here: {kernel_variants._load('avx512bf16emu')}")


def _build(monkeypatch, native: bool, make):
    with monkeypatch.context() as mp:
        if native:
            mp.setattr(kernels, "ACTIVE", _native_variant())
        mp.setattr(linear, "native_bf16", lambda: native)  # widened: as on a CPU without bf16 units
        mp.setattr(matmul_plan, "cached", lambda key: NATIVE if native else WIDENED)
        return make()


def test_native_bf16_keeps_only_bf16_weights(bf16_dir, monkeypatch):
    cfg = ModelConfig.from_pretrained(bf16_dir)
    model = _build(monkeypatch, True, lambda: load_model(cfg, torch.bfloat16))
    layer = model.layers[0].qkv_proj
    assert layer.kind == "bf16-native" and layer.cpu.bf16_dot != "none"
    assert layer.plain.dtype == torch.bfloat16 and layer.packed.dtype == torch.bfloat16 and layer.panels is None
    assert layer.plan.path_for(1) == "bf16_dot" and layer.plan.path_for(100) == "onednn_bf16"


def test_native_bf16_logits_and_greedy_match_the_widened_path(bf16_dir, monkeypatch):
    cfg = ModelConfig.from_pretrained(bf16_dir)
    native = _build(monkeypatch, True, lambda: load_model(cfg, torch.bfloat16))
    widened = _build(monkeypatch, False, lambda: load_model(cfg, torch.bfloat16))
    prompts = varied_prompts(3, seed=11, lo=5, hi=40)
    worst = 0.0
    for chunk in (1000, 1):  # whole prompts (many rows: oneDNN) and one token at a time (the bf16 kernel)
        for a, b in zip(_logits_by_steps(native, cfg, prompts, chunk), _logits_by_steps(widened, cfg, prompts, chunk)):
            worst = max(worst, (a - b).abs().max().item())
    assert 0 < worst <= LOGIT_TOL  # > 0: the native path did round the activations

    params = SamplingParams(temperature=0, max_tokens=24, logprobs=2, ignore_eos=True)
    prompt_ids = varied_prompts(8, seed=5, lo=3, hi=30)
    outs = {}
    for native_path in (True, False):
        llm = _build(monkeypatch, native_path, lambda: LLM(str(bf16_dir), dtype="bfloat16", kv_cache_memory="8MiB"))
        assert llm.client.engine.runner.kv_cache.layers[0][0].dtype == torch.bfloat16
        outs[native_path] = [o.outputs[0] for o in llm.generate(prompt_token_ids=prompt_ids, sampling_params=params)]
    compared = 0
    for got, want in zip(outs[True], outs[False]):
        for step, (a, b) in enumerate(zip(got.token_ids, want.token_ids)):
            top = want.logprobs[step].top_logprobs
            margin = top[0][1] - top[1][1]
            if margin > 2 * LOGIT_TOL:
                assert a == b, f"step {step}: native {a} vs widened {b} with a top-2 margin of {margin:.3f}"
                compared += 1
            if a != b:
                break  # a near tie went the other way: the sequences differ from here on
    assert compared >= 60  # of 8 x 24 steps; this random model's flat logits leave many near ties
