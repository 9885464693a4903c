"""The compiled decode-layer loop gives bitwise the numbers of the layer-by-layer path, and takes exactly the
steps it should (all-decode batches of GGUF models on their int8 path, of dense models on a compiled kernel)."""

import pytest
import torch

from tests.conftest import CHAT_TEMPLATE, make_checkpoint, varied_prompts
from tests.gguf_util import write_k_quant_llama
from tokenforge import LLM, SamplingParams, kernels, matmul_plan
from tokenforge.attention.cpu import PAGED_MAX_QUERY
from tokenforge.config import ModelConfig
from tokenforge.models.registry import load_model

pytestmark = pytest.mark.skipif(kernels.ACTIVE is None, reason="no compiled CPU kernels in this build")


@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory, tokenizer_dir):
    """A Q4_K_M-like llama with every matrix quantized: q/k Q4_K with v Q6_K in one fused projection."""
    folder = tmp_path_factory.mktemp("mixed")
    write_k_quant_llama(folder / "mixed.gguf", tokenizer_dir, CHAT_TEMPLATE, seed=5, dense_up_in_layer_1=False)
    return folder


@pytest.fixture
def int8_plans(pin_plans):
    """Every GGUF linear on its int8 path at every row count, rather than the plan this machine measures:
    past the crossover a measured plan takes torch's GEMM over dequantized weights, whose threading (and so
    its float sums) can change from run to run on a loaded machine, which would make two identical models
    differ in the last bits whatever the loop does."""
    pin_plans(lambda candidates: matmul_plan.MatmulPlan.single("int8") if "int8" in candidates else None)


@pytest.fixture
def dense_plans(pin_plans):
    """Dense layers on the kernel the test names (`pin["path"]`) up to `pin["rows"]` rows, oneDNN or torch
    past that: a measured plan may hand even one row to oneDNN on some machines, and the tests need the
    loop. How an LLM's stepping thread batches requests depends on timing, so the identity tests keep every
    step within the rows over which their kernel gives each row the same sums whatever the batch."""
    pin = {"path": "panel", "rows": 4096}

    def choose(candidates):
        if pin["path"] not in candidates or "int8" in candidates:
            return None
        if pin["rows"] >= matmul_plan.LADDER[-1]:
            return matmul_plan.MatmulPlan.single(pin["path"])
        large = next(name for name, c in candidates.items() if c.large)
        return matmul_plan.MatmulPlan(((pin["rows"], pin["path"]), (matmul_plan.LADDER[-1], large)))

    pin_plans(choose)
    return pin


def _greedy(path, fused: bool, monkeypatch, **engine_args):
    monkeypatch.setenv("TOKENFORGE_FUSED_DECODE", "1" if fused else "0")
    llm = LLM(str(path), **engine_args)
    assert (llm.client.engine.runner.model.fused is not None) == fused
    prompts = varied_prompts(5, seed=11, lo=3, hi=30)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    llm.close()
    return [(o.outputs[0].token_ids, [(lp.logprob, lp.top_logprobs) for lp in o.outputs[0].logprobs])
            for o in outs]


