"""The one place that knows about the hardware: the device, the attention backend and linear methods that
suit it, the CPU's features, thread count and allocator settings.

The runner, the KV cache and the model take their device and backends from `current_platform()`; a CUDA
platform will be one more branch here, with its backends imported lazily, and nothing else will branch on
the device. The compiled kernels choose their variant from `cpu_features()`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform as pyplatform
import sys
from dataclasses import dataclass

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


@functools.cache
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


# --- CPU features: what the compiled kernel variants may use -------------------------------------------

# The /proc/cpuinfo flag names the kernel variants care about (Linux spells them this way).
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16", "amx_int8", "clflushopt")


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction-set extensions this CPU (and the OS) offers, read once per process.

    `flags` holds the names of CPU_FLAGS that are present; `source` says where they came from
    ("/proc/cpuinfo", or "torch" where only torch's capability level was known).
    """

    model_name: str
    flags: frozenset[str]
    source: str
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): a cross-check ("AVX512", "AVX2", ...)

    def has(self, *names: str) -> bool:
        return all(n in self.flags for n in names)

    def missing(self, names: tuple[str, ...]) -> list[str]:
        return [n for n in names if n not in self.flags]


def _read_cpuinfo() -> tuple[str, set[str]] | None:
    try:
        with open("/proc/cpuinfo") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return None


def parse_cpuinfo(text: str) -> tuple[str, set[str]] | None:
    """(model name, flags) of the first processor in /proc/cpuinfo's text; None without a flags line."""
    model, flags = "unknown", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and flags is None:  # the first processor's; all cores of a machine match
            flags = set(value.split())
    return (model, flags) if flags is not None else None


def _flags_from_torch(capability: str) -> set[str]:
    """A lower bound from torch's dispatch level, for systems without /proc/cpuinfo."""
    flags = set()
    if capability in ("AVX2", "AVX512"):
        flags |= {"avx2", "fma", "f16c"}
    if capability == "AVX512":
        flags |= {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
    return flags


@functools.cache
def cpu_features() -> CpuFeatures:
    """The CPU's features (cached: the flags cannot change while the process runs)."""
    capability = torch.backends.cpu.get_cpu_capability()
    found = _read_cpuinfo()
    if found is None:
        return CpuFeatures(pyplatform.processor() or "unknown", frozenset(_flags_from_torch(capability)), "torch",
                           capability)
    model, flags = found
    return CpuFeatures(model, frozenset(flags & set(CPU_FLAGS)), "/proc/cpuinfo", capability)
