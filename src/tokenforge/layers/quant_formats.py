"""ggml's block-quantized weight formats that tokenforge computes with directly: their block layouts and
vectorized torch dequantizers (the plain reference the C++ kernels are checked against).

A quantized weight [rows, cols] is stored row after row; each row is cols / block_size blocks of
block_bytes bytes (uint8 [rows, row_bytes]). Scales are float16, little-endian, as in the file.

  q8_0   32 weights in 34 bytes:  d, 32 x int8                          w = d * q
  q4_0   32 weights in 18 bytes:  d, 16 bytes of 4-bit q (low nibbles   w = d * (q - 8)
                                  are weights 0-15, high ones 16-31)
  q4_1   32 weights in 20 bytes:  d, m, 16 bytes of 4-bit q             w = d * q + m
  q4_k  256 weights in 144 bytes: d, dmin, 12 bytes of 6-bit scales     w = d * sc[j] * q - dmin * mn[j]
                                  and mins of 8 sub-blocks j of 32,      (four 32-byte groups: low nibbles
                                  128 bytes of 4-bit q                   are sub-block 2g, high ones 2g+1)
  q6_k  256 weights in 210 bytes: 128 bytes of low 4 bits, 64 bytes      w = d * sc[p // 16] * (q - 32)
                                  of high 2 bits, 16 x int8 scales, d
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockFormat:
    block_size: int  # weights per block
    block_bytes: int

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.block_bytes


FORMATS = {
    "q8_0": BlockFormat(32, 34),
    "q4_0": BlockFormat(32, 18),
    "q4_1": BlockFormat(32, 20),
    "q4_k": BlockFormat(256, 144),
    "q6_k": BlockFormat(256, 210),
}


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at (even) byte `start` of every block, as float32 [..., 1]. Every block size is even, so
    the blocks read as float16 in place."""
    return blocks.view(torch.float16)[..., start // 2:start // 2 + 1].float()


_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., n] (n a multiple of 8) -> their low nibbles followed by their high nibbles [..., 2n].
    Masks eight bytes at a time as int64: three times faster than byte-wise ops."""
    words = packed.contiguous().view(torch.int64)
    return torch.cat(((words & _LOW_NIBBLES).view(torch.uint8), ((words >> 4) & _LOW_NIBBLES).view(torch.uint8)),
                     dim=-1)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[..., 2:].contiguous().view(torch.int8).float().mul_(_f16(blocks, 0))


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _nibbles(blocks[..., 2:]).float().sub_(8).mul_(_f16(blocks, 0))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _nibbles(blocks[..., 4:]).float().mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _q4_k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes [..., 12] -> the 6-bit scales and mins of the 8 sub-blocks, each [..., 8]. Bytes 0-3 hold
    scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; sub-blocks 4-7 keep their low 4 bits in bytes
    8-11 (scale low nibble, min high nibble) and their top 2 bits in the spare top bits of bytes 0-7."""
    lo, mid, hi = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = torch.cat((lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)), dim=-1)
    mins = torch.cat((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), dim=-1)
    return scales.float(), mins.float()


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    scales, mins = _q4_k_scales(blocks[..., 4:16])
    groups = blocks[..., 16:].unflatten(-1, (4, 32))  # [..., 4 groups, 32 bytes]
    q = _nibbles(groups).unflatten(-1, (2, 32)).flatten(-3, -2).float()  # [..., 8 sub-blocks, 32]
    w = (_f16(blocks, 0) * scales).unsqueeze(-1) * q - (_f16(blocks, 2) * mins).unsqueeze(-1)
    return w.flatten(-2)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    low = blocks[..., :128].unflatten(-1, (2, 64))  # per half of 128 weights: 64 bytes of low bits
    high = blocks[..., 128:192].unflatten(-1, (2, 32))  # and 32 bytes of high bits, 2 per weight
    # positions 0-63 of a half take the low nibbles of its 64 bytes, 64-127 the high ones; position p's
    # top two bits are bits 2 * (p // 32) of high byte p % 32
    top = torch.cat([(high >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1)
    q = (_nibbles(low) | (top << 4)).flatten(-2).float() - 32  # [..., 256]
    scales = blocks[..., 192:208].contiguous().view(torch.int8).float()  # one per 16 weights
    return (_f16(blocks, 208) * scales).repeat_interleave(16, dim=-1) * q


_DEQUANTIZE = {"q8_0": _q8_0, "q4_0": _q4_0, "q4_1": _q4_1, "q4_k": _q4_k, "q6_k": _q6_k}


def dequantize(data: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """uint8 rows [R, row_bytes] of format `qtype` -> float32 [R, cols]."""
    fmt = FORMATS[qtype]
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != fmt.row_bytes(cols):
        raise ValueError(f"{qtype} rows of {cols} weights are uint8 [R, {fmt.row_bytes(cols)}], got "
                         f"{data.dtype} {tuple(data.shape)}")
    blocks = data.contiguous().view(data.shape[0], cols // fmt.block_size, fmt.block_bytes)
    return _DEQUANTIZE[qtype](blocks).reshape(data.shape[0], cols)
