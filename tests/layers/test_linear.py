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
@pytest.mark.parametrize("rows", [1, 3, 5, 64, 300])
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
