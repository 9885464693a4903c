"""`bench perplexity` scores text as llama-perplexity does, and its numbers equal transformers' on the same
chunks."""

import math

import torch

from tests.conftest import hf_model
from tokenforge.bench.perplexity import chunk_nll, chunks, tokenforge_perplexity
from tokenforge.tokenizer import TokenizerWrapper

TEXT = ("def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
        "The quick brown fox jumps over the lazy dog. Hello world!\n") * 12


def test_chunks_start_with_bos_and_drop_the_tail():
    out = chunks(list(range(10, 35)), 8, bos=1)
    assert out == [[1, 11, 12, 13, 14, 15, 16, 17], [1, 19, 20, 21, 22, 23, 24, 25], [1, 27, 28, 29, 30, 31, 32, 33]]
    assert chunks(list(range(16)), 8, bos=None)[1] == list(range(8, 16))


def test_only_the_second_half_is_scored():
    logits = torch.zeros(8, 5)
    logits[4:7, 3] = 10.0  # confident and right on positions 4, 5, 6, which predict tokens 5, 6, 7
    nll, n = chunk_nll(logits, [0, 0, 0, 0, 0, 3, 3, 3])
    assert n == 3 and nll < 0.01


def test_perplexity_equals_transformers(llama_dir):
    got = tokenforge_perplexity(str(llama_dir), TEXT, 64, "float32", 1)
    tokenizer = TokenizerWrapper(llama_dir)
    ref_model = hf_model(llama_dir)
    nll, count = 0.0, 0
    for chunk in chunks(tokenizer.encode(TEXT), 64, bos=1):
        with torch.no_grad():
            logits = ref_model(torch.tensor([chunk])).logits[0]
        part, n = chunk_nll(logits, chunk)
        nll, count = nll + part, count + n
    assert got["scored_tokens"] == count
    assert abs(got["perplexity"] - math.exp(nll / count)) < 1e-3 * got["perplexity"]
