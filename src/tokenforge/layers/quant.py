"""Weight-only int8 quantization, applied at load time to make a cheap copy of a model.

Each weight row (output feature) gets one float32 scale, max|w| / 127, and round-to-nearest int8 values:
a quarter of float32's bytes, which is what a bandwidth-bound decode step pays for. Activations stay float32.
Self-speculation uses such a copy of the target as its draft model: close enough to agree with the target
on most tokens, and whatever it gets wrong the target's verification rejects. `draft_builder` also offers
ggml's Q8_0 and Q4_0 blocks (`layers/quant_linear.py`) for that copy.
"""

from __future__ import annotations

import copy
import functools

import torch

from tokenforge import kernels
from tokenforge.layers.linear import Linear


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (int8 [N, K], float32 scale [N]) with weight ~= q * scale[:, None]."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class Int8Linear(torch.nn.Module):
    """y = x @ (q * scale)^T (+ b), x and y float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.qweight, self.scale = quantize_int8(weight)
        self.bias = None if bias is None else bias.float()
        self.fast = kernels.LIB is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast:  # the skinny kernel reads int8 directly; longer inputs go 8 rows at a time
            step = kernels.SKINNY_MAX_ROWS
            parts = [kernels.skinny_matmul_int8(x[i:i + step], self.qweight, self.scale)
                     for i in range(0, x.shape[0], step)]
            y = parts[0] if len(parts) == 1 else torch.cat(parts)
        else:
            y = (x @ self.qweight.float().T) * self.scale
        return y if self.bias is None else y + self.bias


def draft_builder(quantization: str = "int8"):
    """The layer builder `quantized_copy` takes for a self-speculation draft (SpeculativeConfig.draft_quantization):
    per-row int8, or ggml's q8_0 / q4_0 blocks computed by the block-quantized layer."""
    if quantization == "int8":
        return Int8Linear
    # imported here: layers/quant_linear.py registers itself with the factory, which imports this module
    from tokenforge.layers.quant_linear import block_quantized_linear

    return functools.partial(block_quantized_linear, quantization)


def quantized_copy(model: torch.nn.Module, build=Int8Linear) -> torch.nn.Module:
    """A copy of `model` whose Linear layers are rebuilt by `build(weight, bias)` (int8 by default);
    everything else (embeddings, norms, rotary tables) is shared with the original rather than duplicated."""
    clone = copy.copy(model)
    clone._modules = {}
    for name, child in model._modules.items():
        if isinstance(child, Linear):
            clone._modules[name] = build(child.dense_weight(), child.bias)
        elif child is not None and any(isinstance(m, Linear) for m in child.modules()):
            clone._modules[name] = quantized_copy(child, build)
        else:
            clone._modules[name] = child
    return clone
