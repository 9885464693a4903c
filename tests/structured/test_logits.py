"""The batched constraints step against a plain per-row, per-token reference: bias, allowed ids, bad
words (vLLM's rule), grammar bitmasks, rows without constraints untouched, and the grammar winning when the
other bans would leave nothing."""

from __future__ import annotations

import random

import pytest
import torch

from tokenforge.structured.logits import RowConstraints, apply_constraints, bad_words_token_ids, unpack_bitmask

VOCAB = 100
NEG_INF = float("-inf")


def reference(logits: torch.Tensor, rows: list[RowConstraints | None], bitmask: torch.Tensor | None) -> torch.Tensor:
    out = logits.clone()
    for i, row in enumerate(rows):
        if row is None:
            continue
        biased = out[i].clone()
        for t, b in (row.logit_bias or {}).items():
            if t < VOCAB:
                biased[t] += b
        banned = set()
        if row.allowed_token_ids is not None:
            banned |= set(range(VOCAB)) - set(row.allowed_token_ids)
        for word in row.bad_words_token_ids:
            prefix = list(word[:-1])
            if not prefix or list(row.output_token_ids[len(row.output_token_ids) - len(prefix):]) == prefix \
                    and len(row.output_token_ids) >= len(prefix):
                banned.add(word[-1])
        grammar = set()
        if row.bitmask_row is not None:
            words = bitmask[row.bitmask_row].tolist()
            grammar = {t for t in range(VOCAB) if not (words[t // 32] >> (t % 32)) & 1}
        kept = [t for t in range(VOCAB) if t not in banned | grammar and biased[t] != NEG_INF]
        if not kept and banned:  # the grammar wins: allowed ids and bad words give way
            banned = set()
        for t in banned | grammar:
            biased[t] = NEG_INF
        out[i] = biased
    return out


def random_row(rng: random.Random, bitmask_rows: int) -> RowConstraints | None:
    if rng.random() < 0.2:
        return None
    row = RowConstraints()
    if rng.random() < 0.5:
        row.logit_bias = {rng.randrange(VOCAB + 5): rng.uniform(-100, 100) for _ in range(rng.randrange(1, 6))}
    if rng.random() < 0.4:
        row.allowed_token_ids = rng.sample(range(VOCAB + 3), rng.randrange(1, 30))
    if rng.random() < 0.5:
        row.output_token_ids = [rng.randrange(5) for _ in range(rng.randrange(0, 6))]
        row.bad_words_token_ids = [[rng.randrange(5) for _ in range(rng.randrange(1, 4))] for _ in range(3)]
    if rng.random() < 0.6:
        row.bitmask_row = rng.randrange(bitmask_rows)
    return row


@pytest.mark.parametrize("seed", range(30))
def test_batched_constraints_equal_the_reference(seed):
    rng = random.Random(seed)
    num_rows = rng.randrange(1, 9)
    rows = [random_row(rng, 4) for _ in range(num_rows)]
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, VOCAB, generator=g)
    bitmask = torch.randint(-2**31, 2**31 - 1, (4, 4), dtype=torch.int32, generator=g)
    if seed % 5 == 0:
        bitmask[seed % 4] = 0  # a row the grammar closes completely except what it sets below
        bitmask[seed % 4, 0] = 1 << 3
    expected = reference(logits, rows, bitmask)
    apply_constraints(logits, rows, bitmask)
    assert torch.equal(logits, expected)


def test_rows_without_constraints_are_untouched_and_nothing_is_done_without_any():
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    apply_constraints(logits, [None, None, None])
    assert torch.equal(logits, before)
    apply_constraints(logits, [None, RowConstraints(allowed_token_ids=[7]), None])
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    assert torch.isfinite(logits[1]).nonzero().squeeze(1).tolist() == [7]


def test_the_grammar_wins_when_allowed_ids_leave_nothing():
    bitmask = torch.zeros(1, 4, dtype=torch.int32)
    bitmask[0, 1] = 1 << 2  # the grammar allows only token 34
    logits = torch.zeros(2, VOCAB)
    rows = [RowConstraints(bitmask_row=0, allowed_token_ids=[1, 2], logit_bias={34: 1.5}),
            RowConstraints(bitmask_row=0, allowed_token_ids=[34, 35])]
    apply_constraints(logits, rows, bitmask)
    assert torch.isfinite(logits[0]).nonzero().squeeze(1).tolist() == [34] and logits[0, 34] == 1.5
    assert torch.isfinite(logits[1]).nonzero().squeeze(1).tolist() == [34]


def test_bad_words_follow_vllms_rule():
    words = [[7], [1, 2, 3]]
    rows = [RowConstraints(bad_words_token_ids=words, output_token_ids=[9, 1, 2]),  # bans 7 and 3
            RowConstraints(bad_words_token_ids=words, output_token_ids=[1, 2, 9]),  # bans 7
            RowConstraints(bad_words_token_ids=words, output_token_ids=[2]),  # bans 7
            RowConstraints(bad_words_token_ids=words, output_token_ids=[1, 2])]  # the whole prefix: bans 3, 7
    logits = torch.zeros(len(rows), VOCAB)
    apply_constraints(logits, rows)
    assert [torch.isneginf(r).nonzero().squeeze(1).tolist() for r in logits] == [[3, 7], [7], [7], [3, 7]]


def test_unpack_bitmask_matches_bit_arithmetic():
    words = torch.tensor([[-1, 0, 5, -2**31], [1, 2, 3, 4]], dtype=torch.int32)
    bits = unpack_bitmask(words, 120)
    assert bits.shape == (2, 120) and bits.dtype == torch.bool
    for r in range(2):
        expected = [bool((int(words[r, t // 32]) >> (t % 32)) & 1) for t in range(120)]
        assert bits[r].tolist() == expected


def test_bad_words_are_tokenized_with_and_without_a_leading_space(tokenizer):
    ids = bad_words_token_ids(["import", " os"], tokenizer)
    assert tokenizer.encode("import", add_special_tokens=False) in ids
    assert tokenizer.encode(" import", add_special_tokens=False) in ids
    assert tokenizer.encode("os", add_special_tokens=False) in ids
    assert len(ids) == len({tuple(i) for i in ids})
    assert bad_words_token_ids(["x"], tokenizer.tokenizer) == bad_words_token_ids(["x"], tokenizer)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="logits must be"):
        apply_constraints(torch.zeros(2, VOCAB), [None])
    with pytest.raises(ValueError, match="no bitmask"):
        apply_constraints(torch.zeros(1, VOCAB), [RowConstraints(bitmask_row=0)])


@pytest.mark.skipif(__import__("tokenforge").kernels.ACTIVE is None, reason="no compiled CPU kernels in this build")
def test_the_bitmask_kernel_equals_the_torch_unpack(monkeypatch):
    """The compiled per-row bitmask pass (the default) and the torch unpack-and-fill give the same logits,
    on a vocabulary that ends inside a word and with words that allow everything."""
    import tokenforge.structured.logits as L

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 1000, generator=g)
    bitmask = torch.randint(-2**31, 2**31 - 1, (4, 32), dtype=torch.int32, generator=g)
    bitmask[1, ::3] = -1
    rows = [RowConstraints(bitmask_row=2), None, RowConstraints(bitmask_row=1)]
    fast, slow = logits.clone(), logits.clone()
    assert L._bitmask_kernel(fast, bitmask)
    apply_constraints(fast, rows, bitmask)
    monkeypatch.setattr(L, "_bitmask_kernel", lambda *_: False)
    apply_constraints(slow, rows, bitmask)
    assert torch.equal(fast, slow) and torch.isneginf(fast[0]).any() and torch.equal(fast[1], logits[1])
