"""Linear's paths (panel, skinny and bf16 dot-product kernels in every variant, oneDNN) against a plain
float32 matmul, and the measured plan that picks among them."""

import pytest
import torch
import torch.nn.functional as F

from tests import kernel_variants
from tokenforge import kernels, matmul_plan
from tokenforge.layers.linear import Linear
from tokenforge.matmul_plan import Candidate, MatmulPlan


@pytest.fixture(params=kernel_variants.NAMES)
def cpu(request):
    return kernel_variants.load(request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 8])
@pytest.mark.parametrize("k", [64, 100, 577])
def test_skinny_kernel_matches_matmul(cpu, dtype, rows, k):
    g = torch.Generator().manual_seed(rows * k)
    w = torch.randn(203, k, generator=g).to(dtype)
    x = torch.randn(rows, k, generator=g)
    torch.testing.assert_close(cpu.skinny_matmul(x, w), x @ w.float().T, atol=1e-4, rtol=1e-4)


def test_skinny_rejects_too_many_rows(cpu):
    with pytest.raises(ValueError, match="1..8 rows"):
        cpu.skinny_matmul(torch.randn(9, 8), torch.randn(4, 8))


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 16, 17, 29, 32, 33, 48, 96])
@pytest.mark.parametrize("n,k", [(768, 64), (203, 577), (5, 130), (6, 128)])
def test_panel_kernel_matches_matmul(cpu, rows, n, k):
    """Row groups of 8, 16 and 32, a ragged last panel (N not a multiple of 6), K chunks of 128 and less."""
    g = torch.Generator().manual_seed(rows * k + n)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(rows, k, generator=g)
    packed = kernels.pack_panels(w)
    torch.testing.assert_close(cpu.panel_matmul(x, packed, n), x @ w.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cpu.panel_matmul(x, packed, n), x @ w.T, atol=1e-4, rtol=1e-4)  # buffers reused


def test_panel_kernel_rejects_bad_shapes(cpu):
    packed = kernels.pack_panels(torch.randn(16, 8))
    with pytest.raises(ValueError, match="panel_matmul"):
        cpu.panel_matmul(torch.randn(0, 8), packed, 16)
    with pytest.raises(ValueError, match="panel_matmul"):
        cpu.panel_matmul(torch.randn(3, 9), packed, 16)  # K does not match the packing
    with pytest.raises(TypeError, match="panel_matmul"):
        cpu.panel_matmul(torch.randn(3, 8, dtype=torch.float64), packed, 16)


@pytest.mark.parametrize("name", kernel_variants.NAMES)
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 40])
@pytest.mark.parametrize("k", [32, 64, 100, 577])
def test_bf16_dot_kernel_matches_bf16_rounded_matmul(name, rows, k):
    """x is rounded to bf16 once, products are exact and sums float32: the reference is bf16(x) @ W^T in
    float32, equal up to summation order; full K steps of 32, a masked tail, row groups of 8 and a rest."""
    cpu = kernel_variants.with_bf16_dot(name)
    g = torch.Generator().manual_seed(rows * k)
    w = torch.randn(75, k, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=g)
    want = x.to(torch.bfloat16).float() @ w.float().T
    torch.testing.assert_close(cpu.bf16_matmul(x, w), want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(cpu.bf16_matmul(x, w), x @ w.float().T, atol=1e-6, rtol=1e-6)  # x was rounded


def test_variants_without_bf16_dot_say_so():
    for name in kernel_variants.NAMES:
        got = kernel_variants._load(name)
        if isinstance(got, str) or got.bf16_dot != "none":
            continue
        with pytest.raises(RuntimeError, match="no bf16 dot product"):
            got.bf16_matmul(torch.randn(1, 32), torch.randn(4, 32).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 5, 16, 40, 64, 300])
