"""The fused elementwise kernels (norms, SiLU-and-multiply, rotary + KV store) against their torch forms:
through the layers (the process's variant) and each variant this machine runs, directly."""

import pytest
import torch
import torch.nn.functional as F

from tests import kernel_variants
from tokenforge import kernels
from tokenforge.attention import rotate_and_write_kv
from tokenforge.config import RopeConfig
from tokenforge.layers.activation import silu_and_mul
from tokenforge.layers.norm import RMSNorm
from tokenforge.layers.rotary import Rotary, apply_rotary

pytestmark = pytest.mark.skipif(kernels.LIB is None, reason="compiled kernels not built")

# 1 and 16 rows run on one thread, 300 rows are split across the threads; 577 and 70 leave a scalar tail
SHAPES = [(1, 576), (16, 577), (300, 256), (5, 70)]


def _torch_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_rms_norm_matches_torch(rows, hidden):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, hidden, generator=g) * 3, torch.randn(hidden, generator=g)
    torch.testing.assert_close(RMSNorm(w, 1e-5)(x), _torch_norm(x, w, 1e-5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_add_rms_norm_updates_residual(rows, hidden):
    g = torch.Generator().manual_seed(hidden)
    x, d, w = (torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g),
               torch.randn(hidden, generator=g))
    expect_x = x + d
    out = RMSNorm(w, 1e-6).add_forward(x, d)
    torch.testing.assert_close(x, expect_x)
    torch.testing.assert_close(out, _torch_norm(expect_x, w, 1e-6), atol=1e-5, rtol=1e-5)


def test_norm_of_a_view_takes_the_torch_path():
    x = torch.randn(4, 3, 64)[:, 1]  # not contiguous
    w = torch.randn(64)
    torch.testing.assert_close(RMSNorm(w, 1e-6)(x), _torch_norm(x, w, 1e-6))


@pytest.mark.parametrize("rows,m", [(1, 1536), (16, 1537), (300, 256)])
def test_silu_and_mul_matches_torch(rows, m):
    g = torch.Generator().manual_seed(m)
    gate_up = torch.randn(rows, 2 * m, generator=g) * 8  # reaches both saturated ends of the sigmoid
    gate_up[0, :4] = torch.tensor([-120.0, 120.0, 0.0, -88.5])
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(gate_up), F.silu(gate) * up, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 200])
def test_rotary_and_kv_store_match_torch(cache_dtype, tokens):
    heads, kv_heads, d, blocks, bs = 6, 2, 64, 32, 16
    g = torch.Generator().manual_seed(tokens)
    rotary = Rotary(RopeConfig(theta=10000.0), d, 1024)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g)
    positions = torch.randint(0, 1024, (tokens,), generator=g)
    slots = torch.randperm(blocks * bs, generator=g)[:tokens]
    k_cache = torch.zeros(blocks, bs, kv_heads, d, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)

    cos, sin = rotary.tables(positions)
    q_size, kv_size = heads * d, kv_heads * d
    expect_q = apply_rotary(qkv[:, :q_size].reshape(tokens, heads, d), cos, sin)
    expect_k = apply_rotary(qkv[:, q_size:q_size + kv_size].reshape(tokens, kv_heads, d), cos, sin)
    expect_v = qkv[:, q_size + kv_size:].reshape(tokens, kv_heads, d).clone()

    rotate_and_write_kv(qkv, rotary, positions, heads, kv_heads, k_cache, v_cache, slots)
    torch.testing.assert_close(qkv[:, :q_size].reshape(tokens, heads, d), expect_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qkv[:, q_size:q_size + kv_size].reshape(tokens, kv_heads, d), expect_k,
                               atol=1e-5, rtol=1e-5)
    flat_k, flat_v = k_cache.view(-1, kv_heads, d), v_cache.view(-1, kv_heads, d)
    # bf16 stores round to nearest even, exactly as torch's conversion does
    torch.testing.assert_close(flat_k[slots].float(), expect_k.to(cache_dtype).float(), atol=1e-5, rtol=1e-2)
    assert torch.equal(flat_v[slots], expect_v.to(cache_dtype))
    untouched = torch.ones(blocks * bs, dtype=torch.bool)
    untouched[slots] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


@pytest.fixture(params=kernel_variants.NAMES)
def cpu(request):
    return kernel_variants.load(request.param)


@pytest.mark.parametrize("rows,hidden", SHAPES + [(3, 31)])
def test_each_variant_norms_match_torch(cpu, rows, hidden):
    g = torch.Generator().manual_seed(rows + hidden)
    x, d, w = (torch.randn(rows, hidden, generator=g) * 3, torch.randn(rows, hidden, generator=g),
               torch.randn(hidden, generator=g))
    torch.testing.assert_close(cpu.rms_norm(x, w, 1e-5), _torch_norm(x, w, 1e-5), atol=1e-5, rtol=1e-5)
    expect_x = x + d
    out = cpu.add_rms_norm(x, d, w, 1e-6)
    torch.testing.assert_close(x, expect_x)
    torch.testing.assert_close(out, _torch_norm(expect_x, w, 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows,m", [(1, 1536), (16, 1537), (300, 256), (2, 15)])
def test_each_variant_silu_mul_matches_torch(cpu, rows, m):
    g = torch.Generator().manual_seed(m)
    gate_up = torch.randn(rows, 2 * m, generator=g) * 8
    gate_up[0, :4] = torch.tensor([-120.0, 120.0, 0.0, -88.5])
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(cpu.silu_mul(gate_up), F.silu(gate) * up, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 32, 48])
def test_each_variant_rotary_and_kv_store_match_torch(cpu, cache_dtype, d):
    heads, kv_heads, tokens, slots_total = 6, 2, 9, 64
    g = torch.Generator().manual_seed(d)
    rotary = Rotary(RopeConfig(theta=10000.0), d, 128)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g)
    positions = torch.randint(0, 128, (tokens,), generator=g)
    slots = torch.randperm(slots_total, generator=g)[:tokens]
    k_cache = torch.zeros(slots_total, kv_heads, d, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    cos, sin = rotary.tables(positions)
    want = apply_rotary(qkv[:, :(heads + kv_heads) * d].reshape(tokens, heads + kv_heads, d), cos, sin)
    want_v = qkv[:, (heads + kv_heads) * d:].reshape(tokens, kv_heads, d).clone()
    cpu.rotary_store_kv(qkv, heads, kv_heads, d, rotary.cos, rotary.sin, positions, k_cache, v_cache, slots)
    got = qkv[:, :(heads + kv_heads) * d].reshape(tokens, heads + kv_heads, d)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache[slots].float(), want[:, heads:].to(cache_dtype).float(), atol=1e-5, rtol=1e-2)
    assert torch.equal(v_cache[slots], want_v.to(cache_dtype))
