"""The engine-facing glue: per-request constraint state from SamplingParams, and one step's rows laid out
for the worker and the logits step, drafts included, giving the masks the matchers give."""

from __future__ import annotations

import pytest
import torch

from tokenforge.sampling_params import SamplingParams
from tokenforge.structured.logits import apply_constraints, unpack_bitmask
from tokenforge.structured.state import RequestConstraints, plan_rows
from tokenforge.structured.worker import BitmaskWorker


def test_from_params(compiler, tokenizer):
    assert RequestConstraints.from_params(SamplingParams(), compiler, tokenizer) is None
    state = RequestConstraints.from_params(SamplingParams(logit_bias={3: 1.0}, bad_words=["os"]), compiler, tokenizer)
    assert state.matcher is None and state.logit_bias == {3: 1.0} and state.bad_words_token_ids
    assert state.accept([1, 2, 3]) and not state.is_terminated
    with pytest.raises(ValueError, match="the regex does not compile"):
        RequestConstraints.from_params(SamplingParams(structured_outputs={"regex": "(x"}), compiler, tokenizer)


def test_a_finished_choice_terminates(compiler, tokenizer):
    state = RequestConstraints.from_params(SamplingParams(structured_outputs={"choice": ["yes", "no"]}), compiler,
                                           tokenizer)
    assert state.accept(tokenizer.encode("yes", add_special_tokens=False)) and state.is_terminated
    assert not RequestConstraints.from_params(SamplingParams(structured_outputs={"choice": ["yes"]}), compiler,
                                              tokenizer).accept(tokenizer.encode("no", add_special_tokens=False))


def test_plan_rows_lays_out_a_mixed_batch(compiler, tokenizer):
    json_state = RequestConstraints.from_params(SamplingParams(structured_outputs={"json": {
        "type": "array", "items": {"type": "integer"}}}, bad_words=["[1"]), compiler, tokenizer)
    bias_state = RequestConstraints.from_params(SamplingParams(logit_bias={5: -100.0}), compiler, tokenizer)
    tree_state = RequestConstraints.from_params(SamplingParams(structured_outputs={"regex": "[ab]+"}), compiler,
                                                tokenizer)
    a, b = (tokenizer.encode(c, add_special_tokens=False)[0] for c in "ab")
    draft = tokenizer.encode("[1, 2", add_special_tokens=False)
    entries = [(None, [7], [8, 9], None), (json_state, [], draft, None), (bias_state, [1], [], None),
               (tree_state, [], [a, b, b], [-1, -1, 0])]
    jobs, rows = plan_rows(entries)

    assert len(rows) == 3 + (1 + len(draft)) + 1 + 4
    assert rows[:3] == [None, None, None]
    assert [j.row for j in jobs] == [3, 3 + 1 + len(draft) + 1]
    json_rows = rows[3:4 + len(draft)]
    assert [r.bitmask_row for r in json_rows] == list(range(3, 4 + len(draft)))
    assert [list(r.output_token_ids) for r in json_rows] == [draft[:j] for j in range(len(draft) + 1)]
    assert rows[4 + len(draft)].bitmask_row is None and rows[4 + len(draft)].logit_bias == {5: -100.0}
    assert [list(r.output_token_ids) for r in rows[-4:]] == [[], [a], [b], [a, b]]  # each tree node's path

    worker = BitmaskWorker(compiler.vocab_size, len(rows))
    logits = torch.zeros(len(rows), compiler.vocab_size)
    apply_constraints(logits, rows, worker.submit(jobs).wait().bitmask)
    worker.close()

    assert torch.equal(logits[:3], torch.zeros(3, compiler.vocab_size))  # unconstrained rows untouched
    expected = torch.zeros(1 + len(draft), compiler.bitmask_width, dtype=torch.int32)
    json_state.matcher.fill_draft_bitmasks(expected, 0, draft)
    for j in range(len(draft) + 1):
        allowed = unpack_bitmask(expected[j:j + 1], compiler.vocab_size)[0]
        for word in json_state.bad_words_token_ids:
            if ends_with(draft[:j], word[:-1]):
                allowed[word[-1]] = False
        assert torch.equal(torch.isfinite(logits[3 + j]), allowed), f"draft row {j}"
    bias_row = logits[4 + len(draft)]
    assert bias_row[5] == -100.0 and bias_row.count_nonzero() == 1
    tree_expected = torch.zeros(4, compiler.bitmask_width, dtype=torch.int32)
    tree_state.matcher.fill_draft_bitmasks(tree_expected, 0, [a, b, b], [-1, -1, 0])
    assert torch.equal(torch.isfinite(logits[-4:]), unpack_bitmask(tree_expected, compiler.vocab_size))


def ends_with(tokens, suffix) -> bool:
    return len(tokens) >= len(suffix) and list(tokens[len(tokens) - len(suffix):]) == list(suffix)
