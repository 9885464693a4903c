"""The compiled paged-attention kernel (the process's variant and each variant this machine runs) against
the torch reference on made-up caches."""

import pytest
import torch

from tests import kernel_variants
from tokenforge.attention.cpu import kernel_available, paged_decode
from tokenforge.attention.torch_ref import paged_attention_ref


def _case(q_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-s // block_size) for s in seq_lens)
    num_blocks = len(seq_lens) * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)  # scattered blocks, as after churn
    tables = perm[: len(seq_lens) * max_blocks].view(len(seq_lens), max_blocks).to(torch.int32)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g)
    qs = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32), qs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 1, 128)])
@pytest.mark.parametrize("window", [None, 7])
def test_kernel_matches_reference(dtype, heads, kv_heads, head_dim, window):
    assert kernel_available(head_dim, dtype), "the compiled kernel should be built by the install step"
    q_lens, seq_lens = [1, 1, 3, 1, 5], [1, 17, 40, 100, 5]
    q, kc, vc, tables, sl, qs = _case(q_lens, seq_lens, heads, kv_heads, head_dim, 16, dtype)
    scale = head_dim ** -0.5
    got = paged_decode(q, kc, vc, tables, sl, qs, scale, window)
    want = paged_attention_ref(q, kc, vc, tables, sl, qs, scale, window)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_torch_fallback_is_the_reference():
    q, kc, vc, tables, sl, qs = _case([1, 2], [9, 33], 4, 2, 64, 8, torch.float32, seed=1)
    got = paged_decode(q, kc, vc, tables, sl, qs, 0.125, None, use_kernel=False)
    want = paged_attention_ref(q, kc, vc, tables, sl, qs, 0.125, None)
    assert torch.equal(got, want)


def test_tree_row_masks_match_dense_tree_attention():
    """A draft tree in the kernel: each row sees the cache plus its ancestors among the new tokens."""
    from tokenforge.attention.cpu import bool_mask
    from tokenforge.attention.torch_ref import dense_attention, gather_kv
    from tokenforge.runner.batch import tree_bits

    parents = [-1, -1, 0, 0, 2, 1]  # known token + 6 nodes: two roots, branching below
    bits, depths = tree_bits(parents)
    assert depths == [0, 1, 1, 2, 2, 3, 2]
    tree = bool_mask(bits)
    assert tree[5].tolist() == [True, True, False, True, False, True, False]  # node 4: root, 0, 2, itself
    q_lens, seq_lens = [1, 7], [20, 37]
    q, kc, vc, tables, sl, qs = _case(q_lens, seq_lens, 9, 3, 64, 16, torch.float32, seed=2)
    masks = torch.tensor([1] + bits)
    got = paged_decode(q, kc, vc, tables, sl, qs, 0.125, None, row_masks=masks)
    table = tables[1].long()
    want = dense_attention(q[1:], gather_kv(kc, table, 37), gather_kv(vc, table, 37), 30, 0.125, None, tree)
    torch.testing.assert_close(got[1:], want, atol=2e-5, rtol=1e-4)
    ref = paged_attention_ref(q, kc, vc, tables, sl, qs, 0.125, None, masks)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got[1:], paged_decode(q, kc, vc, tables, sl, qs, 0.125, None)[1:])  # mask matters


@pytest.mark.parametrize("name", kernel_variants.NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 1, 128), (6, 2, 80), (4, 2, 8),
                                                     (2, 1, 16), (3, 3, 96)])
def test_each_variant_matches_reference(name, dtype, heads, kv_heads, head_dim):
    """Every head size the kernel compiles (16-lane vectors where D is a multiple of 16, else 8), plain
    decode rows, multi-token queries of 3 and 9 rows (8-row groups plus a rest), a sliding window."""
    cpu = kernel_variants.load(name)
    q_lens, seq_lens = [1, 3, 9, 1], [1, 40, 100, 33]
    q, kc, vc, tables, sl, qs = _case(q_lens, seq_lens, heads, kv_heads, head_dim, 16, dtype, seed=head_dim)
    for window in (None, 20):
        got = cpu.paged_attention(q, kc, vc, tables, sl, qs, head_dim ** -0.5, window)
        want = paged_attention_ref(q, kc, vc, tables, sl, qs, head_dim ** -0.5, window)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
