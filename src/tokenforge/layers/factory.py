"""The linear factory: a model asks for each linear layer and its embedding by weight names; the factory
reads them from the weight source and builds the layer for the engine's quantization method.

Dense weights become `Linear` (method "none") or `Int8Linear` ("int8": per-row int8 made at load time).
Weights a source keeps quantized (`QuantizedTensor`) become the layer registered for their format in
`QUANTIZED_LINEARS`, which computes from the blocks directly. Several names make one fused layer whose
output is their outputs side by side (q/k/v, gate/up), so a layer runs one matmul instead of several.
The ggml formats' layers are registered by `layers/quant_linear.py`, which the `layers` package imports.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tokenforge.config import ConfigError
from tokenforge.layers.linear import Linear
from tokenforge.layers.quant import Int8Linear
from tokenforge.models.weights import QuantizedTensor, WeightSource

LinearBuilder = Callable[[torch.Tensor, torch.Tensor | None], torch.nn.Module]

# method name -> builder from a dense weight [out, in] and an optional float32 bias
QUANTIZATION_METHODS: dict[str, LinearBuilder] = {"none": Linear, "int8": Int8Linear}

# stored format -> builder from the quantized parts of one (possibly fused) layer and its bias
QUANTIZED_LINEARS: dict[str, Callable[[list[QuantizedTensor], torch.Tensor | None], torch.nn.Module]] = {}
# stored format -> embedding built from the quantized table
QUANTIZED_EMBEDDINGS: dict[str, Callable[[QuantizedTensor], torch.nn.Module]] = {}


class Embedding(torch.nn.Module):
    """Token ids -> float32 rows of a dense table (kept in the checkpoint's dtype)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight).float().contiguous()


class LinearFactory:
    """Builds a model's layers from `source`: dense weights in `dtype`, by `method` (a key of `methods`, the
    platform's builders; default QUANTIZATION_METHODS)."""

    def __init__(self, source: WeightSource, dtype: torch.dtype, method: str = "none",
                 methods: dict[str, LinearBuilder] | None = None):
        self.methods = QUANTIZATION_METHODS if methods is None else methods
        if method not in self.methods:
            raise ConfigError(f"quantization must be one of {sorted(self.methods)}, got {method!r}")
        self.source = source
        self.dtype = dtype
        self.method = method

    def linear(self, names: list[str], out_sizes: list[int], in_features: int,
               bias_names: list[str] | None = None) -> torch.nn.Module:
        """One layer computing x @ W^T (+ b) for W the named weights stacked by rows ([sum(out_sizes),
        in_features]); `bias_names`, if given, name one bias per weight."""
        bias = None
        if bias_names is not None:
            bias = torch.cat([self.source.get(b, (s,), torch.float32) for b, s in zip(bias_names, out_sizes,
                                                                                      strict=True)])
        stored = [self.source.stored(n, (s, in_features)) for n, s in zip(names, out_sizes, strict=True)]
        if any(isinstance(s, QuantizedTensor) for s in stored):
            return self._quantized(names, stored, bias)
        weight = stored[0].to(self.dtype) if len(stored) == 1 else torch.cat([s.to(self.dtype) for s in stored])
        return self.methods[self.method](weight, bias)

    def embedding(self, name: str, shape: tuple[int, int]) -> torch.nn.Module:
        stored = self.source.stored(name, shape)
        if isinstance(stored, QuantizedTensor):
            if stored.qtype not in QUANTIZED_EMBEDDINGS:
                raise ConfigError(f"{self.source.path}: tensor {name!r} is stored as {stored.qtype}, which has no "
                                  "quantized embedding")
            return QUANTIZED_EMBEDDINGS[stored.qtype](stored)
        return Embedding(stored.to(self.dtype))

    def _quantized(self, names: list[str], stored: list, bias: torch.Tensor | None) -> torch.nn.Module:
        """Parts in one format make one layer; a fused layer whose parts differ (Q4_K_M files mix Q4_K and
        Q6_K) becomes one layer per run of same-format parts, outputs side by side."""
        layers, row = [], 0
        for run in _runs_by_format(list(zip(names, stored))):
            run_names, parts = [n for n, _ in run], [s for _, s in run]
            rows = sum(p.shape[0] for p in parts)
            layers.append(self._one_format(run_names, parts, None if bias is None else bias[row:row + rows]))
            row += rows
        return layers[0] if len(layers) == 1 else ConcatLinear(layers)

    def _one_format(self, names: list[str], parts: list, bias: torch.Tensor | None) -> torch.nn.Module:
        if not isinstance(parts[0], QuantizedTensor):
            return QUANTIZATION_METHODS[self.method](torch.cat([p.to(self.dtype) for p in parts]), bias)
        if parts[0].qtype not in QUANTIZED_LINEARS:
            raise ConfigError(f"{self.source.path}: tensors {names} are stored as {[parts[0].qtype]}, which no "
                              "quantized linear layer computes")
        return QUANTIZED_LINEARS[parts[0].qtype](parts, bias)


def _format(stored) -> str:
    return stored.qtype if isinstance(stored, QuantizedTensor) else "dense"


def _runs_by_format(named: list[tuple[str, object]]) -> list[list[tuple[str, object]]]:
    runs: list[list[tuple[str, object]]] = []
    for item in named:
        if runs and _format(runs[-1][-1][1]) == _format(item[1]):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


class ConcatLinear(torch.nn.Module):
    """A fused layer kept as parts in different formats: their outputs side by side."""

    def __init__(self, parts: list[torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)
