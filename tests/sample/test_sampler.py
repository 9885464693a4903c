"""Sampler: greedy and restricted sampling, penalties, min_tokens, logprobs and seeded reproducibility.

Statistical tests draw many rows in one call from a fixed global seed, so they are exact and not flaky.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tokenforge.sample import sampler as sampler_module
from tokenforge.sample.sampler import Sampler, SamplingState, apply_penalties
from tokenforge.sampling_params import SamplingParams

EOS = 9


@pytest.fixture(autouse=True)
def _fixed_global_seed():
    torch.manual_seed(0)


def _state(params: SamplingParams, prompt=(), output=()) -> SamplingState:
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    return SamplingState(params, generator, list(prompt), list(output))


def _sample(logits: torch.Tensor, params: SamplingParams, num_rows: int) -> list[int]:
    """`num_rows` independent draws from the same row of logits, in one batch."""
    return Sampler()(logits.expand(num_rows, -1), [_state(params) for _ in range(num_rows)]).token_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(dtype):
    logits = torch.randn(64, 5000).to(dtype)
    out = Sampler(eos_token_ids=[EOS])(logits, [_state(SamplingParams(temperature=0.0)) for _ in range(64)])
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 64


@pytest.mark.parametrize("params", [
    SamplingParams(top_k=1),
    SamplingParams(top_p=1e-6),
    SamplingParams(min_p=1.0),
    SamplingParams(temperature=2.0, min_p=0.999),
    SamplingParams(temperature=1e-4),
], ids=["top_k=1", "top_p tiny", "min_p=1", "min_p near 1", "temperature tiny"])
def test_restrictions_leaving_one_token_are_greedy(params):
    logits = torch.randn(200, 1000) * 3
    best = logits.argmax(dim=-1)
    logits[torch.arange(200), best] += 1.0  # a clear winner, so min_p near 1 leaves only it
    out = Sampler()(logits, [_state(params) for _ in range(200)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_top_k_samples_only_the_k_best_and_all_of_them():
    logits = torch.tensor([0.0, 3.0, 2.5, -1.0, 2.8, 2.9, 2.7, 0.5])
    drawn = set(_sample(logits, SamplingParams(top_k=5), 2000))
    assert drawn == {1, 2, 4, 5, 6}


def test_top_p_samples_only_the_nucleus():
    probs = torch.tensor([0.05, 0.40, 0.25, 0.02, 0.15, 0.08, 0.05])
    # Sorted: 0.40, 0.25 (0.65), 0.15 (0.80) -> reaches top_p = 0.7 at the third token.
    drawn = set(_sample(probs.log(), SamplingParams(top_p=0.7), 2000))
    assert drawn == {1, 2, 4}


def test_min_p_samples_only_tokens_near_the_best():
    probs = torch.tensor([0.30, 0.10, 0.2, 0.05, 0.35])
    drawn = set(_sample(probs.log(), SamplingParams(min_p=0.5), 2000))  # keep p >= 0.175
    assert drawn == {0, 2, 4}


def test_temperature_frequencies_match_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    num_draws = 20000
    drawn = torch.tensor(_sample(logits, SamplingParams(temperature=2.0), num_draws))
    expected = torch.softmax(logits / 2.0, dim=-1)
    observed = torch.bincount(drawn, minlength=4) / num_draws
    sigma = (expected * (1 - expected) / num_draws).sqrt()
    assert ((observed - expected).abs() < 5 * sigma).all()


def _reference_top_k_top_p(row: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One row, the obvious way: full sort, cut at k, renormalize, cut where the mass reaches top_p."""
    values, order = row.sort(descending=True)
    if top_k > 0:
        values[top_k:] = float("-inf")
    probs = values.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    if top_p < 1.0:
        values[before >= top_p] = float("-inf")
    return torch.empty_like(row).scatter_(0, order, values)


