"""Model proposers: a separate draft model (its own paged cache) and self-speculation (an int8 copy of the
target reading the target's cache). Outputs must equal plain decoding's and both pools must end empty."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import VOCAB, hf_model, make_checkpoint, varied_prompts
from tokenforge import LLM, SamplingParams
from tokenforge.config import ConfigError, SpeculativeConfig
from tokenforge.engine.engine import LLMEngine
from tokenforge.layers.linear import Linear
from tokenforge.layers.quant import Int8Linear, quantize_int8, quantized_copy

pytestmark = pytest.mark.timeout(300)
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def draft_dir(llama_dir, tmp_path_factory):
    """The target with noise on its weights: agrees with it often but not always, so steps mix accepted
    drafts, rejections and bonus tokens."""
    model = hf_model(llama_dir)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(torch.randn_like(p) * 0.03)
    out = tmp_path_factory.mktemp("draft")
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((llama_dir / name).read_bytes())
    return out


@pytest.fixture(scope="module")
def prompts():
    return varied_prompts(12, seed=31)


@pytest.fixture(scope="module")
def plain(llama_dir, prompts):
    return _ids(LLM(str(llama_dir)).generate(prompt_token_ids=prompts, sampling_params=GREEDY))


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def _spec(method: str, draft_dir=None, **kwargs) -> SpeculativeConfig:
    base = dict(num_speculative_tokens=4, disable_batch_size=64, max_batch_tokens=512, draft_confidence=0.0)
    return SpeculativeConfig(method=method, draft_model=str(draft_dir) if method == "draft" else None,
                             **{**base, **kwargs})


@pytest.mark.parametrize("mode", ["self", "self-tree", "self-preempt", "draft", "draft-tree", "draft-preempt",
                                  "draft-chunked"])
def test_greedy_output_is_token_identical(llama_dir, draft_dir, prompts, plain, mode):
    method = mode.split("-")[0]
    extra = {"tree": True, "num_speculative_tokens": 6, "tree_width": 2} if mode.endswith("tree") else {}
    kwargs = {}
    if mode.endswith("preempt"):
        kwargs["num_blocks"] = 12  # 12 requests of up to ~64 tokens in 16-token blocks: constant preemption
    if mode.endswith("chunked"):
        kwargs["max_num_batched_tokens"] = 7
    llm = LLM(str(llama_dir), speculative=_spec(method, draft_dir, **extra), **kwargs)
    assert _ids(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)) == plain
    stats = llm.client.engine.stats()
    assert stats["kv_blocks_used"] == 0
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]
    proposer = llm.client.engine.runner.proposer
    if method == "draft":
        assert proposer.pool.num_used_blocks == 0 and not proposer._own
    if mode.endswith("preempt"):
        assert stats["num_preemptions"] > 0


def test_a_draft_equal_to_the_target_is_always_accepted(llama_dir, prompts, plain):
    """Own-cache bookkeeping: drafting with the target's own checkpoint must accept every drafted token,
    which only holds if the catch-up feeds exactly the tokens the draft has not seen."""
    llm = LLM(str(llama_dir), speculative=_spec("draft", llama_dir, adaptive=False))
    assert _ids(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)) == plain
    stats = llm.client.engine.stats()
    assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"] > 0


def test_confidence_threshold_cuts_drafts_short(llama_dir, draft_dir, prompts, plain):
    drafted = {}
    for conf in (0.0, 0.011):  # this random model is flat: 0.011 is about its median top probability
        llm = LLM(str(llama_dir), speculative=_spec("draft", draft_dir, adaptive=False, draft_confidence=conf))
        assert _ids(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)) == plain
        s = llm.client.engine.stats()
        drafted[conf] = (s["spec_decode_num_draft_tokens"] / s["spec_decode_num_drafts"],
                         s["spec_decode_num_accepted_tokens"] / s["spec_decode_num_draft_tokens"])
    (len_all, acc_all), (len_conf, acc_conf) = drafted[0.0], drafted[0.011]
    assert len_conf < len_all  # shorter drafts...
    assert acc_conf > acc_all  # ...of which a larger share is accepted


def test_a_draft_that_keeps_declining_is_tried_less_often(llama_dir, prompts, plain):
    """Never confident (this random model's top probability is far under 0.9): each try is a wasted draft
    pass, so with an adaptive length a request pauses 1, 2, 4, 8, 8... steps between tries."""
    llm = LLM(str(llama_dir), speculative=_spec("self", adaptive=True, draft_confidence=0.9))
    runner = llm.client.engine.runner.proposer.runner
    passes = 0
    real = runner.last_logits

    def counted(reqs):
        nonlocal passes
        passes += 1
        return real(reqs)

    runner.last_logits = counted
    outs = llm.generate(prompt_token_ids=prompts[:1], sampling_params=GREEDY)
    assert _ids(outs) == plain[:1] and llm.client.engine.stats()["spec_decode_num_drafts"] == 0
    assert passes == 5  # tries at decode steps 1, 3, 6, 11 and 20 of 23
    assert llm.client.engine.kv.num_used_blocks == 0


def test_stops_logprobs_and_aborts_with_model_drafts(llama_dir, prompts, plain):
    llm_plain = LLM(str(llama_dir))
    llm = LLM(str(llama_dir), speculative=_spec("self"))
    stop_tok = plain[2][9]
    cases = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_tok]),
             SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)]
    for params in cases:
        a, b = (m.generate(prompt_token_ids=prompts, sampling_params=params) for m in (llm_plain, llm))
        for x, y in zip(a, b, strict=True):
            ox, oy = x.outputs[0], y.outputs[0]
            assert (ox.token_ids, ox.finish_reason) == (oy.token_ids, oy.finish_reason)
            if params.logprobs:
                assert [lp.token_id for lp in ox.logprobs] == [lp.token_id for lp in oy.logprobs]
    engine = LLMEngine.from_args(str(llama_dir), speculative=_spec("draft", llama_dir))
    for i, p in enumerate(prompts[:6]):
        engine.add_request(f"r{i}", prompt_token_ids=p, params=GREEDY)
    for _ in range(4):
        engine.step()
    assert "r0" in engine.runner.proposer._own
    engine.abort_request(["r0", "r3"])
    engine.step()  # the runner hears of the abort with the next step
    assert "r0" not in engine.runner.proposer._own
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv.num_used_blocks == 0 and engine.runner.proposer.pool.num_used_blocks == 0


def test_bad_draft_configs_are_refused(llama_dir, checkpoints, tmp_path, tokenizer_dir):
    with pytest.raises(ConfigError, match="draft_model"):
        SpeculativeConfig(method="draft")
    with pytest.raises(ConfigError, match="draft_confidence"):
        SpeculativeConfig(method="self", draft_confidence=1.5)
    other = make_checkpoint("llama", tmp_path / "other", tokenizer_dir)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="tokenizer"):
        LLM(str(llama_dir), speculative=SpeculativeConfig(method="draft", draft_model=str(other)))


def test_int8_linear_matches_its_dequantized_weight():
    torch.manual_seed(0)
    w = torch.randn(96, 200)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and (w - q.float() * scale[:, None]).abs().max() <= scale.max() / 2 + 1e-6
    lin = Int8Linear(w, torch.randn(96))
    for rows in (1, 5, 8, 11):  # 11 rows go through the kernel 8 rows at a time
        x = torch.randn(rows, 200)
        ref = x @ (q.float() * scale[:, None]).T + lin.bias
        torch.testing.assert_close(lin(x), ref, rtol=1e-4, atol=1e-4)


def test_quantized_copy_shares_everything_but_linears(llama_dir):
    target = LLM(str(llama_dir)).client.engine.model
    draft = quantized_copy(target)
    assert draft.embed is target.embed and draft.layers[0].input_norm is target.layers[0].input_norm
    assert isinstance(draft.layers[0].qkv_proj, Int8Linear) and isinstance(target.layers[0].qkv_proj, Linear)
    x = torch.randn(3, target.cfg.hidden_size)
    a, b = target.compute_logits(x), draft.compute_logits(x)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert a.shape == (3, VOCAB)


def test_a_model_tree_keeps_the_likeliest_nodes():
    """Chain 0.9, 0.9*0.5, ...; runners-up 0.08 at depth 1 and 0.9*0.4 at depth 2: with 4 nodes the depth-2
    runner-up (0.36) beats the chain's third node (0.9*0.5*0.6 = 0.27) and the depth-1 one (0.08)."""
    from tokenforge.spec.draft import _choose, _Drafting

    j = _Drafting(req=None, k=4, start=0, table=[], chain=[10, 11, 12, 13],
                  chain_probs=[0.9, 0.45, 0.27, 0.2], leaves=[(0.08, 1, 20), (0.36, 2, 21), (0.05, 3, 22)])
    _choose(j)
    assert (j.tokens, j.parents) == ([10, 11, 21, 12], [-1, 0, 0, 1])
