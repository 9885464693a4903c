"""Linear layers computed in float32 from weights prepared once at load time for the CPU.

Each batch-size regime has its own weight copy. Matmuls of many rows (prefill, large batches) are
compute-bound: they use a float32 copy reordered into oneDNN's blocked layout (as vLLM's CPU backend and
torch's inductor do), which on this project's AVX2 machines runs 1.2-3x faster than torch's default path;
CPUs without bf16/f16 matrix units gain nothing from narrow weights there. Matmuls of up to a few dozen
rows (decode) stream the weights: float32 weights are packed into 6-column panels for the panel kernel,
which reads each weight once for up to 16 rows and overlaps the weight stream with the arithmetic
(1.1-2x faster than oneDNN from 1 to 64 rows on the SmolLM2-135M layer shapes; on par at 96-128 rows,
and for the LM head at 64); bf16 weights go through the skinny kernel, which reads bf16 directly (half
the bytes of float32), for up to 8 rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenforge import kernels

# The batch size oneDNN tunes the packed layout for; measured best overall between 1 and 1024 rows.
_PACK_FOR_ROWS = 64
# Up to this many rows the skinny kernel beats the packed GEMM (measured on the SmolLM2-135M shapes).
_SKINNY_MAX_ROWS = 8
# Up to this many rows the panel kernel beats the packed GEMM; at 128 they tie (same shapes).
_PANEL_MAX_ROWS = 96


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_FOR_ROWS)
    except (RuntimeError, AttributeError):  # a torch build without the op: plain matmuls still work
        return None


class Linear(torch.nn.Module):
    """y = x @ W^T (+ b) with x, y in float32. `weight_dtype` records the checkpoint's precision."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight_dtype = weight.dtype
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.float()
        plain = weight.contiguous() if weight.dtype == torch.bfloat16 else weight.float().contiguous()
        self.packed = _pack(plain.float())
        self.panels = kernels.pack_panels(plain) if plain.dtype == torch.float32 and kernels.panel_supported(plain) \
            else None
        # kept only where no other copy serves: bf16 weights (the skinny kernel) and the fallbacks
        self.plain = None if self.panels is not None and self.packed is not None else plain
        self.skinny = self.plain is not None and kernels.skinny_matmul_supported(self.plain)

    def dense_weight(self) -> torch.Tensor:
        """W [out, in] in the checkpoint's precision (float32 or bf16), rebuilt from the panels if need be."""
        if self.plain is not None:
            return self.plain
        return kernels.unpack_panels(self.panels, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.panels is not None and rows <= _PANEL_MAX_ROWS:
            y = kernels.panel_matmul(x, self.panels, self.out_features)
        elif self.skinny and rows <= _SKINNY_MAX_ROWS:
            y = kernels.skinny_matmul(x, self.plain)
        elif self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        else:
            return F.linear(x, self.plain.float(), self.bias)
        return y if self.bias is None else y + self.bias