@pytest.mark.parametrize("num_candidates", [8, 1024])
def test_top_k_top_p_matches_full_sort_reference(monkeypatch, num_candidates):
    # A small candidate count sends the wide nuclei down the full-sort fallback.
    monkeypatch.setattr(sampler_module, "_TOP_P_CANDIDATES", num_candidates)
    vocab = 64
    logits = torch.randn(40, vocab) * torch.linspace(0.2, 6.0, 40).unsqueeze(1)
    settings = [(k, p) for k in (0, 1, 5, 30, 100) for p in (1.0, 0.3, 0.9)][1:]
    params = [SamplingParams(top_k=k, top_p=p) for k, p in settings for _ in range(3)][:40]
    restricted = logits.clone()
    sampler_module._apply_top_k_top_p(restricted, params)
    for row, original, p in zip(restricted, logits, params, strict=True):
        expected = _reference_top_k_top_p(original.clone(), p.top_k, p.top_p)
        assert torch.equal(row.isinf(), expected.isinf()), (p.top_k, p.top_p)
        assert torch.equal(row[~row.isinf()], original[~row.isinf()])


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.5, 0.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    state = _state(params, prompt=[0, 1], output=[2, 2, 3])
    # Repetition over prompt and output {0, 1, 2, 3}: divide positives by 2, multiply negatives by 2.
    # Then output counts {2: 2, 3: 1}: minus 0.5 per occurrence and 0.25 once per distinct token.
    expected = torch.tensor([[1.0, -2.0, 0.25 - 1.0 - 0.25, -1.0 - 0.5 - 0.25, 1.5, 0.0]])
    apply_penalties(logits, [state])
    torch.testing.assert_close(logits, expected)


def test_penalties_in_a_batch_touch_only_their_own_rows():
    logits = torch.randn(4, 50)
    states = [
        _state(SamplingParams(repetition_penalty=1.3), prompt=[1, 2, 3], output=[4, 4]),
        _state(SamplingParams(), prompt=[1, 2], output=[5]),
        _state(SamplingParams(presence_penalty=1.0), prompt=[7], output=[6, 6, 8]),
        _state(SamplingParams(frequency_penalty=-0.5, repetition_penalty=0.8), output=[9, 9, 9, 1]),
    ]
    batched = logits.clone()
    apply_penalties(batched, states)
    for row, state in enumerate(states):
        alone = logits[row:row + 1].clone()
        apply_penalties(alone, [state])
        torch.testing.assert_close(batched[row:row + 1], alone)
    torch.testing.assert_close(batched[1], logits[1])


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[0.0, 5.0, 4.9, 0.0], [0.0, 5.0, 4.9, 0.0]])
    states = [_state(SamplingParams(temperature=0.0, presence_penalty=1.0), output=[1]),
              _state(SamplingParams(temperature=0.0), output=[1])]
    assert Sampler()(logits, states).token_ids == [2, 1]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_blocks_eos_and_stop_tokens(temperature):
    logits = torch.zeros(1, 10)
    logits[0, EOS], logits[0, 8] = 50.0, 40.0
    sampler = Sampler(eos_token_ids=[EOS])
    params = SamplingParams(temperature=temperature, min_tokens=3, stop_token_ids=[8])
    for num_out in range(3):
        for _ in range(20):
            token = sampler(logits, [_state(params, output=[1] * num_out)]).token_ids[0]
            assert token not in (8, EOS)
    assert sampler(logits, [_state(params, output=[1, 1, 1])]).token_ids == [EOS]


def test_min_tokens_with_ignore_eos_still_blocks_stop_tokens():
    logits = torch.zeros(1, 10)
    logits[0, EOS], logits[0, 8] = 40.0, 50.0
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[8], ignore_eos=True)
    assert Sampler(eos_token_ids=[EOS])(logits, [_state(params)]).token_ids == [EOS]


