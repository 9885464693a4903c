"""The committed demo model: a complete Hugging Face checkpoint that tokenforge and transformers agree on,
small enough to ship, and trained well enough that it writes Python."""

from __future__ import annotations

import json

import pytest
import torch

from tokenforge import LLM, SamplingParams
from tokenforge.config import DEMO_DRAFT_MODEL_DIR, DEMO_MODEL_DIR, SpeculativeConfig
from tokenforge.tokenizer import TokenizerWrapper

pytestmark = pytest.mark.timeout(300)


def test_files_and_size():
    names = {p.name for p in DEMO_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir()) <= 16 * 2**20
    assert json.loads((DEMO_MODEL_DIR / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "chat_template" in json.loads((DEMO_MODEL_DIR / "tokenizer_config.json").read_text())


@pytest.fixture(scope="module")
def llm():
    return LLM(str(DEMO_MODEL_DIR), kv_cache_memory="64MiB")


def test_logits_match_transformers(llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    prompt = "def fibonacci(n):\n"
    ids = hf_tok(prompt)["input_ids"]
    assert ids == llm.get_tokenizer().encode(prompt)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, torch_dtype=torch.float32)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                             pad_token_id=hf_tok.eos_token_id)[0, len(ids):].tolist()
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(temperature=0, max_tokens=24,
                                                                                ignore_eos=True))
    assert out[0].outputs[0].token_ids == ref


def test_completions_look_like_python(llm):
    prompts = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n\n\ndef read_lines(path):"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48))
    for out in outs:
        text = out.outputs[0].text
        assert text.startswith("\n") and "    " in text, text  # a new, indented line: a body follows
        words = set(text.replace("(", " ").replace(")", " ").replace(".", " ").split())
        assert words & {"return", "self", "if", "for", "in", "=", "None", "not", "is"}, text


def test_draft_model_shares_the_tokenizer_and_agrees_with_the_demo_model():
    names = {p.name for p in DEMO_DRAFT_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "training_log.json"} <= names
    assert sum(p.stat().st_size for p in DEMO_DRAFT_MODEL_DIR.iterdir()) <= 8 * 2**20
    assert (DEMO_DRAFT_MODEL_DIR / "tokenizer.json").read_bytes() == (DEMO_MODEL_DIR / "tokenizer.json").read_bytes()
    # the distilled draft predicts the teacher's greedy token at every position of real Python code about half
    # the time (measured 0.50-0.51 on json.decoder, string and textwrap), where chance is 1 in 4,096
    import inspect
    import textwrap

    from transformers import AutoModelForCausalLM

    ids = TokenizerWrapper(DEMO_MODEL_DIR).encode(inspect.getsource(textwrap))[:512]
    argmax = []
    for path in (DEMO_MODEL_DIR, DEMO_DRAFT_MODEL_DIR):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            argmax.append(model(torch.tensor([ids])).logits[0].argmax(-1))
    assert (argmax[0] == argmax[1]).float().mean().item() > 0.4


def test_speculative_decoding_with_the_demo_draft_model_matches_plain(llm):
    prompts = ["def fibonacci(n):", "class Stack:\n    def __init__(self):"]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    spec = LLM(str(DEMO_MODEL_DIR), kv_cache_memory="64MiB",
               speculative=SpeculativeConfig(method="draft", draft_model=str(DEMO_DRAFT_MODEL_DIR)))
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params)] == plain
    stats = spec.client.engine.stats()
    assert stats["spec_decode_num_accepted_tokens"] > 0.5 * stats["spec_decode_num_draft_tokens"]
