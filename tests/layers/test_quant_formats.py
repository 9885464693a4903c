"""The torch dequantizers of ggml's block formats against the gguf package's own (numpy) dequantizer, on
random blocks: every byte pattern is a valid quant, so random bytes with sane float16 scales cover them."""

import gguf
import numpy as np
import pytest
import torch

from tests.gguf_util import random_k_blocks
from tokenforge.layers.quant_formats import FORMATS, dequantize

Q = gguf.GGMLQuantizationType
GGML = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q4_k": Q.Q4_K, "q6_k": Q.Q6_K}


def random_rows(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if qtype in ("q4_k", "q6_k"):
        return random_k_blocks(rows, cols, GGML[qtype], rng)
    blocks = rng.integers(0, 256, (rows, cols // 32, FORMATS[qtype].block_bytes), dtype=np.uint8)
    scales = 2 if qtype == "q4_1" else 1  # d, or d and m
    blocks[..., :2 * scales] = rng.uniform(-0.1, 0.1, (rows, cols // 32, scales)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", sorted(FORMATS))
def test_dequantize_matches_gguf(qtype):
    data = random_rows(qtype, 9, 512)
    want = gguf.quants.dequantize(data, GGML[qtype])
    got = dequantize(torch.from_numpy(data), qtype, 512)
    assert got.dtype == torch.float32 and got.shape == (9, 512)
    assert np.array_equal(got.numpy(), want)
    assert np.abs(want).max() > 0


@pytest.mark.parametrize("qtype", sorted(FORMATS))
def test_block_sizes_are_ggmls(qtype):
    assert (FORMATS[qtype].block_size, FORMATS[qtype].block_bytes) == gguf.GGML_QUANT_SIZES[GGML[qtype]]


def test_wrong_row_size_is_refused():
    with pytest.raises(ValueError, match=r"q8_0 rows of 64 weights are uint8 \[R, 68\]"):
        dequantize(torch.zeros(2, 34, dtype=torch.uint8), "q8_0", 64)
