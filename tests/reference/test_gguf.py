"""GGUF models against transformers reading the same GGUF file (it dequantizes every tensor to float32):
with float32 activations (`quant_activations="f32"`), logits within 1e-4 and token-identical greedy output,
per architecture and per stored format; with the default int8 activations, logits within a stated
tolerance and the same greedy token wherever the reference's top-2 margin exceeds it. Also the
row order of llama's Q/K (llama.cpp permutes them) against the original Hugging Face checkpoint, and what
transformers' GGUF reader cannot express (Qwen3's key_length, Llama-3 rope_freqs) against the checkpoint
with the same weights."""

import numpy as np
import pytest
import torch

from tests.conftest import CHAT_TEMPLATE, gguf_in, hf_gguf_model, hf_greedy, hf_model, varied_prompts
from tests.gguf_util import tokenizer_metadata, write_gguf, write_k_quant_llama
from tests.reference.test_logits import _logits_by_steps
from tokenforge import LLM, SamplingParams
from tokenforge.config import ModelConfig, RopeConfig
from tokenforge.models.registry import load_model

ARCHS = ["llama", "qwen2", "qwen3-hd128"]
ENCODINGS = ["f32", "f16", "q8_0", "q4_0", "q4_1"]
NEW_TOKENS = 8


# int8 activations (per 32 values, as llama.cpp): the largest logit error they may add, relative to the
# reference logits' largest magnitude (measured up to ~1.5 % on these random models)
INT8_LOGIT_TOL = 0.04


def assert_logits_match(path, reference, chunk: int = 1000, tol: float = 1e-4, activations: str = "f32") -> None:
    cfg = ModelConfig.from_pretrained(path)
    model = load_model(cfg, torch.float32, quant_activations=activations)
    prompts = varied_prompts(2, seed=7, lo=5, hi=50)
    for prompt, got in zip(prompts, _logits_by_steps(model, cfg, prompts, chunk)):
        with torch.no_grad():
            want = reference(torch.tensor([prompt])).logits[0].float()
        if activations == "f32":
            assert (got - want).abs().max().item() <= tol
            continue
        bound = INT8_LOGIT_TOL * want.abs().max().item()
        assert (got - want).abs().max().item() <= bound
        top2 = want.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * bound  # where the error cannot swap the first two
        assert clear.sum() > 0 and torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def assert_greedy_matches(path, reference) -> None:
    prompts = varied_prompts(4, seed=5, lo=3, hi=40)
    llm = LLM(str(path), max_num_batched_tokens=16, quant_activations="f32")
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(reference, p, NEW_TOKENS) for p in prompts]
    assert llm.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_logits_and_greedy_match_transformers_on_the_same_file(make_gguf, arch, encoding):
    folder = make_gguf(arch, encoding)
    reference = hf_gguf_model(folder)
    assert_logits_match(folder, reference, chunk=1000)
    if encoding == "q4_1":  # chunked prefill and decode, and the file named itself rather than its folder
        assert_logits_match(gguf_in(folder), reference, chunk=5)
    if encoding.startswith("q"):  # the default: int8 activations
        assert_logits_match(folder, reference, chunk=5, activations="int8")
    assert_greedy_matches(folder, reference)


@pytest.mark.parametrize("arch", ["llama", "mistral", "llama3-tied", "qwen3"])
def test_gguf_of_a_checkpoint_matches_the_checkpoint(make_gguf, checkpoints, arch):
    """Against the Hugging Face checkpoint itself: llama's Q/K rows come back in their original order, Qwen3's
    head_dim comes from key_length, and Llama-3 scaling comes from the rope_freqs tensor."""
    folder = make_gguf(arch, "f32")
    if arch == "llama3-tied":
        folder = _with_rope_freqs(folder, checkpoints[arch])
    assert_logits_match(folder, hf_model(checkpoints[arch]), chunk=13)


def _with_rope_freqs(folder, checkpoint):
    """The llama3-tied GGUF plus the rope_freqs tensor llama.cpp's converter writes for Llama-3 scaling: per
    frequency, the divisor the Hugging Face rule applies."""
    import gguf

    from tokenforge.layers.rotary import inverse_frequencies

    cfg = ModelConfig.from_pretrained(checkpoint)
    plain = inverse_frequencies(RopeConfig(theta=cfg.rope.theta), cfg.head_dim)
    factors = (plain / inverse_frequencies(cfg.rope, cfg.head_dim)).numpy().astype(np.float32)
    reader = gguf.GGUFReader(gguf_in(folder))
    out = folder.parent / "with-rope-freqs"
    out.mkdir(exist_ok=True)
    tensors = {t.name: (np.array(t.data), None) for t in reader.tensors}
    tensors["rope_freqs.weight"] = (factors, None)
    hparams = {"max_position_embeddings": 256, "hidden_size": cfg.hidden_size,
               "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
               "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
               "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope.theta, "vocab_size": cfg.vocab_size}
    write_gguf(out / "llama3.gguf", "llama", hparams, tensors, tokenizer_metadata(checkpoint, CHAT_TEMPLATE))
    assert ModelConfig.from_pretrained(out).rope.freq_factors
    return out


@pytest.fixture(scope="module")
def k_quant_model(tmp_path_factory, tokenizer_dir):
    """A Q4_K_M-like llama (`write_k_quant_llama`) whose layer 1 has a dense F16 up projection."""
    folder = tmp_path_factory.mktemp("kquant")
    write_k_quant_llama(folder / "kquant.gguf", tokenizer_dir, CHAT_TEMPLATE, seed=3, dense_up_in_layer_1=True)
    return folder


def test_k_quants_and_mixed_formats_match_transformers(k_quant_model):
    from tokenforge.layers.factory import ConcatLinear
    from tokenforge.layers.quant_linear import QuantLinear

    model = load_model(ModelConfig.from_pretrained(k_quant_model), torch.float32, quant_activations="f32")
    qkv, gate_up = model.layers[0].qkv_proj, model.layers[1].gate_up_proj
    assert isinstance(qkv, ConcatLinear) and [p.qtype for p in qkv.parts] == ["q4_k", "q6_k"]
    assert isinstance(gate_up, ConcatLinear) and not isinstance(gate_up.parts[1], QuantLinear)
    assert isinstance(model.layers[0].gate_up_proj, QuantLinear)
    reference = hf_gguf_model(k_quant_model)
    assert_logits_match(k_quant_model, reference, chunk=1000)
    assert_logits_match(k_quant_model, reference, chunk=7)
    assert_logits_match(k_quant_model, reference, chunk=7, activations="int8")
    assert_greedy_matches(k_quant_model, reference)
