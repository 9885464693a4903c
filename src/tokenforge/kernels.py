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
from dataclasses import dataclass

import torch

from tokenforge import matmul_plan
from tokenforge.kernel_checks import ptr
from tokenforge.kernel_lib import (
    BY_NAME,
    PANEL_COLS,
    VARIANTS,
    CpuKernels,
    VariantUnavailable,
    library_path,
    load_variant,
)
from tokenforge.kernel_lib import (
    SKINNY_MAX_ROWS as SKINNY_MAX_ROWS,  # re-exported: the layers size their row chunks by it
)
from tokenforge.kernel_quant import QTYPES
from tokenforge.platform import CpuFeatures, cpu_features

logger = logging.getLogger(__name__)

ISA_ENV = "TOKENFORGE_CPU_ISA"
PANEL_CHUNK = 128  # K per chunk of the packed panel layout


def choose_variant(forced: str | None = None, features: CpuFeatures | None = None) -> CpuKernels | None:
    """The variant to use: `forced` (a name, or "none"), else the best automatic one the CPU runs and that
    was built. A forced variant the CPU cannot run, or that was not built, raises VariantUnavailable."""
    features = features or cpu_features()
    if forced:
        if forced == "none":
            return None
        if forced not in BY_NAME:
            why = (" (AMX has no variant of its own: large bf16 matmuls reach AMX tiles through oneDNN, and AMX "
                   "CPUs run avx512bf16)") if forced == "amx" else ""
            raise VariantUnavailable(f"{ISA_ENV}={forced!r} is not a kernel variant{why}; choose one of "
                                     f"{sorted(BY_NAME)} or 'none'")
        try:
            return load_variant(forced, features)
        except VariantUnavailable as e:
            raise VariantUnavailable(f"{ISA_ENV}={forced}: {e}") from None
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
apply_bitmask = _bind("apply_bitmask")
kv_copy_blocks = _bind("kv_copy_blocks")
kv_pool_pointers = CpuKernels.kv_pool_pointers


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


# --- GGUF block formats ----------------------------------------------------------------------------------
#
# The contract the quantized layers use. Activations: measured with scripts/bench_kernels.py --suite quant,
# the int8 kernel (x quantized per 32 values, one byte dot product per 4 weights: vpdpbusd with AVX-512
# VNNI) beats widening the codes to float32 and multiplying by x as is, at one row, for every format: the
# float path spends more instructions per weight than reading the block costs, so it stops keeping up
# with memory (README: "GGUF kernels"). int8 x costs accuracy: each x is rounded to 1/254 of its block's
# largest magnitude (tests allow for it).


@dataclass(frozen=True, eq=False)
class QuantPacked:
    """A quantized weight ready for quant_matmul: the file's blocks as they are (resident memory 1.0x the
    raw bytes) and the measured plan saying which path serves how many rows: "int8" (the kernel, which
    decodes each block once per group of rows) or "dequant" (float32 tiles of W through torch's GEMM)."""

    qtype: str
    n: int
    k: int
    data: torch.Tensor  # uint8 [n, row bytes]
    plan: matmul_plan.MatmulPlan
    cpu: CpuKernels | None


def quant_supported(qtype: str) -> bool:
    """Whether quant_matmul/quant_rows compute this format (by GGUF name: q8_0, q4_0, q4_1, q4_k, q6_k) with
    compiled kernels. The functions also work without them, slowly, through gguf's numpy reference."""
    return ACTIVE is not None and qtype in QTYPES


def _check_blocks(fn: str, data: torch.Tensor, qtype: str, n: int, k: int) -> None:
    if qtype not in QTYPES:
        raise ValueError(f"{fn}: qtype must be one of {sorted(QTYPES)}, got {qtype!r}")
    q = QTYPES[qtype]
    if k % q.block or data.dtype != torch.uint8 or tuple(data.shape) != (n, q.row_bytes(k)):
        raise ValueError(f"{fn}: {n} rows of {k} {qtype} weights are uint8 [{n}, {q.row_bytes(k)}] (K a multiple "
                         f"of {q.block}), got {data.dtype} {tuple(data.shape)}")


def _dequantize(data: torch.Tensor, qtype: str, k: int, cpu: CpuKernels | None,
                ids: torch.Tensor | None = None) -> torch.Tensor:
    if cpu is not None:
        return cpu.quant_dequantize_rows(data, qtype, k, ids)
    import gguf  # the reference without compiled kernels

    rows = data if ids is None else data[ids]
    kind = getattr(gguf.GGMLQuantizationType, qtype.upper())
    return torch.from_numpy(gguf.quants.dequantize(rows.numpy(), kind).reshape(-1, k).copy())


_DEQUANT_TILE = 1 << 20  # float32 weights dequantized at a time on the "dequant" path (4 MiB)


