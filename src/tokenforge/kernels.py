"""The compiled CPU kernels (csrc/*.cpp, built at install time) behind one ctypes seam.

The library links torch's own OpenMP runtime (loaded first, by soname), so the kernels follow
torch.set_num_threads. Without the library every caller has a plain-torch path giving the same numbers.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_PTR = ctypes.c_void_p
_INT = ctypes.c_int


def _load() -> ctypes.CDLL | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_cpu_kernels{suffix}"
        if path.exists():
            lib = ctypes.CDLL(str(path))
            lib.tf_paged_attention.restype = _INT
            lib.tf_paged_attention.argtypes = [_INT, _INT] + [_PTR] * 5 + [_INT, _PTR, _PTR, _PTR] + [_INT] * 4 + [
                ctypes.c_float, _INT]
            lib.tf_supported_head_dim.restype = _INT
            lib.tf_supported_head_dim.argtypes = [_INT]
            lib.tf_skinny_matmul.restype = _INT
            lib.tf_skinny_matmul.argtypes = [_INT, _PTR, _PTR, _PTR, _INT, _INT, _INT]
            lib.tf_skinny_matmul_int8.restype = _INT
            lib.tf_skinny_matmul_int8.argtypes = [_PTR] * 4 + [_INT] * 3
            lib.tf_panel_matmul.restype = _INT
            lib.tf_panel_matmul.argtypes = [_PTR] * 3 + [_INT] * 3
            lib.tf_rms_norm.restype = None
            lib.tf_rms_norm.argtypes = [_PTR] * 3 + [_INT] * 2 + [ctypes.c_float]
            lib.tf_add_rms_norm.restype = None
            lib.tf_add_rms_norm.argtypes = [_PTR] * 4 + [_INT] * 2 + [ctypes.c_float]
            lib.tf_silu_mul.restype = None
            lib.tf_silu_mul.argtypes = [_PTR] * 2 + [_INT] * 2
            lib.tf_rotary_store_kv.restype = _INT
            lib.tf_rotary_store_kv.argtypes = [_PTR] + [_INT] * 5 + [_PTR] * 6 + [_INT]
            return lib
    logger.warning("compiled CPU kernels not found in %s; using slower torch paths (run: make install)", here)
    return None


LIB = _load()

SKINNY_MAX_ROWS = 8  # what the skinny kernel accepts


def skinny_matmul_supported(weight: torch.Tensor) -> bool:
    return LIB is not None and weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous()


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M <= 8, K] float32 @ weight [N, K]^T (float32 or bfloat16) -> [M, N] float32."""
    x = x.contiguous()
    y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    rc = LIB.tf_skinny_matmul(int(weight.dtype == torch.bfloat16), x.data_ptr(), weight.data_ptr(), y.data_ptr(),
                              x.shape[0], weight.shape[0], weight.shape[1])
    if rc != 0:
        raise ValueError(f"skinny_matmul takes 1..{SKINNY_MAX_ROWS} rows, got {x.shape[0]}")
    return y


def skinny_matmul_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(x [M <= 8, K] float32 @ weight [N, K]^T int8) * scale [N] float32 -> [M, N] float32."""
    x = x.contiguous()
    y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    rc = LIB.tf_skinny_matmul_int8(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), y.data_ptr(), x.shape[0],
                                   weight.shape[0], weight.shape[1])
    if rc != 0:
        raise ValueError(f"skinny_matmul_int8 takes 1..{SKINNY_MAX_ROWS} rows, got {x.shape[0]}")
    return y


PANEL_COLS = 6  # output columns per packed panel (csrc/panel_gemm.cpp)
PANEL_CHUNK = 128  # K per chunk of the packed layout


def panel_supported(weight: torch.Tensor) -> bool:
    return LIB is not None and weight.dim() == 2 and weight.shape[0] > 0 and weight.shape[1] > 0


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> the flat float32 layout panel_matmul streams: [K / 128][N / 6][<=128][6], N zero padded."""
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


def panel_matmul(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] float32 @ W^T with W [n, K] packed by pack_panels -> [M, n] float32."""
    x = x.contiguous()
    m, k = x.shape
    if m < 1 or x.dtype != torch.float32 or packed.numel() != -(-n // PANEL_COLS) * PANEL_COLS * k:
        raise ValueError(f"panel_matmul cannot take x {tuple(x.shape)} with {packed.numel()} packed weights "
                         f"for {n} outputs")
    y = torch.empty(m, n, dtype=torch.float32)
    rc = LIB.tf_panel_matmul(x.data_ptr(), packed.data_ptr(), y.data_ptr(), m, n, k)
    if rc == -2:
        raise MemoryError("panel_matmul could not allocate its scratch buffers")
    if rc != 0:
        raise ValueError(f"panel_matmul cannot take x {tuple(x.shape)} for {n} outputs")
    return y


def paged_attention_supported(head_dim: int, cache_dtype: torch.dtype) -> bool:
    return (LIB is not None and bool(LIB.tf_supported_head_dim(head_dim))
            and cache_dtype in (torch.float32, torch.bfloat16))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start: torch.Tensor, scale: float,
                    sliding_window: int | None, row_masks: torch.Tensor | None = None) -> torch.Tensor:
    """See csrc/paged_attention.cpp for the layout contract (row_masks: int64 per query token, or None)."""
    q = q.contiguous()
    out = torch.empty_like(q)
    rc = LIB.tf_paged_attention(
        int(k_cache.dtype == torch.bfloat16), q.shape[-1], q.data_ptr(), out.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(),
        query_start.data_ptr(), None if row_masks is None else row_masks.data_ptr(), len(seq_lens), q.shape[1],
        k_cache.shape[2], k_cache.shape[1], scale, sliding_window or 0)
    if rc != 0:
        raise RuntimeError(f"paged attention kernel failed with code {rc}")
    return out


# The fused elementwise kernels (csrc/fused.cpp) take float32, contiguous, row-major tensors.


def fused_supported(x: torch.Tensor) -> bool:
    return LIB is not None and x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> rmsnorm(x) * weight, a new tensor."""
    out = torch.empty_like(x)
    LIB.tf_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta (in place, the residual stream), then return rmsnorm(x) * weight."""
    delta = delta.contiguous()
    out = torch.empty_like(x)
    LIB.tf_add_rms_norm(x.data_ptr(), delta.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1],
                        eps)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2M] -> silu(gate) * up [T, M]."""
    m = gate_up.shape[1] // 2
    out = torch.empty(gate_up.shape[0], m, dtype=torch.float32)
    LIB.tf_silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.shape[0], m)
    return out


def rotary_store_kv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, cos: torch.Tensor,
                    sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slots: torch.Tensor) -> None:
    """Rotate the q and k heads of qkv [T, (H + 2 KV) * D] in place (cos/sin tables [positions, D / 2]), then
    store k and v at their cache slots."""
    rc = LIB.tf_rotary_store_kv(qkv.data_ptr(), qkv.shape[0], qkv.shape[1], num_heads, num_kv_heads, head_dim,
                                cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), k_cache.data_ptr(),
                                v_cache.data_ptr(), slots.data_ptr(), int(k_cache.dtype == torch.bfloat16))
    if rc != 0:
        raise ValueError(f"rotary_store_kv needs an even head_dim, got {head_dim}")
