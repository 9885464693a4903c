"""The compiled CPU kernels (csrc/*.cpp, built at install time once per ISA variant) behind one ctypes seam.

At import the best variant this CPU can run is loaded (avx512bf16, then avx512, then avx2: see
kernel_lib.VARIANTS for the flags each needs); TOKENFORGE_CPU_ISA=avx2|avx512|avx512bf16|avx512bf16emu forces
one (an error if the CPU cannot run it) and TOKENFORGE_CPU_ISA=none takes the plain-torch paths. The module's
functions are the chosen variant's checked methods (kernel_lib.CpuKernels); `ACTIVE` is that variant (None
without a library). The libraries link torch's own OpenMP runtime (loaded first, by soname), so the kernels
follow torch.set_num_threads. Without a library every caller has a plain-torch path giving the same numbers.
"""

from __future__ import annotations

import logging
import os

import torch

from tokenforge.kernel_lib import (
    BY_NAME,
    PANEL_COLS,
    SKINNY_MAX_ROWS,
    VARIANTS,
    CpuKernels,
    VariantUnavailable,
    library_path,
    load_variant,
)
from tokenforge.platform import cpu_features

logger = logging.getLogger(__name__)

ISA_ENV = "TOKENFORGE_CPU_ISA"
PANEL_CHUNK = 128  # K per chunk of the packed panel layout

__all__ = ["ACTIVE", "LIB", "CpuKernels", "VariantUnavailable", "load_variant", "runnable_variants", "kernel_report",
           "SKINNY_MAX_ROWS", "PANEL_COLS", "PANEL_CHUNK"]


def choose_variant(forced: str | None = None) -> CpuKernels | None:
    """The variant to use: `forced` (a name, or "none"), else the best automatic one the CPU runs and that
    was built. A forced variant the CPU cannot run, or that was not built, raises VariantUnavailable."""
    if forced:
        if forced == "none":
            return None
        if forced not in BY_NAME:
            raise VariantUnavailable(f"{ISA_ENV}={forced!r} is not a kernel variant; choose one of "
                                     f"{sorted(BY_NAME)} or 'none'")
        try:
            return load_variant(forced)
        except VariantUnavailable as e:
            raise VariantUnavailable(f"{ISA_ENV}={forced}: {e}") from None
    features = cpu_features()
    for variant in VARIANTS:
        if not variant.automatic or features.missing(variant.flags):
            continue
        try:
            return load_variant(variant.name, features)
        except VariantUnavailable as e:  # runnable but not built (an old compiler): take the next one
            logger.warning("%s; trying the next variant", e)
    logger.warning("no compiled CPU kernels for this CPU (%s); using slower torch paths (run: make install)",
                   features.model_name)
    return None


def runnable_variants() -> dict[str, CpuKernels | str]:
    """Every variant by name: its loaded kernels where this machine can run it, else the reason it cannot."""
    out: dict[str, CpuKernels | str] = {}
    for variant in VARIANTS:
        try:
            out[variant.name] = ACTIVE if ACTIVE is not None and ACTIVE.name == variant.name else \
                load_variant(variant.name)
        except VariantUnavailable as e:
            out[variant.name] = str(e)
    return out


ACTIVE: CpuKernels | None = choose_variant(os.environ.get(ISA_ENV, "").strip().lower() or None)
LIB = None if ACTIVE is None else ACTIVE.lib  # kept for callers that only ask whether kernels exist


def _missing(name: str):
    def call(*args, **kwargs):
        raise RuntimeError(f"kernels.{name}: no compiled CPU kernels are loaded (check the *_supported "
                           "function first, or run: make install)")
    return call


def _bind(name: str):
    """The active variant's method itself (no extra Python call on the hot path)."""
    return _missing(name) if ACTIVE is None else getattr(ACTIVE, name)


skinny_matmul = _bind("skinny_matmul")
skinny_matmul_int8 = _bind("skinny_matmul_int8")
panel_matmul = _bind("panel_matmul")
bf16_matmul = _bind("bf16_matmul")
paged_attention = _bind("paged_attention")
rms_norm = _bind("rms_norm")
add_rms_norm = _bind("add_rms_norm")
silu_mul = _bind("silu_mul")
rotary_store_kv = _bind("rotary_store_kv")


def skinny_matmul_supported(weight: torch.Tensor) -> bool:
    return ACTIVE is not None and weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous()


def panel_supported(weight: torch.Tensor) -> bool:
    return ACTIVE is not None and weight.dim() == 2 and weight.shape[0] > 0 and weight.shape[1] > 0


def paged_attention_supported(head_dim: int, cache_dtype: torch.dtype) -> bool:
    return ACTIVE is not None and ACTIVE.paged_attention_supported(head_dim, cache_dtype)


def fused_supported(x: torch.Tensor) -> bool:
    """The fused elementwise kernels take float32, contiguous, row-major [T, H] CPU tensors."""
    return ACTIVE is not None and x.is_cpu and x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous()


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> the flat float32 layout panel_matmul streams: [K / 128][N / 6][<=128][6], N zero padded.
    The layout is the same in every variant."""
    n, k = weight.shape
    panels = -(-n // PANEL_COLS)
    padded = torch.zeros(panels * PANEL_COLS, k, dtype=torch.float32)
    padded[:n] = weight
    by_panel = padded.view(panels, PANEL_COLS, k).transpose(1, 2)  # [P, K, 6]
    return torch.cat([by_panel[:, k0:k0 + PANEL_CHUNK].reshape(-1) for k0 in range(0, k, PANEL_CHUNK)])


def unpack_panels(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of pack_panels: W [N, K] float32."""
    panels = -(-n // PANEL_COLS)
    chunks, offset = [], 0
    for k0 in range(0, k, PANEL_CHUNK):
        kn = min(PANEL_CHUNK, k - k0)
        chunks.append(packed[offset:offset + panels * kn * PANEL_COLS].view(panels, kn, PANEL_COLS))
        offset += panels * kn * PANEL_COLS
    return torch.cat(chunks, dim=1).transpose(1, 2).reshape(panels * PANEL_COLS, k)[:n]


def kernel_report() -> dict:
    """What this process runs on and with: the CPU, its flags, the variant chosen and why, each kernel
    family's vector width, and the matmul paths with the crossover row counts measured so far."""
    from tokenforge.layers import matmul_plan  # the layers sit above this module

    features = cpu_features()
    return {
        "cpu_model": features.model_name,
        "cpu_flags": sorted(features.flags),
        "flags_source": features.source,
        "torch_cpu_capability": features.torch_capability,
        "variant": None if ACTIVE is None else ACTIVE.name,
        "variant_forced": os.environ.get(ISA_ENV) or None,
        "variants_built": [v.name for v in VARIANTS if library_path(v.name) is not None],
        "simd_lanes": {} if ACTIVE is None else {
            k: 16 if ACTIVE.build_info[k] == "1" else 8 for k in ("gemv", "panel", "attention", "fused")},
        "bf16_dot": "none" if ACTIVE is None else ACTIVE.bf16_dot,
        "matmul_plans": matmul_plan.report(),
    }
