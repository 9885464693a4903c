"""The ctypes boundary: every tensor handed to a C kernel is checked here before its data pointer is used.

A tensor must be on the CPU (a CUDA or meta tensor has no host pointer), of a dtype the kernel reads and
contiguous; the kernels' wrappers (kernel_lib.py, kernel_quant.py) add the dims they index by. A wrong
tensor raises a TypeError (dtype) or ValueError (device, layout, shape) naming the function and the argument,
with what was expected and what came. The passing case costs three attribute reads per tensor.
"""

from __future__ import annotations

import torch

F32 = (torch.float32,)
BF16 = (torch.bfloat16,)
F32_BF16 = (torch.float32, torch.bfloat16)
I32 = (torch.int32,)
I64 = (torch.int64,)
I8 = (torch.int8,)
U8 = (torch.uint8,)


def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} {tuple(t.shape)} on {t.device}{'' if t.is_contiguous() else ', not contiguous'}"


def ptr(fn: str, name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> int:
    """t's data pointer, once t is a contiguous CPU tensor of one of `dtypes`. The common case costs three
    attribute reads; only a wrong tensor pays for building the message."""
    try:
        if t.is_cpu and t.dtype in dtypes and t.is_contiguous():
            return t.data_ptr()
    except AttributeError:
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}") from None
    expected = " or ".join(str(d) for d in dtypes)
    if not t.is_cpu:
        raise ValueError(f"{fn}: {name} must be a CPU tensor, got {_describe(t)} (the CPU kernels read host "
                         "memory; move it with .cpu() or use the device's own path)")
    if t.dtype not in dtypes:
        raise TypeError(f"{fn}: {name} must have dtype {expected}, got {_describe(t)}")
    raise ValueError(f"{fn}: {name} must be contiguous, got {_describe(t)} with strides {t.stride()} "
                     "(pass .contiguous())")


def shape_error(fn: str, name: str, expected: str, t: torch.Tensor) -> ValueError:
    return ValueError(f"{fn}: {name} must be {expected}, got shape {tuple(t.shape)}")


# The shape checks index .shape and call .dim()/.numel() only: building and comparing torch.Size tuples costs
# several times more, and these run on every call of a decode step.


def check_matmul(fn: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"{fn}: x [M, K] and weight [N, K] must agree on K, got x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")


def check_rows(fn: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.numel() != x.shape[1]:  # the kernel reads H weights, whatever their shape
        raise ValueError(f"{fn}: x must be [T, H] and weight [H], got x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")