def test_logprobs_are_of_the_raw_logits():
    logits = torch.randn(3, 100)
    raw_logprobs = logits.log_softmax(dim=-1)
    order = raw_logprobs.argsort(dim=-1, descending=True)
    output = order[0, :2].tolist()  # penalize the two best, so greedy picks the third
    states = [
        _state(SamplingParams(temperature=0.0, repetition_penalty=100.0, logprobs=4), output=output),
        _state(SamplingParams(temperature=0.7, top_p=0.9, logprobs=0, seed=3)),
        _state(SamplingParams(temperature=0.0)),
    ]
    out = Sampler()(logits, states)
    assert out.token_ids[0] == order[0, 2].item()
    assert out.logprobs[2] is None
    for row in (0, 1):
        lp = out.logprobs[row]
        token = out.token_ids[row]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(raw_logprobs[row, token].item(), abs=1e-6)
        assert lp.rank == int((raw_logprobs[row] > raw_logprobs[row, token]).sum()) + 1
    assert out.logprobs[0].rank == 3
    assert out.logprobs[1].top_logprobs == []
    top = out.logprobs[0].top_logprobs
    assert [t for t, _ in top] == order[0, :4].tolist()
    assert [v for _, v in top] == pytest.approx(raw_logprobs[0, order[0, :4]].tolist(), abs=1e-6)


def test_mixed_batch_equals_each_row_alone():
    logits = torch.randn(6, 300)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, min_tokens=5), SamplingParams(temperature=0.0, logprobs=2),
              SamplingParams(temperature=0.8, top_k=20, seed=1), SamplingParams(temperature=0.0)]
    states = [_state(p, prompt=[1, 2], output=[3]) for p in params]
    batched = Sampler(eos_token_ids=[EOS])(logits, states)
    for row, p in enumerate(params):
        alone = Sampler(eos_token_ids=[EOS])(logits[row:row + 1], [_state(p, prompt=[1, 2], output=[3])])
        assert alone.token_ids[0] == batched.token_ids[row]
        assert alone.logprobs[0] == batched.logprobs[row]


SEEDED = SamplingParams(temperature=0.9, top_p=0.95, top_k=200, seed=1234)


def _seeded_run(batch_params: list[SamplingParams], position: int, steps: list[torch.Tensor]) -> list[int]:
    """Tokens the request at `position` gets over several steps, each step a fresh batch of logits."""
    states = [_state(p) for p in batch_params]
    sampler = Sampler(eos_token_ids=[EOS])
    tokens = []
    for step_logits in steps:
        batch = torch.randn(len(states), step_logits.shape[0]) * 2  # the other rows: any logits
        batch[position] = step_logits
        tokens.append(sampler(batch, states).token_ids[position])
    return tokens


def test_seeded_request_is_independent_of_the_batch():
    steps = [torch.randn(32000) for _ in range(6)]
    others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0, logprobs=3),
              SamplingParams(temperature=0.7, top_p=0.5, seed=7), SamplingParams(temperature=1.2, min_p=0.1),
              SamplingParams(temperature=0.5, repetition_penalty=1.2, seed=99)]
    alone = _seeded_run([SEEDED], 0, steps)
    assert _seeded_run([others[0], others[1], SEEDED, others[2]], 2, steps) == alone
    assert _seeded_run([*reversed(others), SEEDED], len(others), steps) == alone
    assert _seeded_run([SEEDED, replace(SEEDED, seed=5)], 0, steps) == alone
    # A different seed gives a different stream (each draw has ~200 likely tokens).
    assert _seeded_run([replace(SEEDED, seed=4321)], 0, steps) != alone


def test_unseeded_requests_differ_between_calls():
    logits = torch.zeros(8, 1000)
    sampler = Sampler()
    params = SamplingParams(temperature=1.0)
    first = sampler(logits, [_state(params) for _ in range(8)]).token_ids
    second = sampler(logits, [_state(params) for _ in range(8)]).token_ids
    # Equal only with probability 1000**-8.
    assert first != second


def test_logits_shape_must_match_states():
    with pytest.raises(ValueError, match="num_states=2"):
        Sampler()(torch.zeros(3, 10), [_state(SamplingParams())] * 2)
