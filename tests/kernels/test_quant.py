"""The GGUF block-format kernels of every variant against gguf's numpy reference (gguf.quants).

Q8_0/Q4_0/Q4_1 test blocks come from gguf's quantizer; Q4_K/Q6_K blocks are random bytes with sane fp16
scales, which exercises every code and 6-bit scale pattern. The int8-activation matmul is checked twice:
tightly against float32 arithmetic on the same int8-rounded activations, and against the exact float
product with the bound that rounding implies (each x moves by at most half its block's step).
"""

import gguf
import numpy as np
import pytest
import torch

from tests import kernel_variants
from tokenforge import kernels, matmul_plan
from tokenforge.kernel_quant import QTYPES

FORMATS = list(QTYPES)
M_ROWS = [1, 2, 7, 16, 33, 100]


@pytest.fixture(params=kernel_variants.NAMES)
def cpu(request):
    return kernel_variants.load(request.param)


def _kind(qtype):
    return getattr(gguf.GGMLQuantizationType, qtype.upper())


def _f16(value: float) -> np.ndarray:
    return np.frombuffer(np.float16(value).tobytes(), np.uint8)


def make_blocks(qtype: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    q = QTYPES[qtype]
    if qtype in ("q8_0", "q4_0", "q4_1"):
        w = rng.standard_normal((n, k)).astype(np.float32)
        w[0, :32] = 0.0  # an all-zero block (scale 0)
        return torch.from_numpy(gguf.quants.quantize(w, _kind(qtype)))
    raw = rng.integers(0, 256, (n, k // q.block, q.block_bytes), dtype=np.uint8)
    if qtype == "q4_k":  # d, dmin; the 12 bytes of 6-bit scales and mins stay random
        raw[..., 0:2], raw[..., 2:4] = _f16(0.011), _f16(0.023)
    else:  # q6_k: d last; the int8 scales stay random
        raw[..., 208:210] = _f16(0.0037)
    return torch.from_numpy(raw.reshape(n, -1).copy())


def dequantize_ref(data: torch.Tensor, qtype: str, k: int) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data.numpy(), _kind(qtype)).reshape(-1, k).copy())


def q8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x as the kernel sees it (per 32 values: scale max|x| / 127, codes rounded to nearest even), and the
    step of each value's block."""
    xb = x.view(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    step = (amax / 127).expand_as(xb)
    return (torch.round(xb * inv) * (amax / 127)).view_as(x), step.reshape(x.shape)


def _ks(qtype):
    # block counts per row: odd (an unpaired sub-block for AVX-512) and even
    return [96, 256, 544] if QTYPES[qtype].block == 32 else [256, 512, 768]


@pytest.mark.parametrize("qtype", FORMATS)
def test_dequantize_rows_matches_gguf(cpu, qtype):
    for k in _ks(qtype):
        data = make_blocks(qtype, 21, k, seed=k)
        want = dequantize_ref(data, qtype, k)
        assert torch.equal(cpu.quant_dequantize_rows(data, qtype, k), want)
        ids = torch.tensor([20, 0, 3, 3, 7])
        assert torch.equal(cpu.quant_dequantize_rows(data, qtype, k, ids), want[ids])


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("m", M_ROWS)
def test_int8_matmul_matches_reference(cpu, qtype, m):
    for n, k in [(37, _ks(qtype)[0]), (70, _ks(qtype)[1]), (5, _ks(qtype)[2])]:  # N not a multiple of 16
        data = make_blocks(qtype, n, k, seed=m + n)
        w = dequantize_ref(data, qtype, k)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(n))
        x[0, 32:64] = 0.0  # an all-zero activation block
        got = cpu.quant_matmul(x, data, qtype, n, k)
        xq, step = q8_activations(x)
        # same int8 activations, float32 sums in another order
        bound = 1e-5 * (xq.abs() @ w.abs().T) + 1e-5
        assert ((got - xq @ w.T).abs() <= bound).all()
        # the exact product: each x_k moved by at most half its block's step
        bound = (step / 2) @ w.abs().T * 1.001 + 1e-4
        assert ((got - x @ w.T).abs() <= bound).all()


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "q4_k"])
def test_float_activation_matvec_matches_reference(cpu, qtype):
    k = _ks(qtype)[1]
    data = make_blocks(qtype, 45, k)
    w = dequantize_ref(data, qtype, k)
    x = torch.randn(1, k)
    torch.testing.assert_close(cpu.quant_matmul(x, data, qtype, 45, k, f32_activations=True), x @ w.T,
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one row"):
        cpu.quant_matmul(torch.randn(2, k), data, qtype, 45, k, f32_activations=True)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantize_is_byte_for_byte_gguf(cpu, qtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(33, 320, generator=g) * 3
    w[0, :32] = 0.0  # all-zero block
    w[1, :32] = torch.linspace(-1, 1, 32)  # ties in magnitude: the first one sets the sign of Q4_0's scale
    w[2, :32] = 0.5  # codes landing exactly on .5 before rounding
    w[2, 32:64] = torch.tensor([-2.0, 2.0] * 16)
    got = cpu.quant_quantize(w, qtype)
    assert np.array_equal(got.numpy(), gguf.quants.quantize(w.numpy(), _kind(qtype)))


def test_public_api_paths_and_fallback(monkeypatch):
    """quant_pack keeps the raw blocks; quant_matmul takes each planned path; quant_rows gathers rows;
    without compiled kernels the gguf reference serves."""
    qtype, n, k = "q4_k", 50, 512
    data = make_blocks(qtype, n, k, seed=3)
    w = dequantize_ref(data, qtype, k)
    assert kernels.quant_supported(qtype) == (kernels.ACTIVE is not None) and not kernels.quant_supported("q5_k")
    x = torch.randn(9, k)
    for plan in (matmul_plan.MatmulPlan.single("int8"), matmul_plan.MatmulPlan.single("dequant")):
        monkeypatch.setattr(matmul_plan, "cached", lambda key, plan=plan: plan)
        packed = kernels.quant_pack(data, qtype, n, k)
        assert packed.data.data_ptr() == data.data_ptr()  # resident memory: the file's bytes, no copy
        got = kernels.quant_matmul(x, packed)
        tol = 0.02 * (x.abs() @ w.abs().T).max().item() if plan.path_for(9) == "int8" else 1e-4
        torch.testing.assert_close(got, x @ w.T, atol=tol, rtol=0)
    ids = torch.tensor([4, 49, 0])
    assert torch.equal(kernels.quant_rows(ids, packed), w[ids])
    assert torch.equal(kernels.quant_rows(ids, data, qtype, k), w[ids])
    monkeypatch.setattr(kernels, "ACTIVE", None)
    slow = kernels.quant_pack(data, qtype, n, k)
    torch.testing.assert_close(kernels.quant_matmul(x, slow), x @ w.T, atol=1e-4, rtol=1e-4)
    assert torch.equal(kernels.quant_rows(ids, slow), w[ids])
    dense = torch.randn(8, 64)
    assert np.array_equal(kernels.quant_quantize(dense, "q8_0").numpy(),
                          gguf.quants.quantize(dense.numpy(), gguf.GGMLQuantizationType.Q8_0))


def test_bad_blocks_are_refused():
    data = make_blocks("q4_0", 4, 64)
    with pytest.raises(ValueError, match="q4_0"):
        kernels.quant_pack(data[:, :-1].contiguous(), "q4_0", 4, 64)
    with pytest.raises(ValueError, match="qtype"):
        kernels.quant_pack(data, "q5_0", 4, 64)
    with pytest.raises(ValueError, match="multiple"):
        kernels.quant_pack(make_blocks("q8_0", 4, 64), "q8_0", 4, 48)
    if kernels.ACTIVE is not None:
        with pytest.raises(IndexError, match="ids"):
            kernels.quant_rows(torch.tensor([4]), data, "q4_0", 64)


@pytest.mark.parametrize("qtype", FORMATS)
def test_up_to_8_rows_each_row_is_summed_as_alone(cpu, qtype):
    """A batch-1 draft chain (<= 7 tokens + 1) is verified with exactly plain decoding's numbers, which keeps
    greedy speculation token-identical; from 9 rows the one-scale formats may take the 16-lane kernel."""
    k = _ks(qtype)[0]
    data = make_blocks(qtype, 37, k, seed=5)
    x = torch.randn(8, k, generator=torch.Generator().manual_seed(5))
    got = cpu.quant_matmul(x, data, qtype, 37, k)
    alone = torch.cat([cpu.quant_matmul(x[i:i + 1], data, qtype, 37, k) for i in range(8)])
    assert torch.equal(got, alone)