def _dequant_matmul(x: torch.Tensor, data: torch.Tensor, qtype: str, k: int, cpu: CpuKernels | None) -> torch.Tensor:
    n = data.shape[0]
    step = max(1, _DEQUANT_TILE // k)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    for r0 in range(0, n, step):
        y[:, r0:r0 + step] = x @ _dequantize(data[r0:r0 + step], qtype, k, cpu).T
    return y


def quant_pack(data: torch.Tensor, qtype: str, n: int, k: int, cpu: CpuKernels | None = None,
               float_activations: bool = False) -> QuantPacked:
    """Prepare W [n, k] stored as raw GGUF blocks (uint8 [n, row bytes], rows one after the other) for
    quant_matmul; call once at load. No copy is made. The first weight of each (format, shape) times the
    int8 kernel against dequantize + GEMM over a ladder of row counts (see matmul_plan). `cpu`: a kernel
    variant (default: the process's). `float_activations`: keep x in float32 at every row count (the
    dequantize + GEMM path: exact against a dequantize-then-matmul reference, slower for few rows)."""
    ptr("quant_pack", "data", data, (torch.uint8,))  # a CPU tensor of raw bytes, used in place (no copy)
    _check_blocks("quant_pack", data, qtype, n, k)
    cpu = ACTIVE if cpu is None else cpu
    if cpu is None or float_activations:
        return QuantPacked(qtype, n, k, data, matmul_plan.MatmulPlan.single("dequant"), cpu)
    key = matmul_plan.plan_key(f"gguf-{qtype}", n, k, cpu.name)
    plan = matmul_plan.cached(key)
    if plan is None:
        part = data[:matmul_plan.calibration_rows(n, k)]
        candidates = {
            "int8": matmul_plan.Candidate(lambda x: cpu.quant_matmul(x, part, qtype, part.shape[0], k),
                                          weights=(part,)),
            "dequant": matmul_plan.Candidate(lambda x: _dequant_matmul(x, part, qtype, k, cpu), large=True,
                                             weights=(part,)),
        }
        plan = matmul_plan.calibrate(key, candidates, k, cpu.evict)
    return QuantPacked(qtype, n, k, data, plan, cpu)


def quant_matmul(x: torch.Tensor, packed: QuantPacked) -> torch.Tensor:
    """x [M, K] float32 (a view is copied) @ W^T -> [M, N] float32, by the path packed.plan measured fastest
    for M rows."""
    x = x.contiguous()
    ptr("quant_matmul", "x", x, (torch.float32,))
    if packed.cpu is not None and packed.plan.path_for(x.shape[0]) == "int8":
        return packed.cpu.quant_matmul(x, packed.data, packed.qtype, packed.n, packed.k)
    if x.dim() != 2 or x.shape[1] != packed.k:
        raise ValueError(f"quant_matmul: x must be [M, {packed.k}], got {tuple(x.shape)}")
    return _dequant_matmul(x, packed.data, packed.qtype, packed.k, packed.cpu)


def quant_rows(ids: torch.Tensor, packed_or_data: QuantPacked | torch.Tensor, qtype: str | None = None,
               k: int | None = None) -> torch.Tensor:
    """The float32 rows ids (int64 [T]) of a quantized table -> [T, K], dequantizing only those rows (an
    embedding lookup). Takes a QuantPacked, or the raw blocks (uint8 [N, row bytes]) with qtype and k."""
    ptr("quant_rows", "ids", ids, (torch.int64,))
    if isinstance(packed_or_data, QuantPacked):
        p = packed_or_data
        return _dequantize(p.data, p.qtype, p.k, p.cpu, ids)
    if qtype is None or k is None:
        raise ValueError("quant_rows: raw blocks need their qtype and k")
    data = packed_or_data
    if qtype not in QTYPES or data.dim() != 2:
        raise ValueError(f"quant_rows: blocks must be uint8 [N, row bytes] of one of {sorted(QTYPES)}")
    _check_blocks("quant_rows", data, qtype, data.shape[0], k)
    return _dequantize(data, qtype, k, ACTIVE, ids)


def quant_quantize(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """A dense float32 weight [N, K] (contiguous, K a multiple of 32) -> uint8 [N, row bytes] of q8_0 or q4_0
    blocks, byte for byte what gguf.quants.quantize makes (the compiled kernel; gguf's numpy without it,
    ~40x slower)."""
    if ACTIVE is not None:
        return ACTIVE.quant_quantize(weight, qtype)
    import gguf

    ptr("quant_quantize", "weight", weight, (torch.float32,))
    if qtype not in ("q8_0", "q4_0"):
        raise ValueError(f"quant_quantize makes q8_0 or q4_0 blocks, not {qtype!r}")
    kind = getattr(gguf.GGMLQuantizationType, qtype.upper())
    return torch.from_numpy(gguf.quants.quantize(weight.numpy(), kind))


def kernel_report() -> dict:
    """What this process runs on and with: the CPU, its flags, the variant chosen and why, each kernel
    family's vector width, and the matmul paths with the crossover row counts measured so far."""
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
