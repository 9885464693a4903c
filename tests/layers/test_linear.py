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


@pytest.mark.parametrize("rows", [1, 2, 6, 7, 13, 16, 29, 48])
@pytest.mark.parametrize("k", [64, 577])
def test_panel_kernel_matches_matmul(rows, k):
    g = torch.Generator().manual_seed(rows * k + 1)
    w = torch.randn(48 * 16, k, generator=g)
    x = torch.randn(rows, k, generator=g)
    torch.testing.assert_close(kernels.panel_matmul(x, kernels.pack_panels(w)), x @ w.T, atol=1e-4, rtol=1e-4)


def test_linear_keeps_its_weight_recoverable():
    """The float32 weight lives only in the panels and the oneDNN copy; quantization reads it back."""
    w = torch.randn(64, 40)
    layer = Linear(w, None)
    assert layer.panels is not None and layer.plain is None
    assert torch.equal(layer.dense_weight(), w)
    odd = Linear(torch.randn(20, 8), None)  # 20 outputs: no panels, the plain copy serves
    assert odd.panels is None and odd.plain is not None


def test_panel_kernel_rejects_bad_shapes():
    with pytest.raises(ValueError, match="panel_matmul"):
        kernels.panel_matmul(torch.randn(0, 8), kernels.pack_panels(torch.randn(16, 8)))
