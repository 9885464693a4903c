"""Every kernel variant this machine can run, for tests that compare each with the torch reference.

A variant the CPU cannot run is skipped with the reason (the missing flags) in pytest's summary; one the
CPU can run but that was not built fails, since the install step should have built it.
"""

from __future__ import annotations

import functools

import pytest

from tokenforge.kernel_lib import VARIANTS, CpuKernels, VariantUnavailable, load_variant
from tokenforge.platform import cpu_features

NAMES = [v.name for v in VARIANTS]


@functools.cache
def _load(name: str) -> CpuKernels | str:
    try:
        return load_variant(name)
    except VariantUnavailable as e:
        return str(e)


def load(name: str) -> CpuKernels:
    """The variant's kernels, or a skip naming what this CPU lacks."""
    got = _load(name)
    if isinstance(got, str):
        runnable = not cpu_features().missing(next(v for v in VARIANTS if v.name == name).flags)
        if runnable:
            pytest.fail(got)
        pytest.skip(got)
    return got


def with_bf16_dot(name: str) -> CpuKernels:
    cpu = load(name)
    if cpu.bf16_dot == "none":
        pytest.skip(f"kernel variant {name!r} has no bf16 dot product (built without avx512_bf16, not emulated)")
    return cpu
