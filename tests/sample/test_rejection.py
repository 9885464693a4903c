"""Speculative sampling keeps the target's distribution exactly: chi-square tests at significance 0.001.

Each test draws thousands of independent seeded verifications and compares the emitted tokens' counts
with the target distribution (or, end to end, with plain sampling). A correct rule fails one of these
tests with probability 0.001 per test; a wrong one (e.g. always accepting, or sampling the residual
without removing the draft) fails them by a wide margin.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import VOCAB as VOCAB_TINY
from tests.conftest import varied_prompts
from tokenforge import LLM, SamplingParams
from tokenforge.config import SpeculativeConfig
from tokenforge.engine.messages import Draft
from tokenforge.sample.rejection import DraftGroup, verify
from tokenforge.sample.sampler import Sampler, SamplingState

ALPHA_Z = 3.090  # the standard normal's 0.999 quantile: significance level 0.001


def chi2_critical(df: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at 1 - 0.001 (within 1% for df >= 2)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + ALPHA_Z * math.sqrt(h)) ** 3


def goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    n = counts.sum().item()
    expected = probs * n
    keep = expected >= 5  # pool the rare categories, as the test requires
    obs = torch.cat([counts[keep], counts[~keep].sum().unsqueeze(0)]).double()
    exp = torch.cat([expected[keep], expected[~keep].sum().unsqueeze(0)]).double()
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
    stat = (((obs - exp) ** 2) / exp).sum().item()
    return stat, chi2_critical(len(obs) - 1)


def two_sample(a: list[int], b: list[int]) -> tuple[float, float]:
    """Chi-square test that two samples come from one distribution (categories with < 10 in all pooled)."""
    cats = sorted(set(a) | set(b))
    ca = {c: a.count(c) for c in cats}
    cb = {c: b.count(c) for c in cats}
    big = [c for c in cats if ca[c] + cb[c] >= 10]
    rows = [(ca[c], cb[c]) for c in big] + [(sum(ca[c] for c in cats if c not in big),
                                             sum(cb[c] for c in cats if c not in big))]
    rows = [r for r in rows if sum(r) > 0]
    na, nb = len(a), len(b)
    stat = 0.0
    for x, y in rows:
        total = x + y
        ea, eb = total * na / (na + nb), total * nb / (na + nb)
        stat += (x - ea) ** 2 / ea + (y - eb) ** 2 / eb
    return stat, chi2_critical(len(rows) - 1)


VOCAB = 8
TRIALS = 6000


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, VOCAB, generator=g) * 1.5  # rows after draft prefixes of length 0, 1, 2
    params = SamplingParams(temperature=0.8, max_tokens=10)
    target = (logits / 0.8).softmax(-1)
    return logits, params, target


def _run(logits, params, drafts, draft_probs=None):
    groups = []
    for i, draft in enumerate(drafts):
        state = SamplingState(params, torch.Generator().manual_seed(1000 + i), [1, 2], [])
        groups.append(DraftGroup(state, draft, None if draft_probs is None else draft_probs))
    return verify(Sampler(), logits.repeat(len(drafts), 1), groups)


def test_deterministic_drafts_keep_the_target_distribution():
    logits, params, target = _setup()
    draft = [int(target[0].argmax()), 3]  # a likely first token, so the second position is reached often
    results = _run(logits, params, [draft] * TRIALS)
    first = torch.bincount(torch.tensor([tokens[0] for tokens, _ in results]), minlength=VOCAB)
    stat, crit = goodness_of_fit(first, target[0])
    assert stat < crit, (stat, crit)
    # given the first draft token was accepted, the next token follows the target's second row
    second = [tokens[1] for tokens, _ in results if tokens[0] == draft[0]]
    assert len(second) > 1000
    stat, crit = goodness_of_fit(torch.bincount(torch.tensor(second), minlength=VOCAB), target[1])
    assert stat < crit, (stat, crit)
    # both drafts accepted -> a bonus token from the third row
    third = [tokens[2] for tokens, _ in results if tokens[:2] == draft]
    assert all(len(t) <= 3 for t, _ in results) and len(third) > 0


def test_drafts_sampled_from_a_proposer_distribution_keep_the_target_distribution():
    logits, params, target = _setup(seed=1)
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(2, VOCAB, generator=g)).softmax(-1)  # a proposer that disagrees with the target
    drafts = [[int(torch.multinomial(q[0], 1, generator=g)), int(torch.multinomial(q[1], 1, generator=g))]
              for _ in range(TRIALS)]
    results = _run(logits, params, drafts, draft_probs=q)
    first = torch.bincount(torch.tensor([tokens[0] for tokens, _ in results]), minlength=VOCAB)
    stat, crit = goodness_of_fit(first, target[0])
    assert stat < crit, (stat, crit)
    second = torch.bincount(torch.tensor([tokens[1] for tokens, _ in results if len(tokens) > 1]), minlength=VOCAB)
    stat, crit = goodness_of_fit(second, target[1])
    assert stat < crit, (stat, crit)


def test_the_test_catches_a_biased_rule():
    """Sanity check of the statistic: always accepting the draft is rejected at this sample size."""
    _, _, target = _setup()
    biased = torch.zeros(VOCAB)
    biased[int(target[0].argmax())] = TRIALS  # what an always-accept rule would emit
    stat, crit = goodness_of_fit(biased.long(), target[0])
    assert stat > crit


class FixedProposer:
    """Drafts the same tokens whatever the text: wrong often, right sometimes. As a tree: two alternatives
    at the first depth, the first of them with one child."""

    costly = False

    def __init__(self, tokens, tree: bool):
        self.tokens = tokens
        self.tree = tree

    def forget(self, req_id):
        pass

    def propose(self, reqs, ks):
        if self.tree:
            a, b = self.tokens[:2]
            return [Draft([a, b, a], [-1, -1, 0]) for _ in reqs]
        return [Draft(self.tokens[:k]) for k in ks]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tree,method", [(False, "ngram"), (True, "ngram"), (True, "self")],
                         ids=["chain", "tree", "self-tree"])
def test_engine_sampling_distribution_matches_plain_sampling(llama_dir, tree, method):
    """Chains and trees of fixed drafts, and the int8 self-draft's greedy trees (its own guesses)."""
    prompt = varied_prompts(1, seed=21)[0]
    n = 600
    base = SamplingParams(temperature=0.8, max_tokens=3, ignore_eos=True)
    plain_llm = LLM(str(llama_dir))
    plain = plain_llm.generate(prompt_token_ids=[prompt] * n,
                               sampling_params=[SamplingParams(**{**vars(base), "seed": s}) for s in range(n)])
    spec_llm = LLM(str(llama_dir), speculative=SpeculativeConfig(
        method=method, num_speculative_tokens=3 if tree else 2, tree=tree, adaptive=False, draft_confidence=0.0,
        disable_batch_size=10**6, max_batch_tokens=10**6))
    if method == "ngram":  # draft the plain run's most common continuation: accepted a fair share of the time
        seconds = [o.outputs[0].token_ids[1] for o in plain]
        common, runner_up = sorted(set(seconds), key=seconds.count)[::-1][:2]
        spec_llm.client.engine.runner.proposer = FixedProposer([common, runner_up] if tree else [common, common], tree)
    spec = spec_llm.generate(prompt_token_ids=[prompt] * n,
                             sampling_params=[SamplingParams(**{**vars(base), "seed": 10**6 + s}) for s in range(n)])
    stats = spec_llm.client.engine.stats()
    assert stats["spec_decode_num_accepted_tokens"] > 0
    # the tiny random model spreads its mass over hundreds of tokens: compare 8 buckets of ids
    for pos in (1, 2):
        stat, crit = two_sample([o.outputs[0].token_ids[pos] * 8 // VOCAB_TINY for o in plain],
                                [o.outputs[0].token_ids[pos] * 8 // VOCAB_TINY for o in spec])
        assert stat < crit, (pos, stat, crit)
    assert spec_llm.client.engine.kv.num_used_blocks == 0
