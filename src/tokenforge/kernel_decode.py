"""The decode-layer loop of one variant (csrc/decode_layers.cpp): its C structs and the checked wrapper
CpuKernels inherits. models/fused_decode.py decides when a model's step can take it."""

from __future__ import annotations

import ctypes

import torch

from tokenforge.kernel_checks import BF16, F32, F32_BF16, I32, I64, U8, ptr

_P = ctypes.c_void_p
_I = ctypes.c_int32
_F = ctypes.c_float


class DecodePart(ctypes.Structure):
    _fields_ = [("qtype", _I), ("n", _I), ("data", _P), ("bias", _P)]


MAX_PARTS = 3
PANEL_COLS = 6  # output columns per packed panel (csrc/panel_gemm.cpp)

# A part's `qtype` for dense weights (csrc/decode_layers.cpp), by the layer path whose kernel it runs; GGUF
# block weights use their GGML type id (>= 0).
DENSE_CODES = {"panel": -1, "skinny_f32": -2, "skinny_bf16": -3, "bf16_dot": -4}
_DENSE_DTYPES = {DENSE_CODES[name]: dtypes for name, dtypes in (("panel", F32), ("skinny_f32", F32),
                                                                 ("skinny_bf16", BF16), ("bf16_dot", BF16))}


class DecodeLinear(ctypes.Structure):
    """A linear layer of K inputs whose N outputs come side by side from up to 3 parts, each n rows of GGUF
    blocks of one format with an optional float32 bias [n]."""

    _fields_ = [("nparts", _I), ("n", _I), ("k", _I), ("pad", _I), ("parts", DecodePart * MAX_PARTS)]


class DecodeLayer(ctypes.Structure):
    _fields_ = [("input_norm", _P), ("post_norm", _P), ("qkv", DecodeLinear), ("o", DecodeLinear),
                ("gate_up", DecodeLinear), ("down", DecodeLinear), ("k_cache", _P), ("v_cache", _P)]


class DecodeStep(ctypes.Structure):
    _fields_ = [("T", _I), ("H", _I), ("nq", _I), ("nkv", _I), ("D", _I), ("M", _I), ("eps", _F), ("scale", _F),
                ("cache_is_bf16", _I), ("block_size", _I), ("window", _I), ("num_reqs", _I), ("max_blocks", _I),
                ("pad", _I), ("cos", _P), ("sin", _P), ("positions", _P), ("slots", _P), ("block_tables", _P),
                ("seq_lens", _P), ("query_start", _P), ("row_masks", _P)]


