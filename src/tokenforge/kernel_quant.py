"""The GGUF block-format kernels of one variant (csrc/quant*.cpp): the checked ctypes wrappers that
CpuKernels inherits, and the formats' sizes. kernels.quant_* is the public contract built on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenforge.kernel_checks import F32, I64, U8, ptr, shape_error


@dataclass(frozen=True)
class QType:
    """A ggml block format: its GGML type id, weights and bytes per block."""

    ggml_id: int
    block: int
    block_bytes: int

    def row_bytes(self, k: int) -> int:
        return k // self.block * self.block_bytes


# The GGUF block formats the kernels read (csrc/quant.h), by the names GGUF files and QuantizedTensor use.
QTYPES = {"q8_0": QType(8, 32, 34), "q4_0": QType(2, 32, 18), "q4_1": QType(3, 32, 20),
          "q4_k": QType(12, 256, 144), "q6_k": QType(14, 256, 210)}


def _qtype(fn: str, qtype: str, k: int) -> QType:
    if qtype not in QTYPES:
        raise ValueError(f"{fn}: qtype must be one of {sorted(QTYPES)}, got {qtype!r}")
    q = QTYPES[qtype]
    if k <= 0 or k % q.block:
        raise ValueError(f"{fn}: a {qtype} row holds whole blocks of {q.block} weights; K={k} is not a multiple")
    return q


class QuantKernels:
    """Mixed into CpuKernels: `self.lib` is the loaded variant."""

    def quant_matmul(self, x: torch.Tensor, data: torch.Tensor, qtype: str, n: int, k: int,
                     f32_activations: bool = False) -> torch.Tensor:
        """x [M, k] float32 @ W^T, W [n, k] stored as `qtype` blocks in data (uint8 [n, row bytes]) -> [M, n].
        Activations go to int8 per 32-block; f32_activations (one row, not q6_k) is the float alternative."""
        fn = "quant_matmul"
        x = x.contiguous()
        xp, dp = ptr(fn, "x", x, F32), ptr(fn, "data", data, U8)
        q = _qtype(fn, qtype, k)
        if x.dim() != 2 or x.shape[1] != k or x.shape[0] < 1:
            raise shape_error(fn, "x", f"[rows >= 1, {k}]", x)
        if data.shape != (n, q.row_bytes(k)):
            raise shape_error(fn, "data", f"uint8 [{n}, {q.row_bytes(k)}] ({n} rows of {k} {qtype} weights)", data)
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        rc = self.lib.tf_quant_matmul(q.ggml_id, int(f32_activations), xp, dp, y.data_ptr(), x.shape[0], n, k)
        if rc == -2:
            raise MemoryError(f"{fn} could not allocate its activation buffers")
        if rc != 0:
            raise ValueError(f"{fn}: float32 activations take one row of a format other than q6_k")
        return y

    def quant_dequantize_rows(self, data: torch.Tensor, qtype: str, k: int,
                              ids: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [T, k] of rows `ids` (int64 [T], every one in range; None: all rows) of data."""
        fn = "quant_dequantize_rows"
        dp = ptr(fn, "data", data, U8)
        q = _qtype(fn, qtype, k)
        if data.dim() != 2 or data.shape[1] != q.row_bytes(k):
            raise shape_error(fn, "data", f"uint8 [rows, {q.row_bytes(k)}] ({k} {qtype} weights per row)", data)
        ip = None
        if ids is not None:
            ip = ptr(fn, "ids", ids, I64)
            if ids.dim() != 1:
                raise shape_error(fn, "ids", "[T]", ids)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= data.shape[0]):
                raise IndexError(f"{fn}: ids must lie in [0, {data.shape[0]}), got {int(ids.min())}.."
                                 f"{int(ids.max())}")
        t = data.shape[0] if ids is None else ids.shape[0]
        out = torch.empty(t, k, dtype=torch.float32)
        self.lib.tf_quant_dequant_rows(q.ggml_id, dp, ip, t, out.data_ptr(), k)
        return out

    def quant_quantize(self, weight: torch.Tensor, qtype: str) -> torch.Tensor:
        """weight [N, K] float32 -> uint8 [N, row bytes] of q8_0 or q4_0 blocks, as gguf.quants makes them."""
        fn = "quant_quantize"
        wp = ptr(fn, "weight", weight, F32)
        if qtype not in ("q8_0", "q4_0"):
            raise ValueError(f"{fn} makes q8_0 or q4_0 blocks, not {qtype!r}")
        q = _qtype(fn, qtype, weight.shape[-1] if weight.dim() == 2 else 0)
        if weight.dim() != 2 or weight.shape[1] < 32:
            raise shape_error(fn, "weight", "[N, K] with K a multiple of 32", weight)
        out = torch.empty(weight.shape[0], q.row_bytes(weight.shape[1]), dtype=torch.uint8)
        self.lib.tf_quant_quantize(q.ggml_id, wp, out.data_ptr(), weight.shape[0], weight.shape[1])
        return out
