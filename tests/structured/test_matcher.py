"""The per-request matcher's contract: masks along a draft (chain or tree) equal the masks met by
consuming the draft one token at a time, the state is unchanged afterwards, acceptance is all or nothing,
rollback and reset restore earlier masks, and a finished grammar allows only EOS."""

from __future__ import annotations

import random

import pytest
import torch

from tokenforge.structured.logits import unpack_bitmask
from tokenforge.structured.matcher import ALL_ALLOWED
from tokenforge.structured.params import StructuredOutputsParams as Spec

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}}},
          "required": ["name", "tags"], "additionalProperties": False}


def mask_of(matcher) -> torch.Tensor:
    bitmask = torch.zeros(1, (matcher.vocab_size + 31) // 32, dtype=torch.int32)
    matcher.fill_bitmask(bitmask, 0)
    return bitmask[0].clone()


def allowed_ids(matcher) -> list[int]:
    return unpack_bitmask(mask_of(matcher)[None], matcher.vocab_size)[0].nonzero().squeeze(1).tolist()


def forbidden_id(matcher) -> int:
    allowed = set(allowed_ids(matcher))
    return next(t for t in range(matcher.vocab_size) if t not in allowed)


@pytest.fixture
def compiled(compiler):
    return compiler.compile(Spec(json=SCHEMA))


def valid_path(compiled, walker, seed: int) -> list[int]:
    ids, ended = walker.walk(compiled.matcher(), random.Random(seed))
    assert ended
    return ids


def fresh_at(compiled, prefix: list[int]):
    matcher = compiled.matcher()
    assert matcher.accept_tokens(prefix)
    return matcher


@pytest.mark.parametrize("seed", range(4))
def test_chain_draft_masks_equal_step_by_step_masks(compiled, walker, seed):
    path = valid_path(compiled, walker, seed)
    rng = random.Random(seed)
    start = rng.randrange(len(path) - 1)
    draft = path[start:start + 6]
    bad_at = rng.randrange(len(draft) + 1)  # len(draft): every draft token valid
    if bad_at < len(draft):
        draft[bad_at] = forbidden_id(fresh_at(compiled, path[:start] + draft[:bad_at]))
    matcher = fresh_at(compiled, path[:start])
    before = mask_of(matcher)
    bitmask = torch.zeros(1 + len(draft) + 2, (matcher.vocab_size + 31) // 32, dtype=torch.int32)
    num_valid = matcher.fill_draft_bitmasks(bitmask, 1, draft)

    assert num_valid == min(bad_at, len(draft))
    assert torch.equal(bitmask[1], before)
    for j in range(len(draft)):
        expected = mask_of(fresh_at(compiled, path[:start] + draft[:j + 1])) if j < num_valid else \
            torch.full_like(before, ALL_ALLOWED)
        assert torch.equal(bitmask[2 + j], expected), f"row after draft token {j}"
    assert torch.equal(mask_of(matcher), before) and matcher.num_accepted == start  # state unchanged
    assert matcher.validate_tokens(draft) == num_valid


def test_tree_draft_masks_follow_each_nodes_path(compiled, walker):
    path = valid_path(compiled, walker, 7)
    # a point where the grammar allows a choice, so the tree can branch into two valid roots
    at = next(i for i in range(len(path) - 2) if len(allowed_ids(fresh_at(compiled, path[:i]))) > 1)
    prefix, a, b = path[:at], path[at], path[at + 1]
    other = next(t for t in allowed_ids(fresh_at(compiled, prefix)) if t != a)
    bad_child = forbidden_id(fresh_at(compiled, prefix + [a]))
    # node: 0=a, 1=b (child of a), 2=bad (child of a), 3=b (child of the rejected 2), 4=other (root)
    tokens, parents = [a, b, bad_child, b, other], [-1, 0, 0, 2, -1]
    matcher = fresh_at(compiled, prefix)
    bitmask = torch.zeros(1 + len(tokens), (matcher.vocab_size + 31) // 32, dtype=torch.int32)
    num_valid = matcher.fill_draft_bitmasks(bitmask, 0, tokens, parents)

    assert num_valid == 3  # a, b and other
    full = torch.full_like(bitmask[0], ALL_ALLOWED)
    expected = [mask_of(fresh_at(compiled, prefix)), mask_of(fresh_at(compiled, prefix + [a])),
                mask_of(fresh_at(compiled, prefix + [a, b])), full, full,
                mask_of(fresh_at(compiled, prefix + [other]))]
    for row, mask in enumerate(expected):
        assert torch.equal(bitmask[row], mask), f"row {row}"
    assert matcher.num_accepted == at and torch.equal(mask_of(matcher), expected[0])


def test_accept_is_all_or_nothing_and_rollback_and_reset_restore(compiled, walker):
    path = valid_path(compiled, walker, 3)
    matcher = compiled.matcher()
    start = mask_of(matcher)
    assert matcher.accept_tokens(path[:2])
    after_two = mask_of(matcher)
    assert not matcher.accept_tokens([path[2], forbidden_id(fresh_at(compiled, path[:3]))])
    assert matcher.num_accepted == 2 and torch.equal(mask_of(matcher), after_two) and matcher.error is None
    assert matcher.accept_tokens(path[2:5])
    matcher.rollback(3)
    assert torch.equal(mask_of(matcher), after_two)
    with pytest.raises(ValueError, match="cannot roll back 3 tokens: 2 were accepted"):
        matcher.rollback(3)
    matcher.reset()
    assert matcher.num_accepted == 0 and torch.equal(mask_of(matcher), start)


def test_a_complete_grammar_terminates_and_allows_only_eos(compiler, tokenizer):
    matcher = compiler.matcher(Spec(choice=["yes", "no"]))
    assert not matcher.is_terminated and not matcher.is_accepting
    assert matcher.accept_tokens(tokenizer.encode("yes", add_special_tokens=False))
    assert matcher.is_terminated and matcher.is_accepting
    assert allowed_ids(matcher) == sorted(tokenizer.eos_token_ids)
    eos = sorted(tokenizer.eos_token_ids)[0]
    assert matcher.accept_tokens([eos]) and matcher.error is None and matcher.num_accepted == 2


def test_an_accepting_but_open_grammar_allows_eos_and_more(compiler, tokenizer):
    matcher = compiler.matcher(Spec(regex="[0-9]+"))
    assert matcher.accept_tokens(tokenizer.encode("12", add_special_tokens=False))
    allowed = allowed_ids(matcher)
    assert matcher.is_accepting and not matcher.is_terminated
    assert set(tokenizer.eos_token_ids) < set(allowed) and len(allowed) > 1


def test_a_matcher_in_error_allows_only_eos(compiler, tokenizer):
    matcher = compiler.matcher(Spec(regex="[0-9]+"))
    matcher._m.consume_token(forbidden_id(matcher))  # what the wrapper never does: llguidance's error state
    assert matcher.error
    assert allowed_ids(matcher) == sorted(tokenizer.eos_token_ids)


def test_bitmask_misuse_is_refused(compiler):
    matcher = compiler.matcher(Spec(regex="a"))
    with pytest.raises(ValueError, match="2-D int32 CPU tensor"):
        matcher.fill_bitmask(torch.zeros(1, 128, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="contiguous"):
        matcher.fill_bitmask(torch.zeros(128, 2, dtype=torch.int32).t(), 0)
    with pytest.raises(IndexError, match="bitmask row 2 is outside its 2 rows"):  # llguidance gets an address
        matcher.fill_bitmask(torch.zeros(2, 128, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="Invalid buffer size"):  # and llguidance checks the width
        matcher.fill_bitmask(torch.zeros(2, 64, dtype=torch.int32), 1)