def _part_data(fn: str, name: str, data: torch.Tensor, code: int, n: int, k: int) -> int:
    """The checked pointer of a part's weights: n rows of GGUF blocks (uint8 [n, row bytes]), a dense [n, k]
    weight, or float32 panels (kernels.pack_panels)."""
    if code >= 0:
        if data.dim() != 2 or data.shape[0] != n:
            raise ValueError(f"{fn}: {name} must hold {n} rows of blocks, got {tuple(data.shape)}")
        return ptr(fn, name, data, U8)
    if code not in _DENSE_DTYPES:
        raise ValueError(f"{fn}: {name} has unknown weight code {code}")
    p = ptr(fn, name, data, _DENSE_DTYPES[code])
    if code == DENSE_CODES["panel"]:
        if data.numel() != -(-n // PANEL_COLS) * PANEL_COLS * k:
            raise ValueError(f"{fn}: {name} must hold the panels of a [{n}, {k}] weight, got {data.numel()} values")
    elif data.shape != (n, k):
        raise ValueError(f"{fn}: {name} must be [{n}, {k}], got {tuple(data.shape)}")
    return p


def decode_linear(fn: str, name: str, k: int,
                  parts: list[tuple[torch.Tensor, int, int, torch.Tensor | None]]) -> DecodeLinear:
    """The struct of one linear layer from its parts (weights, GGML type id or DENSE_CODES value, n, bias or
    None), their tensors checked (the caller keeps them alive)."""
    if not 1 <= len(parts) <= MAX_PARTS:
        raise ValueError(f"{fn}: {name} has {len(parts)} parts; the loop takes 1 to {MAX_PARTS}")
    structs = []
    for i, (data, code, n, bias) in enumerate(parts):
        bp = None
        if bias is not None:
            bp = ptr(fn, f"{name}.parts[{i}].bias", bias, F32)
            if bias.numel() != n:
                raise ValueError(f"{fn}: {name}.parts[{i}].bias must hold {n} values, got {bias.numel()}")
        structs.append(DecodePart(code, n, _part_data(fn, f"{name}.parts[{i}].data", data, code, n, k), bp))
    return DecodeLinear(len(structs), sum(p.n for p in structs), k, 0, (DecodePart * MAX_PARTS)(*structs))


def decode_layer(fn: str, input_norm: torch.Tensor, post_norm: torch.Tensor, linears: dict[str, DecodeLinear],
                 k_cache: torch.Tensor, v_cache: torch.Tensor) -> DecodeLayer:
    return DecodeLayer(ptr(fn, "input_norm", input_norm, F32), ptr(fn, "post_norm", post_norm, F32),
                       linears["qkv"], linears["o"], linears["gate_up"], linears["down"],
                       ptr(fn, "k_cache", k_cache, F32_BF16), ptr(fn, "v_cache", v_cache, (k_cache.dtype,)))


class DecodeKernels:
    """Mixed into CpuKernels: `self.lib` is the loaded variant."""

    def decode_layers(self, layers: ctypes.Array, x: torch.Tensor, shape: tuple[int, int, int, int, int],
                      eps: float, scale: float, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                      slots: torch.Tensor, cache_dtype: torch.dtype, block_size: int, window: int | None,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor,
                      row_masks: torch.Tensor | None) -> None:
        """Every layer of `layers` (DecodeLayer structs) over x [T, H] (the residual stream, in place).
        shape: (H, q heads, kv heads, head_dim, intermediate size). The layers' weights and caches were
        checked when their structs were built; the per-step tensors are checked here."""
        fn = "decode_layers"
        h, nq, nkv, d, m = shape
        xp = ptr(fn, "x", x, F32)
        t = x.shape[0]
        if x.dim() != 2 or x.shape[1] != h:
            raise ValueError(f"{fn}: x must be [T, {h}], got {tuple(x.shape)}")
        num_reqs = seq_lens.shape[0]
        if positions.shape != (t,) or slots.shape != (t,) or query_start.shape != (num_reqs + 1,):
            raise ValueError(f"{fn}: positions and slots need one entry per row and query_start one per request "
                             f"plus one, got {tuple(positions.shape)}, {tuple(slots.shape)}, "
                             f"{tuple(query_start.shape)} for {t} rows and {num_reqs} requests")
        if block_tables.dim() != 2 or block_tables.shape[0] != num_reqs:
            raise ValueError(f"{fn}: block_tables must be [{num_reqs}, max_blocks], got {tuple(block_tables.shape)}")
        if row_masks is not None and row_masks.shape != (t,):
            raise ValueError(f"{fn}: row_masks must be [{t}], got {tuple(row_masks.shape)}")
        step = DecodeStep(
            t, h, nq, nkv, d, m, eps, scale, cache_dtype == torch.bfloat16, block_size, window or 0, num_reqs,
            block_tables.shape[1], 0, ptr(fn, "cos", cos, F32), ptr(fn, "sin", sin, F32),
            ptr(fn, "positions", positions, I64), ptr(fn, "slots", slots, I64),
            ptr(fn, "block_tables", block_tables, I32), ptr(fn, "seq_lens", seq_lens, I32),
            ptr(fn, "query_start", query_start, I32),
            None if row_masks is None else ptr(fn, "row_masks", row_masks, I64))
        rc = self.lib.tf_decode_layers(ctypes.addressof(layers), len(layers), ctypes.addressof(step), xp)
        if rc == -2:
            raise MemoryError(f"{fn}: a kernel could not allocate its buffers")
        if rc != 0:
            raise ValueError(f"{fn}: a kernel refused the step (code {rc}): a shape or format it does not take")
