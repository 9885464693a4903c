"""One compiled kernel library (an ISA variant built by setup.py) behind a checked ctypes seam.

`load_variant(name)` loads one variant if this CPU can run it and returns a `CpuKernels`; several variants
can live in one process (the tests compare each with the torch reference). Every method checks each tensor
before its data pointer goes to C (kernel_checks.py): a wrong tensor is a TypeError or ValueError naming the
argument, never a crash. Index values (block ids, slots, positions) are not scanned: that would cost a pass
over them per call, and their producers (the runner, the model) own their ranges.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenforge.kernel_checks import BF16, F32, F32_BF16, I8, I32, I64, check_matmul, check_rows, ptr, shape_error
from tokenforge.kernel_decode import PANEL_COLS, DecodeKernels
from tokenforge.kernel_quant import QuantKernels
from tokenforge.platform import CpuFeatures, cpu_features

_PTR = ctypes.c_void_p
_INT = ctypes.c_int
_FLOAT = ctypes.c_float

SKINNY_MAX_ROWS = 8  # what the skinny kernel accepts


@dataclass(frozen=True)
class Variant:
    """An ISA build of the kernels: `_cpu_kernels_{name}`, runnable where the CPU has all of `flags`."""

    name: str
    flags: tuple[str, ...]
    automatic: bool = True  # False: loaded only on request (the emulated test build)


_AVX2 = ("avx2", "fma", "f16c")
_AVX512 = _AVX2 + ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
# Best first; keep in step with VARIANTS in setup.py.
VARIANTS = (
    Variant("avx512bf16", _AVX512 + ("avx512_bf16",)),
    Variant("avx512", _AVX512),
    Variant("avx2", _AVX2),
    Variant("avx512bf16emu", _AVX512, automatic=False),  # vdpbf16ps emulated with AVX-512F
)
BY_NAME = {v.name: v for v in VARIANTS}


class VariantUnavailable(RuntimeError):
    """A variant this process cannot use: the CPU lacks a flag, or the library was not built."""


def library_path(name: str) -> Path | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_cpu_kernels_{name}{suffix}"
        if path.exists():
            return path
    return None


def load_variant(name: str, features: CpuFeatures | None = None) -> CpuKernels:
    """Load variant `name`; VariantUnavailable says which CPU flags are missing or that it was not built."""
    if name not in BY_NAME:
        raise ValueError(f"unknown kernel variant {name!r}; choose one of {sorted(BY_NAME)}")
    variant = BY_NAME[name]
    features = features or cpu_features()
    missing = features.missing(variant.flags)
    if missing:
        raise VariantUnavailable(f"kernel variant {name!r} needs CPU flags {', '.join(missing)}, which this CPU "
                                 f"({features.model_name}) lacks")
    path = library_path(name)
    if path is None:
        raise VariantUnavailable(f"kernel variant {name!r} was not built in {Path(__file__).parent} "
                                 "(run: make install; a C++ compiler is needed)")
    return CpuKernels(ctypes.CDLL(str(path)), name)


class CpuKernels(QuantKernels, DecodeKernels):
    """The kernels of one loaded variant. Methods take and return torch tensors; see csrc/ for each
    kernel's contract and kernels.py for the process-wide default variant."""

    def __init__(self, lib: ctypes.CDLL, name: str):
        self.lib = lib
        self.name = name
        _declare(lib)
        self.build_info = dict(item.split("=") for item in lib.tf_build_info().decode().split())
        self.bf16_dot = {0: "none", 1: "native", 2: "emulated"}[lib.tf_bf16_dot_kind()]

    def __repr__(self) -> str:
        return f"CpuKernels({self.name!r})"

    # --- matmuls -------------------------------------------------------------------------------------

    def skinny_matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [M <= 8, K] float32 @ weight [N, K]^T (float32 or bfloat16) -> [M, N] float32."""
        x = x.contiguous()
        xp, wp = ptr("skinny_matmul", "x", x, F32), ptr("skinny_matmul", "weight", weight, F32_BF16)
        check_matmul("skinny_matmul", x, weight)
        y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
        if self.lib.tf_skinny_matmul(weight.dtype == torch.bfloat16, xp, wp, y.data_ptr(), x.shape[0],
                                     weight.shape[0], weight.shape[1]) != 0:
            raise ValueError(f"skinny_matmul takes 1..{SKINNY_MAX_ROWS} rows, got {x.shape[0]}")
        return y

    def skinny_matmul_int8(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(x [M <= 8, K] float32 @ weight [N, K]^T int8) * scale [N] float32 -> [M, N] float32."""
        fn = "skinny_matmul_int8"
        x = x.contiguous()
        xp, wp, sp = ptr(fn, "x", x, F32), ptr(fn, "weight", weight, I8), ptr(fn, "scale", scale, F32)
        check_matmul(fn, x, weight)
        if scale.shape != (weight.shape[0],):
            raise shape_error(fn, "scale", f"[{weight.shape[0]}] (one per weight row)", scale)
        y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
        if self.lib.tf_skinny_matmul_int8(xp, wp, sp, y.data_ptr(), x.shape[0], weight.shape[0],
                                          weight.shape[1]) != 0:
            raise ValueError(f"{fn} takes 1..{SKINNY_MAX_ROWS} rows, got {x.shape[0]}")
        return y

    def panel_matmul(self, x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
        """x [M, K] float32 @ W^T with W [n, K] packed by kernels.pack_panels -> [M, n] float32."""
        x = x.contiguous()
        xp, pp = ptr("panel_matmul", "x", x, F32), ptr("panel_matmul", "packed", packed, F32)
        if x.dim() != 2 or x.shape[0] < 1 or n < 1 or packed.numel() != -(-n // PANEL_COLS) * PANEL_COLS * x.shape[1]:
            raise ValueError(f"panel_matmul cannot take x {tuple(x.shape)} with {packed.numel()} packed weights "
                             f"for {n} outputs")
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        rc = self.lib.tf_panel_matmul(xp, pp, y.data_ptr(), x.shape[0], n, x.shape[1])
        if rc == -2:
            raise MemoryError("panel_matmul could not allocate its scratch buffers")
        if rc != 0:
            raise ValueError(f"panel_matmul cannot take x {tuple(x.shape)} for {n} outputs")
        return y

    def bf16_matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 (rounded to bf16) @ weight [N, K]^T bfloat16 -> [M, N] float32, with the AVX-512
        BF16 dot product (float32 sums). Only where `bf16_dot` is not "none"."""
        x = x.contiguous()
        xp, wp = ptr("bf16_matmul", "x", x, F32), ptr("bf16_matmul", "weight", weight, BF16)
        check_matmul("bf16_matmul", x, weight)
        y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
        rc = self.lib.tf_bf16_matmul(xp, wp, y.data_ptr(), x.shape[0], weight.shape[0], weight.shape[1])
        if rc == -1:
            raise RuntimeError(f"kernel variant {self.name!r} has no bf16 dot product (needs avx512_bf16, or the "
                               "emulated variant)")
        if rc != 0:
            raise MemoryError("bf16_matmul could not allocate its scratch buffer")
        return y

    def evict(self, *tensors: torch.Tensor) -> None:
        """Flush the tensors' memory from every cache level (calibration: time a weight read from memory).
        Only where the CPU has clflushopt; elsewhere it does nothing."""
        if "clflushopt" not in cpu_features().flags:
            return
        for t in tensors:
            if t.is_mkldnn:  # oneDNN's packed weights: an opaque tensor that still knows its buffer
                self.lib.tf_evict(torch.ops.mkldnn.data_ptr(t), torch.ops.mkldnn._nbytes(t))
            else:
                self.lib.tf_evict(ptr("evict", "tensor", t, (t.dtype,)), t.numel() * t.element_size())

    # --- attention -----------------------------------------------------------------------------------

    def paged_attention_supported(self, head_dim: int, cache_dtype: torch.dtype) -> bool:
        return bool(self.lib.tf_supported_head_dim(head_dim)) and cache_dtype in F32_BF16

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor, scale: float,
                        sliding_window: int | None, row_masks: torch.Tensor | None = None) -> torch.Tensor:
        """See csrc/paged_attention.cpp for the layout contract (row_masks: int64 per query token, or None).
        q may be a view (it is copied); the caches and index tensors must be contiguous."""
        fn = "paged_attention"
        q = q.contiguous()
        qp = ptr(fn, "q", q, F32)
        kp, vp = ptr(fn, "k_cache", k_cache, F32_BF16), ptr(fn, "v_cache", v_cache, (k_cache.dtype,))
        bp, sp = ptr(fn, "block_tables", block_tables, I32), ptr(fn, "seq_lens", seq_lens, I32)
        qsp = ptr(fn, "query_start", query_start, I32)
        mp = None if row_masks is None else ptr(fn, "row_masks", row_masks, I64)
        if q.dim() != 3:
            raise shape_error(fn, "q", "[tokens, heads, head_dim]", q)
        if k_cache.dim() != 4 or k_cache.shape[3] != q.shape[2] or v_cache.shape != k_cache.shape:
            raise shape_error(fn, "k_cache/v_cache", f"[blocks, block_size, kv_heads, {q.shape[2]}] (both alike)",
                              k_cache if k_cache.dim() != 4 or k_cache.shape[3] != q.shape[2] else v_cache)
        num_reqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
        if block_tables.dim() != 2 or block_tables.shape[0] != num_reqs:
            raise shape_error(fn, "block_tables", "[requests, max_blocks] with one row per seq_lens entry",
                              block_tables)
        if query_start.shape != (num_reqs + 1,):
            raise shape_error(fn, "query_start", f"[{num_reqs + 1}] (requests + 1)", query_start)
        if row_masks is not None and row_masks.shape != (q.shape[0],):
            raise shape_error(fn, "row_masks", f"[{q.shape[0]}] (one per query token)", row_masks)
        out = torch.empty_like(q)
        rc = self.lib.tf_paged_attention(
            k_cache.dtype == torch.bfloat16, q.shape[2], qp, out.data_ptr(), kp, vp, bp, block_tables.shape[1], sp,
            qsp, mp, num_reqs, q.shape[1], k_cache.shape[2], k_cache.shape[1], scale, sliding_window or 0)
        if rc != 0:
            raise ValueError(f"{fn}: no compiled kernel for head_dim {q.shape[2]}")
        return out

    # --- fused elementwise kernels (float32, row-major) -----------------------------------------------

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [T, H] -> rmsnorm(x) * weight, a new tensor."""
        xp, wp = ptr("rms_norm", "x", x, F32), ptr("rms_norm", "weight", weight, F32)
        check_rows("rms_norm", x, weight)
        out = torch.empty_like(x)
        self.lib.tf_rms_norm(xp, wp, out.data_ptr(), x.shape[0], x.shape[1], eps)
        return out

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x += delta (in place, the residual stream), then return rmsnorm(x) * weight. delta may be a view."""
        fn = "add_rms_norm"
        delta = delta.contiguous()
        xp, dp, wp = ptr(fn, "x", x, F32), ptr(fn, "delta", delta, F32), ptr(fn, "weight", weight, F32)
        check_rows(fn, x, weight)
        if delta.numel() != x.numel():
            raise shape_error(fn, "delta", f"x's shape {tuple(x.shape)}", delta)
        out = torch.empty_like(x)
        self.lib.tf_add_rms_norm(xp, dp, wp, out.data_ptr(), x.shape[0], x.shape[1], eps)
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2M] -> silu(gate) * up [T, M]."""
        gp = ptr("silu_mul", "gate_up", gate_up, F32)
        if gate_up.dim() != 2 or gate_up.shape[1] % 2:
            raise shape_error("silu_mul", "gate_up", "[tokens, 2 * M]", gate_up)
        m = gate_up.shape[1] // 2
        out = torch.empty(gate_up.shape[0], m, dtype=torch.float32)
        self.lib.tf_silu_mul(gp, out.data_ptr(), gate_up.shape[0], m)
        return out

    def apply_bitmask(self, logits: torch.Tensor, words: torch.Tensor) -> None:
        """logits [V] float32 (in place) = -inf where the token's bit in words (int32 [>= ceil(V / 32)]) is clear."""
        fn = "apply_bitmask"
        lp, wp = ptr(fn, "logits", logits, F32), ptr(fn, "words", words, I32)
        if logits.dim() != 1 or words.dim() != 1 or words.shape[0] * 32 < logits.shape[0]:
            raise shape_error(fn, "words", f"int32 [>= {(logits.shape[0] + 31) // 32}] for logits [{logits.shape[0]}]",
                              words)
        self.lib.tf_apply_bitmask(lp, wp, logits.shape[0])

    def kv_copy_blocks(self, pools: list[torch.Tensor], pool_ptrs: ctypes.Array, block_ids: torch.Tensor,
                       rows: torch.Tensor, host: torch.Tensor, to_host: bool) -> None:
        """Block block_ids[i] of every pool (each [blocks, ...], contiguous, one dtype) <-> row rows[i] of host
        ([rows, len(pools), *pool.shape[1:]]); `pool_ptrs` is `kv_pool_pointers(pools)`, made once."""
        fn = "kv_copy_blocks"
        dtype = pools[0].dtype
        hp, bp, rp = ptr(fn, "host", host, (dtype,)), ptr(fn, "block_ids", block_ids, I64), ptr(fn, "rows", rows, I64)
        block_numel = math.prod(pools[0].shape[1:])
        if host.dim() < 2 or host.shape[1] != len(pools) or math.prod(host.shape[2:]) != block_numel:
            raise shape_error(fn, "host", f"[rows, {len(pools)}, {tuple(pools[0].shape[1:])}]", host)
        if block_ids.dim() != 1 or rows.shape != block_ids.shape:
            raise shape_error(fn, "rows", f"[{block_ids.numel()}] like block_ids", rows)
        self.lib.tf_kv_copy_blocks(pool_ptrs, len(pools), block_numel * pools[0].element_size(), bp, rp,
                                   block_ids.shape[0], hp, int(to_host))

    @staticmethod
    def kv_pool_pointers(pools: list[torch.Tensor]) -> ctypes.Array:
        """The pools' data pointers for `kv_copy_blocks`, checked once (same dtype and block shape)."""
        first = pools[0]
        for i, pool in enumerate(pools):
            ptr("kv_copy_blocks", f"pools[{i}]", pool, (first.dtype,))
            if pool.shape[1:] != first.shape[1:]:
                raise shape_error("kv_copy_blocks", f"pools[{i}]", f"[blocks, {tuple(first.shape[1:])}]", pool)
        return (ctypes.c_int64 * len(pools))(*(pool.data_ptr() for pool in pools))

    def rotary_store_kv(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                        cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slots: torch.Tensor) -> None:
        """Rotate the q and k heads of qkv [T, (H + 2 KV) * D] in place (cos/sin tables [positions, D / 2]),
        then store k and v at their cache slots (caches [..., KV, D], float32 or bf16)."""
        fn = "rotary_store_kv"
        qp, cp, sp = ptr(fn, "qkv", qkv, F32), ptr(fn, "cos", cos, F32), ptr(fn, "sin", sin, F32)
        pp, slp = ptr(fn, "positions", positions, I64), ptr(fn, "slots", slots, I64)
        kp, vp = ptr(fn, "k_cache", k_cache, F32_BF16), ptr(fn, "v_cache", v_cache, (k_cache.dtype,))
        if head_dim % 2:
            raise ValueError(f"{fn} needs an even head_dim, got {head_dim}")
        if qkv.dim() != 2 or qkv.shape[1] < (num_heads + 2 * num_kv_heads) * head_dim:
            raise shape_error(fn, "qkv", f"[tokens, >= {(num_heads + 2 * num_kv_heads) * head_dim}]", qkv)
        if cos.dim() != 2 or cos.shape[1] != head_dim // 2 or sin.shape != cos.shape:
            raise shape_error(fn, "cos/sin", f"[positions, {head_dim // 2}] (both alike)", cos)
        t = qkv.shape[0]
        if positions.shape != (t,) or slots.shape != (t,):
            raise shape_error(fn, "positions/slots", f"[{t}] (one per token)",
                              positions if positions.shape != (t,) else slots)
        if k_cache.shape[-2:] != (num_kv_heads, head_dim) or v_cache.shape != k_cache.shape:
            raise shape_error(fn, "k_cache/v_cache", f"[..., {num_kv_heads}, {head_dim}] (both alike)", k_cache)
        self.lib.tf_rotary_store_kv(qp, t, qkv.shape[1], num_heads, num_kv_heads, head_dim, cp, sp, pp, kp, vp, slp,
                                    k_cache.dtype == torch.bfloat16)


def _declare(lib: ctypes.CDLL) -> None:
    """The C signatures (ctypes converts and checks the scalar arguments against them)."""
    sigs = {
        "tf_paged_attention": (_INT, [_INT, _INT] + [_PTR] * 5 + [_INT, _PTR, _PTR, _PTR] + [_INT] * 4
                               + [_FLOAT, _INT]),
        "tf_supported_head_dim": (_INT, [_INT]),
        "tf_skinny_matmul": (_INT, [_INT, _PTR, _PTR, _PTR, _INT, _INT, _INT]),
        "tf_skinny_matmul_int8": (_INT, [_PTR] * 4 + [_INT] * 3),
        "tf_panel_matmul": (_INT, [_PTR] * 3 + [_INT] * 3),
        "tf_bf16_matmul": (_INT, [_PTR] * 3 + [_INT] * 3),
        "tf_bf16_dot_kind": (_INT, []),
        "tf_build_info": (ctypes.c_char_p, []),
        "tf_evict": (None, [_PTR, ctypes.c_int64]),
        "tf_quant_matmul": (_INT, [_INT, _INT] + [_PTR] * 3 + [_INT] * 3),
        "tf_quant_dequant_rows": (_INT, [_INT, _PTR, _PTR, _INT, _PTR, _INT]),
        "tf_quant_quantize": (_INT, [_INT, _PTR, _PTR, _INT, _INT]),
        "tf_rms_norm": (None, [_PTR] * 3 + [_INT] * 2 + [_FLOAT]),
        "tf_add_rms_norm": (None, [_PTR] * 4 + [_INT] * 2 + [_FLOAT]),
        "tf_silu_mul": (None, [_PTR] * 2 + [_INT] * 2),
        "tf_rotary_store_kv": (_INT, [_PTR] + [_INT] * 5 + [_PTR] * 6 + [_INT]),
        "tf_decode_layers": (_INT, [_PTR, _INT, _PTR, _PTR]),
        "tf_apply_bitmask": (None, [_PTR, _PTR, _INT]),
        "tf_kv_copy_blocks": (None, [_PTR, _INT, ctypes.c_int64, _PTR, _PTR, _INT, _PTR, _INT]),
    }
    for name, (restype, argtypes) in sigs.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise VariantUnavailable(f"{lib._name} is out of date: it has no {name} (run: make install)") from None
        fn.restype, fn.argtypes = restype, argtypes
