"""The machine's memory read bandwidth, and what it allows a decode step: the ceiling a bandwidth-bound
batch-1 decode cannot pass (every weight byte read once per token)."""

from __future__ import annotations

import statistics
import time

import torch

PROBE_BYTES = 1 << 30  # a 1 GiB float32 buffer: far past every cache


def read_bandwidth_gb_s(threads: int, repeats: int = 5) -> float:
    """Median GB/s of `torch.sum` over 1 GiB of float32 at `threads` threads (one pass reads every byte)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(PROBE_BYTES // 4)
        x.sum()  # touch the pages once
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x.sum()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return PROBE_BYTES / statistics.median(times) / 1e9


def decode_bytes_per_token(model_path: str, dtype: str) -> int:
    """Weight bytes a batch-1 decode step streams: a GGUF file's tensors as stored; a Hugging Face folder's
    parameters at the engine's dtype (float32: 4 bytes, bfloat16: 2)."""
    from pathlib import Path

    from safetensors import safe_open

    from tokenforge.models.gguf_file import find_gguf, read_gguf

    gguf_path = find_gguf(model_path)
    if gguf_path is not None:
        return sum(t.num_bytes for t in read_gguf(gguf_path).tensors.values())
    numel = 0
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                count = 1
                for d in shape:
                    count *= d
                numel += count
    return numel * (2 if dtype == "bfloat16" else 4)
