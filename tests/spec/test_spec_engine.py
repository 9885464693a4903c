"""Speculative decoding in the engine: outputs are exactly those of plain decoding, and the pool ends empty.

Random tiny models rarely repeat themselves, so besides prompt lookup the tests plug in an "oracle"
proposer that drafts the true greedy continuation with every third token corrupted: every step then
mixes accepted drafts, a rejection and a bonus token.
"""

from __future__ import annotations

import pytest

from tests.conftest import VOCAB, varied_prompts
from tokenforge import LLM, SamplingParams
from tokenforge.config import SpeculativeConfig
from tokenforge.engine.engine import LLMEngine
from tokenforge.engine.messages import Draft

pytestmark = pytest.mark.timeout(300)
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


class OracleProposer:
    costly = False
    tree = False

    def __init__(self, refs: dict[tuple[int, ...], list[int]], corrupt_every: int = 3):
        self.refs = refs
        self.corrupt_every = corrupt_every

    def forget(self, req_id) -> None:
        pass

    def propose(self, reqs, ks):
        return [self._draft(r, k) for r, k in zip(reqs, ks, strict=True)]

    def _draft(self, req, k: int) -> Draft:
        return Draft(self._chain(req, k))

    def _chain(self, req, k: int) -> list[int]:
        ref = self.refs[tuple(req.prompt_token_ids)]
        pos = req.num_output_tokens
        return [(t + 1) % VOCAB if (pos + j) % self.corrupt_every == self.corrupt_every - 1 else t
                for j, t in enumerate(ref[pos:pos + k])]


class OracleTreeProposer(OracleProposer):
    """A tree whose right path is always the second child: a wrong sibling comes first at every depth, so
    accepted nodes sit away from their final slots and their K/V must be moved."""

    tree = True

    def _draft(self, req, k: int) -> Draft:
        ref = self.refs[tuple(req.prompt_token_ids)]
        pos = req.num_output_tokens
        tokens, parents, parent = [], [], -1
        for t in ref[pos:pos + k // 2]:
            tokens += [(t + 7) % VOCAB, t]
            parents += [parent, parent]
            parent = len(tokens) - 1
        return Draft(tokens, parents)


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def _spec_llm(llama_dir, proposer=None, **kwargs) -> LLM:
    spec = kwargs.pop("speculative", SpeculativeConfig(num_speculative_tokens=4, disable_batch_size=64,
                                                       max_batch_tokens=512))
    llm = LLM(str(llama_dir), speculative=spec, **kwargs)
    if proposer is not None:
        llm.client.engine.runner.proposer = proposer
    return llm


@pytest.fixture(scope="module")
def prompts():
    # a few prompts repeat themselves, so prompt lookup finds matches from the first step
    base = varied_prompts(10, seed=11)
    return base + [p + p[1:] for p in varied_prompts(4, seed=12, lo=6, hi=12)]


@pytest.fixture(scope="module")
def plain(llama_dir, prompts):
    llm = LLM(str(llama_dir))
    return _ids(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY))


def _refs(prompts, plain):
    return {tuple(p): out for p, out in zip(prompts, plain, strict=True)}


@pytest.mark.parametrize("mode", ["ngram", "oracle", "oracle-chunked", "oracle-preempt", "ngram-fixed-length",
                                  "ngram-tree", "oracle-tree", "oracle-tree-preempt"])
def test_greedy_output_is_token_identical(llama_dir, prompts, plain, mode):
    kwargs = {}
    if mode == "oracle-chunked":
        kwargs["max_num_batched_tokens"] = 7
    if mode.endswith("preempt"):
        kwargs["num_blocks"] = 12  # 14 requests of up to ~48 tokens in 16-token blocks: constant preemption
    if mode == "ngram-fixed-length":
        kwargs["speculative"] = SpeculativeConfig(num_speculative_tokens=3, adaptive=False, disable_batch_size=64,
                                                  max_batch_tokens=512)
    if mode.endswith("tree") or mode.endswith("tree-preempt"):
        kwargs["speculative"] = SpeculativeConfig(num_speculative_tokens=6, tree=True, disable_batch_size=64,
                                                  max_batch_tokens=512)
    proposer = OracleProposer(_refs(prompts, plain)) if mode.startswith("oracle") else None
    if mode.startswith("oracle-tree"):
        proposer = OracleTreeProposer(_refs(prompts, plain))
    llm = _spec_llm(llama_dir, proposer, **kwargs)
    assert _ids(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)) == plain
    stats = llm.client.engine.stats()
    assert stats["kv_blocks_used"] == 0
    assert stats["spec_decode_num_drafts"] > 0
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]
    if mode.endswith("preempt"):
        assert stats["num_preemptions"] > 0


