"""Constraints in the engine, on a random-weight model (only the constraint can make its output valid):
every output of 54 JSON schemas parses and validates, in one batch with free requests; regex, choice and
grammar constraints hold; speculative decoding, preemption, n > 1, logprobs and stop strings compose;
a bad constraint is a ValueError and the engine goes on.

A random model rarely closes a string on its own, so most requests carry a logit bias toward closing
tokens (quotes, brackets, commas): that only shortens the outputs. Without the grammar mask such a bias
gives strings like '"}],"', never valid JSON; validity comes from the mask alone.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.conftest import VOCAB, varied_prompts
from tests.structured.schemas import SCHEMAS
from tests.structured.test_validity import FORMATS
from tokenforge import LLM, SamplingParams
from tokenforge.config import SpeculativeConfig

pytestmark = pytest.mark.timeout(300)
PROMPT = [1, 17, 42, 99]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), kv_cache_memory="64MiB", max_num_seqs=128)


@pytest.fixture(scope="module")
def closing_bias(llm) -> dict[int, float]:
    tokenizer = llm.get_tokenizer()
    texts = {t: tokenizer.decode([t], skip_special_tokens=False) for t in range(VOCAB)}
    return {t: 6.0 for t, text in texts.items() if text and set(text) <= set('"}],')}


def _bias(name: str, closing_bias: dict[int, float], llm) -> dict[int, float]:
    if "email" not in name:
        return closing_bias
    tokenizer = llm.get_tokenizer()  # '}' is a valid email character: favour what ends an address instead
    return {t: 6.0 for t in range(VOCAB) if tokenizer.decode([t], skip_special_tokens=False) in ('"', "@", ".")}


def _valid(schema: dict, text: str) -> bool:
    try:
        jsonschema.Draft202012Validator(schema, format_checker=FORMATS).validate(json.loads(text))
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def test_every_schema_holds_in_one_batch_with_free_requests(llm, closing_bias):
    names = sorted(SCHEMAS)
    assert len(names) >= 50
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=220, logit_bias=_bias(n, closing_bias, llm),
                             structured_outputs={"json": SCHEMAS[n]}) for i, n in enumerate(names)]
    free = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=[PROMPT] * len(names) + [PROMPT] * 3, sampling_params=params + [free] * 3)
    for name, out in zip(names, outs, strict=False):
        c = out.outputs[0]
        assert c.finish_reason == "stop" and _valid(SCHEMAS[name], c.text), (name, c.finish_reason, c.text)
    unconstrained = llm.generate(prompt_token_ids=[PROMPT], sampling_params=free)[0].outputs[0].token_ids
    assert all(o.outputs[0].token_ids == unconstrained for o in outs[len(names):])  # free rows untouched
    assert llm.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_choice_and_grammar(llm, temperature):
    cases = [({"regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
             ({"choice": ["alpha", "beta gamma", "delta"]}, lambda t: t in ("alpha", "beta gamma", "delta")),
             ({"grammar": 'start: "(" num "," num ("," num)? ")"\nnum: /[0-9]/'},
              lambda t: re.fullmatch(r"\(\d,\d(,\d)?\)", t))]
    for spec, check in cases:
        outs = llm.generate(prompt_token_ids=varied_prompts(4, seed=2), sampling_params=SamplingParams(
            temperature=temperature, seed=3, max_tokens=60, structured_outputs=spec))
        for out in outs:
            assert out.outputs[0].finish_reason == "stop" and check(out.outputs[0].text), (spec, out.outputs[0].text)


def test_max_tokens_still_ends_with_length(llm):
    out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
        temperature=0, max_tokens=3, structured_outputs={"json": {"type": "array", "items": {"type": "string"}}}))
    c = out[0].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 3 and c.text.startswith("[")


def test_bad_constraints_raise_and_the_engine_goes_on(llm):
    with pytest.raises(ValueError, match="uniqueItems"):
        llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
            structured_outputs={"json": {"type": "array", "uniqueItems": True}}))
    with pytest.raises(ValueError, match="regex"):
        llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
            structured_outputs={"regex": "(unclosed"}))
    out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
        temperature=0, max_tokens=10, structured_outputs={"choice": ["yes", "no"]}))
    assert out[0].outputs[0].text in ("yes", "no")
    assert llm.stats()["kv_blocks_used"] == 0


def _constrained(seed: int, **extra) -> SamplingParams:
    schema = {"type": "object", "properties": {"k": {"type": "array", "items": {"type": "integer", "maximum": 99},
                                                     "minItems": 2, "maxItems": 6}}, "required": ["k"]}
    return SamplingParams(temperature=0, seed=seed, max_tokens=60, structured_outputs={"json": schema}, **extra)


def test_speculation_and_preemption_compose(llama_dir, llm):
    prompts = [p + p[1:] for p in varied_prompts(6, seed=12, lo=6, hi=12)]  # prompt lookup finds matches
    params = [_constrained(i) for i in range(len(prompts))]
    plain = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
    spec = LLM(str(llama_dir), kv_cache_memory="64MiB", speculative=SpeculativeConfig(
        num_speculative_tokens=4, disable_batch_size=64, max_batch_tokens=512))
    assert [o.outputs[0].token_ids for o in spec.generate(prompt_token_ids=prompts, sampling_params=params)] == plain
    stats = spec.stats()  # drafts were verified, and some were accepted under the grammar's masks
    assert stats["spec_decode_num_draft_tokens"] > stats["spec_decode_num_accepted_tokens"] > 0
    tight = LLM(str(llama_dir), num_blocks=24, block_size=4)  # 6 requests of up to ~80 tokens: preemption
    assert [o.outputs[0].token_ids for o in tight.generate(prompt_token_ids=prompts, sampling_params=params)] == plain
    assert tight.stats()["num_preemptions"] > 0 and tight.stats()["kv_blocks_used"] == 0


def test_choices_logprobs_and_stop_strings(llm):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=30, logprobs=2,
                            structured_outputs={"regex": "(ab|cd)+x"})
    outs = llm.generate(prompt_token_ids=[PROMPT] * 3, sampling_params=[params] * 3)
    for out in outs:
        c = out.outputs[0]
        assert re.fullmatch("(ab|cd)+x", c.text) and len(c.logprobs) == len(c.token_ids)
        assert all(lp.token_id == t for lp, t in zip(c.logprobs, c.token_ids, strict=True))
    cut = llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
        temperature=0, max_tokens=30, stop=["cd"], structured_outputs={"regex": "(abcd)+x"}))[0].outputs[0]
    assert (cut.text, cut.finish_reason, cut.stop_reason) == ("ab", "stop", "cd")