@pytest.mark.parametrize("arch,encoding", [("llama", "q4_1"), ("llama", "q8_0"), ("qwen2", "q4_0")])
def test_engine_output_is_identical_with_and_without_the_loop(make_gguf, monkeypatch, int8_plans, arch, encoding):
    """Greedy tokens and their logprobs, at batch 1 and batched (5 requests decode together), equal bit for
    bit; qwen2 brings q/k/v biases."""
    folder = make_gguf(arch, encoding)
    assert _greedy(folder, True, monkeypatch) == _greedy(folder, False, monkeypatch)
    assert _greedy(folder, True, monkeypatch, max_num_seqs=1) == _greedy(folder, False, monkeypatch, max_num_seqs=1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dense_float32_models_take_the_loop_on_the_panel_kernel(checkpoints, monkeypatch, dense_plans, arch):
    """Dense float32 weights on the panel kernel (qwen2: with q/k/v biases): bitwise the layer path. Steps of
    at most 16 rows: the panel kernel's sums for a row depend on the batch beyond one tile of rows."""
    folder = checkpoints[arch]
    steps = dict(max_num_batched_tokens=16)
    assert _greedy(folder, True, monkeypatch, **steps) == _greedy(folder, False, monkeypatch, **steps)
    steps["max_num_seqs"] = 1
    assert _greedy(folder, True, monkeypatch, **steps) == _greedy(folder, False, monkeypatch, **steps)


@pytest.mark.parametrize("path", ["skinny", "bf16_dot"])
def test_dense_bf16_models_take_the_loop(tmp_path, tokenizer_dir, monkeypatch, dense_plans, path):
    """bf16 weights on the skinny kernel (up to its 8 rows) or the bf16 dot product (where the variant has
    one): bitwise the layer path."""
    from tokenforge.layers.linear import native_bf16

    has_dot = kernels.ACTIVE.bf16_dot != "none" and native_bf16()
    if path == "bf16_dot" and not has_dot:
        pytest.skip(f"kernel variant {kernels.ACTIVE.name!r} on this CPU has no bf16 dot product")
    if path == "skinny" and has_dot:
        pytest.skip("bf16 weights on a CPU with bf16 dot products never take the skinny kernel")
    dense_plans.update(path=path, rows=8 if path == "skinny" else 4096)
    folder = make_checkpoint("llama", tmp_path / "bf16", tokenizer_dir, dtype=torch.bfloat16)
    steps = dict(max_num_batched_tokens=8) if path == "skinny" else {}  # every step on the skinny kernel
    steps["dtype"] = "bfloat16"  # weights kept bf16 (and a bf16 KV cache)
    model = load_model(ModelConfig.from_pretrained(folder), torch.bfloat16)
    assert model.fused is not None and model.layers[0].qkv_proj.plain.dtype == torch.bfloat16
    assert _greedy(folder, True, monkeypatch, **steps) == _greedy(folder, False, monkeypatch, **steps)


def test_mixed_formats_in_one_projection(mixed_model, monkeypatch, int8_plans):
    """Q4_K q/k with Q6_K v in one fused projection: its parts side by side in the loop."""
    from tokenforge.layers.factory import ConcatLinear

    model = load_model(ModelConfig.from_pretrained(mixed_model), torch.float32)
    assert isinstance(model.layers[0].qkv_proj, ConcatLinear) and model.fused is not None
    assert _greedy(mixed_model, True, monkeypatch) == _greedy(mixed_model, False, monkeypatch)


def test_which_models_and_steps_take_the_loop(make_gguf, checkpoints, monkeypatch, int8_plans):
    cfg = ModelConfig.from_pretrained(make_gguf("llama", "q4_1"))
    assert load_model(cfg, torch.float32).fused is not None
    assert load_model(cfg, torch.float32, quant_activations="f32").fused is None  # exact float activations
    assert load_model(ModelConfig.from_pretrained(make_gguf("qwen3-hd128", "q8_0")), torch.float32).fused is None
    monkeypatch.setenv("TOKENFORGE_FUSED_DECODE", "0")
    assert load_model(cfg, torch.float32).fused is None


def test_a_dense_model_takes_the_loop_only_where_its_plan_takes_a_kernel(checkpoints, dense_plans):
    cfg = ModelConfig.from_pretrained(checkpoints["llama"])
    dense_plans.update(rows=4)
    fused = load_model(cfg, torch.float32).fused
    assert fused is not None and fused._max_rows == 4  # five rows go to oneDNN, outside the loop
    matmul_plan._PLANS.clear()
    dense_plans.update(path="onednn")  # oneDNN from one row: nothing for the loop to run
    assert load_model(cfg, torch.float32).fused is None


def test_dense_parts_are_checked():
    from tokenforge.kernel_decode import DENSE_CODES, decode_linear

    w = torch.zeros(12, 16)
    decode_linear("t", "w", 16, [(w, DENSE_CODES["skinny_f32"], 12, None)])
    with pytest.raises(TypeError, match=r"w.parts\[0\].data must have dtype torch.bfloat16"):
        decode_linear("t", "w", 16, [(w, DENSE_CODES["skinny_bf16"], 12, None)])
    with pytest.raises(ValueError, match=r"must be \[12, 8\], got \(12, 16\)"):
        decode_linear("t", "w", 8, [(w, DENSE_CODES["skinny_f32"], 12, None)])
    with pytest.raises(ValueError, match="panels of a \\[12, 16\\] weight"):
        decode_linear("t", "w", 16, [(w[:11], DENSE_CODES["panel"], 12, None)])
    with pytest.raises(ValueError, match="unknown weight code -9"):
        decode_linear("t", "w", 16, [(w, -9, 12, None)])


def test_steps_with_prefill_rows_take_the_layer_path(make_gguf, monkeypatch, int8_plans):
    """Steps with a prefill chunk longer than the paged kernel's query limit take the layer path; the
    rest (decodes, and short chunks the paged kernel serves) take the loop: count the calls."""
    calls = []
    folder = make_gguf("llama", "q4_1")
    llm = LLM(str(folder), max_num_batched_tokens=PAGED_MAX_QUERY + 8)
    model = llm.client.engine.runner.model
    real = model.fused.run
    monkeypatch.setattr(model.fused, "run", lambda *a: calls.append(real(*a)) or calls[-1])
    llm.generate(prompt_token_ids=[list(range(5, 5 + 2 * (PAGED_MAX_QUERY + 8)))],
                 sampling_params=SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    llm.close()
    # the prompt in two chunks longer than the paged kernel takes, refused (each step also samples nothing
    # or the first token), then three decode steps taken
    assert calls == [False, False, True, True, True], calls