def test_fewer_steps_with_good_drafts(llama_dir, prompts, plain):
    base = LLM(str(llama_dir))
    base.generate(prompt_token_ids=prompts[:1], sampling_params=GREEDY)
    llm = _spec_llm(llama_dir, OracleProposer(_refs(prompts, plain), corrupt_every=10**9))
    assert _ids(llm.generate(prompt_token_ids=prompts[:1], sampling_params=GREEDY)) == plain[:1]
    assert llm.client.engine.num_steps * 3 < base.client.engine.num_steps


def test_stops_logprobs_and_penalties_match_plain_decoding(llama_dir, prompts, plain):
    refs = _refs(prompts, plain)
    llm_plain = LLM(str(llama_dir))
    llm_spec = _spec_llm(llama_dir, OracleProposer(refs, corrupt_every=5))
    stop_tok = plain[2][9]
    cases = [
        SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_tok]),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, min_tokens=20),
    ]
    for params in cases:
        a = llm_plain.generate(prompt_token_ids=prompts, sampling_params=params)
        b = llm_spec.generate(prompt_token_ids=prompts, sampling_params=params)
        for x, y in zip(a, b, strict=True):
            ox, oy = x.outputs[0], y.outputs[0]
            assert (ox.token_ids, ox.text, ox.finish_reason, ox.stop_reason) == \
                (oy.token_ids, oy.text, oy.finish_reason, oy.stop_reason)
            if params.logprobs:
                assert [(lp.token_id, lp.rank) for lp in ox.logprobs] == [(lp.token_id, lp.rank) for lp in oy.logprobs]
                assert all(abs(p.logprob - q.logprob) < 1e-4 for p, q in zip(ox.logprobs, oy.logprobs, strict=True))
    # penalties change the continuation, so prompt lookup drafts (not the oracle) are used here
    llm_ngram = _spec_llm(llama_dir)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, frequency_penalty=0.5,
                            presence_penalty=0.3, repetition_penalty=1.2)
    assert _ids(llm_ngram.generate(prompt_token_ids=prompts, sampling_params=params)) == \
        _ids(llm_plain.generate(prompt_token_ids=prompts, sampling_params=params))
    assert llm_spec.client.engine.kv.num_used_blocks == 0 and llm_ngram.client.engine.kv.num_used_blocks == 0


def test_stop_strings_match_plain_decoding(llama_dir):
    prompt = "def fibonacci(n):"
    llm_plain = LLM(str(llama_dir))
    full = llm_plain.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    ids = llm_plain.get_tokenizer().encode(prompt)
    llm_spec = _spec_llm(llama_dir, OracleProposer({tuple(ids): full.token_ids}, corrupt_every=10**9))
    for lo, hi in ((3, 6), (10, 12), (20, 24)):
        stop = full.text[lo:hi]
        params = SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True)
        a = llm_plain.generate(prompt, params)[0].outputs[0]
        b = llm_spec.generate(prompt, params)[0].outputs[0]
        assert (a.text, a.token_ids, a.finish_reason, a.stop_reason) == \
            (b.text, b.token_ids, b.finish_reason, b.stop_reason)
        assert b.finish_reason == "stop" and stop not in b.text
    assert llm_spec.client.engine.stats()["spec_decode_num_accepted_tokens"] > 0
    assert llm_spec.client.engine.kv.num_used_blocks == 0


def test_abort_mid_speculation_frees_blocks(llama_dir, prompts, plain):
    engine = LLMEngine.from_args(str(llama_dir), speculative=SpeculativeConfig(num_speculative_tokens=4))
    engine.runner.proposer = OracleProposer(_refs(prompts, plain))
    for i, p in enumerate(prompts[:6]):
        engine.add_request(f"r{i}", prompt_token_ids=p, params=GREEDY)
    for _ in range(4):
        engine.step()
    assert engine.kv.num_used_blocks > 0
    engine.abort_request(["r0", "r3"])
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.req_id] = out.outputs[0].token_ids
    assert finished == {f"r{i}": plain[i] for i in (1, 2, 4, 5)}
    assert engine.kv.num_used_blocks == 0


def test_large_batches_stop_drafting(llama_dir, prompts, plain):
    spec = SpeculativeConfig(num_speculative_tokens=4, disable_batch_size=4)
    llm = _spec_llm(llama_dir, OracleProposer(_refs(prompts, plain), corrupt_every=10**9), speculative=spec)
    lengths = [4 + i for i in range(len(prompts))]  # the batch shrinks by one request per step
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    outs = _ids(llm.generate(prompt_token_ids=prompts, sampling_params=params))
    assert outs == [ref[:n] for ref, n in zip(plain, lengths, strict=True)]
    # drafting starts only once fewer than 4 requests are decoding: the last three requests' tails
    stats = llm.client.engine.stats()
    assert 0 < stats["spec_decode_num_drafts"] <= 3 * 4
    assert llm.client.engine.kv.num_used_blocks == 0
