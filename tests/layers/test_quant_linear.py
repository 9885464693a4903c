"""Block-quantized layers against dequantize-then-matmul, fused layers (one format, and mixed formats as
a Q4_K_M file has them), the tied head sharing the embedding's blocks, and the Q8_0/Q4_0 copies made
from dense weights for self-speculation."""

import gguf
import numpy as np
import pytest
import torch

from tests.layers.test_quant_formats import random_rows
from tokenforge.layers import quant_linear
from tokenforge.layers.factory import QUANTIZED_EMBEDDINGS, QUANTIZED_LINEARS, ConcatLinear, LinearFactory
from tokenforge.layers.linear import Linear
from tokenforge.layers.quant import draft_builder
from tokenforge.layers.quant_formats import FORMATS, dequantize
from tokenforge.layers.quant_linear import QuantEmbedding, QuantLinear, quantize_blocks
from tokenforge.models.weights import QuantizedTensor


def qtensor(qtype: str, rows: int, cols: int, seed: int = 0) -> QuantizedTensor:
    return QuantizedTensor(qtype, torch.from_numpy(random_rows(qtype, rows, cols, seed)), (rows, cols))


def test_every_native_format_is_registered():
    assert set(QUANTIZED_LINEARS) == set(FORMATS) == set(QUANTIZED_EMBEDDINGS)


@pytest.mark.parametrize("qtype", sorted(FORMATS))
@pytest.mark.parametrize("rows", [1, 7])
def test_linear_equals_dequantize_then_matmul(monkeypatch, qtype, rows):
    """Float32 activations: exact up to the order of the float32 sums; int8 activations (the default, per 32
    values): within 2 % of the output's scale. The plain reference, in chunks of 3 rows (the last one short),
    is exact too."""
    monkeypatch.setattr(quant_linear, "_CHUNK_WEIGHTS", 3 * 512)
    weight, bias = qtensor(qtype, 10, 512), torch.randn(10)
    x = torch.randn(rows, 512)
    dense = dequantize(weight.data, qtype, 512)
    exact = x @ dense.T + bias
    # summing 512 products in another order (8 or 16 lanes, blocks of 32) moves a result by a few hundred
    # float32 roundings of the products' absolute sum at most; a wrong scale or block is off by the output itself
    rounding = 256 * torch.finfo(torch.float32).eps * (x.abs() @ dense.abs().T + bias.abs())
    layer = QuantLinear(weight, bias, activations="f32")
    assert ((layer(x) - exact).abs() <= rounding).all()
    assert ((layer.reference_matmul(x) + bias - exact).abs() <= rounding).all()
    int8 = QuantLinear(weight, bias)
    assert (int8(x) - exact).abs().max() <= 0.02 * exact.abs().max()
    assert not any(t.dtype == torch.float32 and t.numel() >= dense.numel() for t in vars(layer).values()
                   if isinstance(t, torch.Tensor)), "the layer must not keep a dequantized copy"


@pytest.mark.parametrize("qtype", sorted(FORMATS))
def test_embedding_decodes_only_the_rows_asked_for(qtype):
    table = qtensor(qtype, 20, 256, seed=1)
    ids = torch.tensor([[3, 0, 19], [3, 7, 7]])
    got = QuantEmbedding(table)(ids)
    assert got.shape == (2, 3, 256)
    torch.testing.assert_close(got, dequantize(table.data, qtype, 256)[ids], rtol=0, atol=0)


class Source:
    """A WeightSource over given tensors (quantized or dense)."""

    path = "memory"

    def __init__(self, tensors):
        self.tensors = tensors

    def has(self, name):
        return name in self.tensors

    def stored(self, name, shape):
        return self.tensors[name]

    def get(self, name, shape, dtype):
        return self.tensors[name].to(dtype)


def test_fused_layer_of_one_format_stacks_rows_once():
    parts = {"q": qtensor("q4_0", 64, 256, 1), "k": qtensor("q4_0", 32, 256, 2), "v": qtensor("q4_0", 32, 256, 3)}
    layer = LinearFactory(Source(parts), torch.float32, quant_activations="f32").linear(["q", "k", "v"],
                                                                                      [64, 32, 32], 256)
    assert isinstance(layer, QuantLinear) and layer.data.shape[0] == 128
    dense = torch.cat([dequantize(p.data, "q4_0", 256) for p in parts.values()])
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), x @ dense.T, rtol=1e-5, atol=1e-5)


def test_fused_layer_of_mixed_formats_keeps_one_part_per_run():
    parts = {"q": qtensor("q4_k", 64, 256, 1), "k": qtensor("q4_k", 32, 256, 2), "v": qtensor("q6_k", 32, 256, 3),
             "b": torch.randn(16, 256)}
    biases = {f"{n}.bias": torch.randn(s) for n, s in (("q", 64), ("k", 32), ("v", 32), ("b", 16))}
    layer = LinearFactory(Source(parts | biases), torch.float32, quant_activations="f32").linear(
        ["q", "k", "v", "b"], [64, 32, 32, 16], 256, [f"{n}.bias" for n in "qkvb"])
    assert isinstance(layer, ConcatLinear)
    assert [type(p) for p in layer.parts] == [QuantLinear, QuantLinear, Linear]
    assert [p.out_features for p in layer.parts] == [96, 32, 16]
    dense = torch.cat([dequantize(p.data, p.qtype, 256) for p in list(parts.values())[:3]] + [parts["b"]])
    x = torch.randn(5, 256)
    torch.testing.assert_close(layer(x), x @ dense.T + torch.cat(list(biases.values())), rtol=1e-5, atol=1e-5)


def test_tied_head_shares_the_embedding_blocks():
    table = qtensor("q8_0", 40, 64)
    factory = LinearFactory(Source({"embed": table}), torch.float32)
    embed, head = factory.embedding("embed", (40, 64)), factory.linear(["embed"], [40], 64)
    assert isinstance(head, QuantLinear) and head.data is embed.data


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantize_blocks_is_ggmls_quantizer(qtype):
    w = torch.randn(6, 96)
    blocks = quantize_blocks(w, qtype)
    ggml = gguf.GGMLQuantizationType.Q8_0 if qtype == "q8_0" else gguf.GGMLQuantizationType.Q4_0
    assert np.array_equal(blocks.data.numpy(), gguf.quants.quantize(w.numpy(), ggml))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_blocks(torch.randn(2, 40), qtype)


@pytest.mark.parametrize("quantization, tol", [("q8_0", 0.01), ("q4_0", 0.2), ("int8", 0.01)])
def test_draft_builders_stay_close_to_the_dense_layer(quantization, tol):
    w, b, x = torch.randn(48, 128) * 0.1, torch.randn(48), torch.randn(4, 128)
    layer = draft_builder(quantization)(w, b)
    exact = x @ w.T + b
    assert (layer(x) - exact).abs().max() <= tol * exact.abs().max()
