"""Linear's fast paths (skinny kernel, oneDNN-packed weights) against a plain float32 matmul."""

import pytest
import torch
import torch.nn.functional as F

from tokenforge import kernels
from tokenforge.layers.linear import Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 8])
@pytest.mark.parametrize("k", [64, 100, 577])
def test_skinny_kernel_matches_matmul(dtype, rows, k):
    assert kernels.LIB is not None, "the compiled kernels should be built by the install step"
    g = torch.Generator().manual_seed(rows * k)
    w = torch.randn(203, k, generator=g).to(dtype)
    x = torch.randn(rows, k, generator=g)
    torch.testing.assert_close(kernels.skinny_matmul(x, w), x @ w.float().T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 5, 16, 40, 64, 300])
def test_linear_every_regime_matches_reference(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g).to(dtype)
    b = torch.randn(96, generator=g)
    x = torch.randn(rows, 80, generator=g)
    layer = Linear(w, b)
    assert layer.weight_dtype == dtype
    torch.testing.assert_close(layer(x), F.linear(x, w.float(), b), atol=1e-4, rtol=1e-4)


def test_skinny_rejects_too_many_rows():
    with pytest.raises(ValueError, match="1..8 rows"):
        kernels.skinny_matmul(torch.randn(9, 8), torch.randn(4, 8))


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 16, 17, 29, 33, 48, 96])
@pytest.mark.parametrize("n,k", [(768, 64), (203, 577), (5, 130), (6, 128)])
def test_panel_kernel_matches_matmul(rows, n, k):
    """Row groups of 8 and 16, a ragged last panel (N not a multiple of 6) and K chunks of 128 and less."""
    g = torch.Generator().manual_seed(rows * k + n)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(rows, k, generator=g)
    packed = kernels.pack_panels(w)
    torch.testing.assert_close(kernels.panel_matmul(x, packed, n), x @ w.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kernels.panel_matmul(x, packed, n), x @ w.T, atol=1e-4, rtol=1e-4)  # buffers reused


def test_linear_keeps_its_weight_recoverable():
    """The float32 weight lives only in the panels and the oneDNN copy; quantization reads it back."""
    for n, k in [(64, 40), (20, 8), (7, 300)]:
        w = torch.randn(n, k)
        layer = Linear(w, None)
        assert layer.panels is not None and layer.plain is None
        assert torch.equal(layer.dense_weight(), w)


def test_panel_kernel_rejects_bad_shapes():
    packed = kernels.pack_panels(torch.randn(16, 8))
    with pytest.raises(ValueError, match="panel_matmul"):
        kernels.panel_matmul(torch.randn(0, 8), packed, 16)
    with pytest.raises(ValueError, match="panel_matmul"):
        kernels.panel_matmul(torch.randn(3, 9), packed, 16)  # K does not match the packing
    with pytest.raises(ValueError, match="panel_matmul"):
        kernels.panel_matmul(torch.randn(3, 8, dtype=torch.float64), packed, 16)