def test_linear_every_path_matches_reference(cpu, dtype, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g).to(dtype)
    b = torch.randn(96, generator=g)
    x = torch.randn(rows, 80, generator=g)
    layer = Linear(w, b, cpu, keep_all_paths=True)
    assert layer.weight_dtype == dtype
    want = F.linear(x, w.float(), b)
    # bf16 activations: each x_k rounded by at most 2^-9 of itself, so |error| <= 2^-9 sum_k |x_k w_k| (+ f32)
    bf16_bound = (x.abs() @ w.float().abs().T) * 2.0**-9 + 1e-4

    def check(path, y):
        if path == "onednn_bf16":  # oneDNN's bf16 GEMM also rounds its output (before the bias) to bf16
            assert ((y - want).abs() <= bf16_bound + (want - b).abs() * 2.0**-8).all(), path
        elif path == "bf16_dot":
            assert ((y - want).abs() <= bf16_bound).all(), path
        else:
            torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4, msg=path)

    check(layer.plan.path_for(rows), layer(x))
    paths = layer.candidates()
    # bf16 weights: the skinny kernel, or the bf16 dot product where both the variant and the CPU have one
    assert "panel" in paths if dtype != torch.bfloat16 else ("skinny" in paths or "bf16_dot" in paths)
    for name, c in paths.items():
        if c.max_rows is None or rows <= c.max_rows:
            check(name, layer.run_path(name, x))


def test_linear_follows_its_plan_and_frees_unused_copies(monkeypatch):
    w = torch.randn(40, 24)
    monkeypatch.setattr(matmul_plan, "cached", lambda key: MatmulPlan(((8, "panel"), (16, "onednn"))))
    layer = Linear(w, None)
    assert layer.panels is not None and layer.packed is not None and layer.plain is None
    assert torch.equal(layer.dense_weight(), w)  # rebuilt from the panels
    monkeypatch.setattr(matmul_plan, "cached", lambda key: MatmulPlan.single("onednn"))
    layer = Linear(w, None)
    assert layer.panels is None and torch.equal(layer.dense_weight(), w)  # plain kept to rebuild from
    calls = []
    monkeypatch.setattr(kernels.ACTIVE, "panel_matmul", lambda *a: calls.append(a) or torch.zeros(1, 40))
    monkeypatch.setattr(matmul_plan, "cached", lambda key: MatmulPlan(((8, "panel"), (16, "onednn"))))
    layer = Linear(w, None)
    layer(torch.randn(1, 24))
    layer(torch.randn(9, 24))
    assert len(calls) == 1  # 1 row took the panel kernel, 9 rows oneDNN


def test_plan_from_times_keeps_one_crossover():
    """Small-row paths below the crossover (a lone GEMM win among them is noise), the GEMM from the first
    rung it wins for good, and beyond the ladder."""
    measured = [(1, {"kernel": 5, "skinny": 4, "gemm": 3}), (2, {"kernel": 5, "skinny": 6, "gemm": 9}),
                (16, {"kernel": 5, "gemm": 9}), (32, {"kernel": 9, "gemm": 5}), (64, {"kernel": 9, "gemm": 5})]
    plan = matmul_plan.plan_from_times(measured, {"gemm"})
    assert plan.crossovers() == [(1, "skinny"), (16, "kernel"), (64, "gemm")]
    assert plan.path_for(2) == "kernel" and plan.path_for(17) == "gemm" and plan.path_for(5000) == "gemm"
    plan = matmul_plan.plan_from_times(measured[:3], {"gemm"})  # never won: serves only past the ladder
    assert plan.crossovers() == [(1, "skinny"), (16, "kernel"), (32, "gemm")]


def test_calibration_times_every_path_and_caches_the_plan():
    calls = {"kernel": 0, "gemm": 0}

    def run(name):
        return lambda x: calls.__setitem__(name, calls[name] + 1)

    cands = {"kernel": Candidate(run("kernel")), "gemm": Candidate(run("gemm"), large=True)}
    plan = matmul_plan.calibrate(("test", 1), cands, 8)
    assert calls["kernel"] > 0 and calls["gemm"] > 0
    assert matmul_plan.cached(("test", 1)) is plan and plan.path_for(10**6) == "gemm"
    assert "test 1" in matmul_plan.report()
