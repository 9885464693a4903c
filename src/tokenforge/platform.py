"""The one place that knows about the hardware: device choice, thread count, allocator settings."""

from __future__ import annotations

import ctypes
import os
import sys

import torch


def device() -> torch.device:
    """CPU today; the CUDA path will hang off this switch."""
    return torch.device("cpu")


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
