"""The one place that knows about the hardware: the device, the attention backend and linear methods that
suit it, thread count and allocator settings.

The runner, the KV cache and the model take their device and backends from `current_platform()`; a CUDA
platform will be one more branch here, with its backends imported lazily, and nothing else will branch on
the device.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from functools import cache

import torch


@dataclass(frozen=True)
class Platform:
    name: str
    device: torch.device

    def attention_backend(self):
        """The attention backend for this device (imported here, so model code never picks one)."""
        from tokenforge.attention.cpu import CpuAttention

        return CpuAttention()

    def linear_methods(self) -> dict:
        """Quantization method name -> linear-layer builder for dense weights on this device."""
        from tokenforge.layers.factory import QUANTIZATION_METHODS

        return QUANTIZATION_METHODS


@cache
def current_platform() -> Platform:
    """The CPU: every path runs there, and it is the reference for any accelerator's."""
    return Platform("cpu", torch.device("cpu"))


def configure_cpu(num_threads: int | None) -> int:
    """Pin torch's (and the kernel's, which shares its OpenMP runtime) thread count; keep big buffers.

    glibc returns large freed buffers to the OS and faults them back in on the next step, which costs
    more than the matmuls on small models; raising the mmap threshold keeps them in the heap.
    """
    if num_threads is None:
        num_threads = int(os.environ.get("TOKENFORGE_NUM_THREADS", 0)) or len(os.sched_getaffinity(0))
    torch.set_num_threads(num_threads)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3
            libc.mallopt(m_mmap_threshold, 1 << 30)
            libc.mallopt(m_trim_threshold, 1 << 30)
        except OSError:
            pass  # not glibc: keep the allocator's defaults
    return num_threads
