"""Linear layers and embeddings over ggml block-quantized weights (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K), registered
with the linear factory for the formats a GGUF file stores.

A layer keeps its weight as the file's blocks (uint8 [rows, row_bytes]) and never a dequantized copy, so
a model stays about the size of its file. Each layer's arithmetic is one small method (`_matmul`,
`_rows`); today it is the plain torch reference: dequantize a chunk of rows, multiply, next chunk. The
C++ kernels (`kernels.py`) will replace exactly these bodies:

    __init__:      self.packed = kernels.quant_pack(self.data, self.qtype, n, k)  (once, at load)
    _matmul(x):    return kernels.quant_matmul(x, self.packed)                   (x f32 [M, K] -> [M, N])
    _rows(ids):    return kernels.quant_rows(ids, self.packed, ...)               (ids int64 [T] -> [T, K])

`block_quantized_linear` quantizes a dense weight to Q8_0 or Q4_0 blocks at load time, for the
self-speculation draft (`layers/quant.py: draft_builder`).
"""

from __future__ import annotations

import gguf
import torch

from tokenforge.layers.factory import QUANTIZED_EMBEDDINGS, QUANTIZED_LINEARS
from tokenforge.layers.quant_formats import FORMATS, dequantize
from tokenforge.models.weights import QuantizedTensor

# float32 weights dequantized at a time by the reference path: 4 MiB of scratch, a few L2 caches' worth
_CHUNK_WEIGHTS = 1 << 20


class QuantLinear(torch.nn.Module):
    """y = x @ W^T (+ b) with W [out, in] kept as blocks of one ggml format; x and y float32."""

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None):
        super().__init__()
        self.qtype = weight.qtype
        self.out_features, self.in_features = weight.shape
        expected = (self.out_features, FORMATS[self.qtype].row_bytes(self.in_features))
        if tuple(weight.data.shape) != expected or self.in_features % FORMATS[self.qtype].block_size:
            raise ValueError(f"a {self.qtype} weight of shape {weight.shape} is uint8 {expected}, got "
                             f"{tuple(weight.data.shape)}")
        self.data = weight.data
        self.bias = None if bias is None else bias.float()
        self._chunk_rows = max(1, _CHUNK_WEIGHTS // self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x.float())
        return y if self.bias is None else y + self.bias

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x @ W^T [M, N]: the reference, one chunk of dequantized rows at a time."""
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        for start in range(0, self.out_features, self._chunk_rows):
            rows = self.data[start:start + self._chunk_rows]
            y[:, start:start + rows.shape[0]] = x @ dequantize(rows, self.qtype, self.in_features).T
        return y

    def dense_weight(self) -> torch.Tensor:
        """W [out, in] in float32 (for tests and inspection; the layer itself never keeps it)."""
        return dequantize(self.data, self.qtype, self.in_features)


class QuantEmbedding(torch.nn.Module):
    """Token ids -> float32 rows of a table kept as blocks of one ggml format."""

    def __init__(self, table: QuantizedTensor):
        super().__init__()
        self.qtype = table.qtype
        self.num_embeddings, self.embedding_dim = table.shape
        self.data = table.data

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._rows(input_ids.reshape(-1)).view(*input_ids.shape, self.embedding_dim)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> the rows they name, dequantized [T, K] (only those rows are decoded)."""
        return dequantize(self.data[ids], self.qtype, self.embedding_dim)


def quantized_linear(parts: list[QuantizedTensor], bias: torch.Tensor | None) -> QuantLinear:
    """One layer from the parts of a fused projection (q/k/v, gate/up) stored in one format: rows are
    stacked once at load. A single part keeps its blocks as they are (a tied LM head shares the
    embedding's table)."""
    if len(parts) == 1:
        return QuantLinear(parts[0], bias)
    rows = sum(p.shape[0] for p in parts)
    stacked = QuantizedTensor(parts[0].qtype, torch.cat([p.data for p in parts]), (rows, parts[0].shape[1]))
    return QuantLinear(stacked, bias)


# gguf's quantizer for the formats a dense weight can be turned into at load time
_QUANTIZERS = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}


def quantize_blocks(weight: torch.Tensor, qtype: str) -> QuantizedTensor:
    """A dense weight [N, K] (K a multiple of 32) -> Q8_0 or Q4_0 blocks, as llama.cpp's quantizer makes them."""
    if qtype not in _QUANTIZERS:
        raise ValueError(f"can quantize to {sorted(_QUANTIZERS)}, not {qtype!r}")
    n, k = weight.shape
    if k % FORMATS[qtype].block_size:
        raise ValueError(f"{qtype} needs rows of a multiple of {FORMATS[qtype].block_size} weights, got {k}")
    blocks = gguf.quants.quantize(weight.detach().float().contiguous().numpy(), _QUANTIZERS[qtype])
    return QuantizedTensor(qtype, torch.from_numpy(blocks), (n, k))


def block_quantized_linear(qtype: str, weight: torch.Tensor, bias: torch.Tensor | None) -> QuantLinear:
    return QuantLinear(quantize_blocks(weight, qtype), bias)


for _qtype in FORMATS:
    QUANTIZED_LINEARS[_qtype] = quantized_linear
    QUANTIZED_EMBEDDINGS[_qtype] = QuantEmbedding
