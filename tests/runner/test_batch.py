"""The runner's batch layout, pinned: row order, token ids, positions, slots, sampling rows and the
attention metadata the CPU backend builds from them. No model."""

import pytest
import torch

from tokenforge.attention.cpu import DECODE_MAX_QUERY, CpuAttention
from tokenforge.runner.batch import BatchEntry, prepare_batch

BS = 4


def _entry(req_id, tokens, computed, table, draft=(), parents=None, sample=True):
    return BatchEntry(req_id, list(tokens), computed, list(table), list(draft), parents, sample)


def test_decodes_go_first_then_prefill_chunks_in_order():
    entries = [
        _entry("prefill", range(100, 112), 0, [7, 3, 9], sample=False),  # 12 new tokens: dense (no kernel)
        _entry("decode", [50], 5, [2, 8]),  # one token at position 5: block 8, offset 1
        _entry("draft", [60], 3, [4, 6], draft=[61, 62]),  # known token + 2 drafts at positions 3..5
    ]
    b = prepare_batch(entries, CpuAttention(use_kernel=False), BS, None)
    assert [e.req_id for e in b.entries] == ["decode", "draft", "prefill"]
    assert b.input_ids.tolist() == [50, 60, 61, 62] + list(range(100, 112))
    assert b.positions.tolist() == [5, 3, 4, 5] + list(range(12))
    slots = [8 * BS + 1, 4 * BS + 3, 6 * BS + 0, 6 * BS + 1] + [blk * BS + o for blk in (7, 3, 9) for o in range(4)]
    assert b.meta.slot_mapping.tolist() == slots
    assert b.sample_rows.tolist() == [0, 1, 2, 3]  # the decode's row, then a row after each draft prefix
    m = b.meta
    assert m.num_decode_tokens == 4
    assert m.decode_query_start.tolist() == [0, 1, 4] and m.decode_seq_lens.tolist() == [6, 6]
    assert m.decode_block_tables.tolist() == [[2, 8], [4, 6]] and m.decode_row_masks is None
    (chunk,) = m.prefills
    assert (chunk.query_start, chunk.num_tokens, chunk.num_computed_tokens) == (4, 12, 0)
    assert chunk.block_table.tolist() == [7, 3, 9]


def test_a_tree_takes_depth_positions_consecutive_slots_and_row_masks():
    tree = _entry("tree", [70], 6, [1, 2, 5], draft=[71, 72, 73], parents=[-1, -1, 0])
    plain = _entry("plain", [80], 2, [3])
    b = prepare_batch([tree, plain], CpuAttention(), BS, None)
    assert [e.req_id for e in b.entries] == ["tree", "plain"]
    assert b.positions.tolist() == [6, 7, 7, 8, 2]  # the two roots share depth 1; their child is at depth 2
    assert b.meta.slot_mapping.tolist() == [2 * BS + 2, 2 * BS + 3, 5 * BS + 0, 5 * BS + 1, 3 * BS + 2]
    # bit j of a row: sees new token j. Known token: itself; roots: it and themselves; the child: its root too
    assert b.meta.decode_row_masks.tolist() == [0b0001, 0b0011, 0b0101, 0b1011, 0b1]
    assert b.sample_rows.tolist() == [0, 1, 2, 3, 4]


def test_a_chunk_after_a_cached_prefix_attends_from_its_position():
    entries = [_entry("tail", range(20, 30), 8, [4, 5, 6, 7, 8], sample=True)]
    b = prepare_batch(entries, CpuAttention(use_kernel=False), BS, 16)
    assert b.positions.tolist() == list(range(8, 18)) and b.meta.num_decode_tokens == 0
    assert b.meta.sliding_window == 16 and b.sample_rows.tolist() == [9]
    (chunk,) = b.meta.prefills
    assert (chunk.num_computed_tokens, chunk.num_tokens) == (8, 10)
    assert torch.equal(chunk.block_table, torch.tensor([4, 5, 6, 7, 8]))


def test_with_the_kernel_a_short_chunk_after_a_cached_prefix_is_a_paged_row_group():
    """The compiled kernel reads a chat turn's cached history in place; only long chunks attend densely."""
    backend = CpuAttention()
    if backend.max_query == DECODE_MAX_QUERY:
        pytest.skip("no compiled CPU kernels are loaded: short chunks attend densely")
    tail = _entry("tail", range(20, 30), 8, [4, 5, 6, 7, 8])
    long = _entry("long", range(100, 100 + backend.max_query + 1), 0, list(range(9, 9 + 13)), sample=False)
    b = prepare_batch([long, tail], backend, BS, None)
    assert [e.req_id for e in b.entries] == ["tail", "long"]
    m = b.meta
    assert m.num_decode_tokens == 10 and m.decode_seq_lens.tolist() == [18] and m.decode_query_start.tolist() == [0, 10]
    (chunk,) = m.prefills
    assert (chunk.query_start, chunk.num_tokens) == (10, backend.max_query + 1)
