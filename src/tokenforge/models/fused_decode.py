"""All decoder layers of a decode step in one compiled call (csrc/decode_layers.cpp).

At batch 1 a 30-layer model makes some 300 kernel calls per token; from Python each costs its checks, a new
output tensor and the interpreter's dispatch, together as long as the kernels' own work on a 135M-parameter
GGUF model. The compiled loop runs the same kernels in the same order, so a step gives bitwise the same
numbers either way. It serves steps where every row is a decode row (plain decode, speculative
verification) of a Llama-family model whose linear layers each take one compiled kernel at every row count
the step may have: GGUF block weights on their int8 path, dense float32 weights on the panel kernel, bf16
weights on the skinny or bf16 dot-product kernel. Anything else (prefill chunks, Qwen3's q/k norms, a
measured plan that hands few rows to oneDNN or torch, no compiled kernels) takes the layer-by-layer path.
TOKENFORGE_FUSED_DECODE=0 turns it off.
"""

from __future__ import annotations

import os

import torch

from tokenforge.attention.cpu import CpuAttention, kernel_available
from tokenforge.kernel_decode import DENSE_CODES, MAX_PARTS, DecodeLayer, decode_layer, decode_linear
from tokenforge.kernel_quant import QTYPES

_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def enabled() -> bool:
    return os.environ.get("TOKENFORGE_FUSED_DECODE", "1") != "0"


def _parts(linear: torch.nn.Module) -> list[torch.nn.Module]:
    """A fused projection's layers: its parts when kept in several formats (ConcatLinear), else itself."""
    from tokenforge.layers.factory import ConcatLinear

    return list(linear.parts) if isinstance(linear, ConcatLinear) else [linear]


def _dense_code(lin: torch.nn.Module) -> int | None:
    """The loop's code for a dense layer's kernel at one row, or None when its plan takes another path."""
    path = lin.plan.path_for(1)
    if path == "skinny":
        return DENSE_CODES["skinny_bf16" if lin.plain.dtype == torch.bfloat16 else "skinny_f32"]
    return DENSE_CODES.get(path) if path in ("panel", "bf16_dot") else None


def _part(lin: torch.nn.Module) -> tuple[torch.Tensor, int, int, torch.Tensor | None]:
    """(weights, code, rows, bias) of one part for decode_linear."""
    from tokenforge.layers.quant_linear import QuantLinear

    if isinstance(lin, QuantLinear):
        return lin.data, QTYPES[lin.qtype].ggml_id, lin.out_features, lin.bias
    code = _dense_code(lin)
    return lin.panels if code == DENSE_CODES["panel"] else lin.plain, code, lin.out_features, lin.bias


def _struct(name: str, linear: torch.nn.Module):
    parts = _parts(linear)
    return decode_linear("fused_decode", name, parts[0].in_features, [_part(p) for p in parts])


def _fused_rows(linear: torch.nn.Module, limit: int = 64) -> int:
    """How many rows (up to `limit`) the layer's measured plan sends to the kernel the loop runs for it,
    counting from one: the int8 path of GGUF weights, a dense layer's path at one row."""
    from tokenforge.layers.quant_linear import QuantLinear

    quant = isinstance(linear, QuantLinear)
    plan = linear.packed.plan if quant else linear.plan
    path = "int8" if quant else plan.path_for(1)
    rows = 0
    while rows < limit and plan.path_for(rows + 1) == path:
        rows += 1
    return rows


def _kernels(lin: torch.nn.Module):
    """The kernel variant a layer runs on, or None when the loop cannot run it."""
    from tokenforge.layers.linear import Linear
    from tokenforge.layers.quant_linear import QuantLinear

    if isinstance(lin, QuantLinear):
        return lin.packed.cpu if lin.qtype in QTYPES else None  # None too where it has no compiled kernels
    if isinstance(lin, Linear) and lin.cpu is not None and _dense_code(lin) is not None:
        return lin.cpu
    return None


class FusedDecode:
    """The compiled layer loop bound to one model; `run` takes a step when it can."""

    def __init__(self, model: torch.nn.Module, cpu):
        self.model = model
        self.cpu = cpu
        cfg, first = model.cfg, model.layers[0]
        self.shape = (cfg.hidden_size, first.num_heads, first.num_kv_heads, first.head_dim, cfg.intermediate_size)
        self.eps = first.input_norm.eps
        self.scale = first.scale
        self.linears = [{name.removesuffix("_proj"): _struct(f"layers.{i}.{name}", getattr(layer, name))
                         for name in _LINEARS} for i, layer in enumerate(model.layers)]
        self._layers: tuple[tuple[int, ...], object] | None = None  # (cache pointers, DecodeLayer array)
        # the most rows every linear layer takes on its int8 path
        self._max_rows = min(_fused_rows(part) for layer in model.layers for name in _LINEARS
                             for part in _parts(getattr(layer, name)))

    @classmethod
    def build(cls, model: torch.nn.Module) -> FusedDecode | None:
        """The loop for `model`, or None where a layer needs something it does not do."""
        if not enabled() or not model.layers:
            return None
        cpus = set()
        for layer in model.layers:
            attention = layer.attention
            if layer.q_norm is not None or not isinstance(attention, CpuAttention) or not attention.use_kernel:
                return None
            for name in _LINEARS:
                parts = _parts(getattr(layer, name))
                if not parts or len(parts) > MAX_PARTS:
                    return None
                for lin in parts:
                    cpu = _kernels(lin)
                    if cpu is None:
                        return None
                    cpus.add(cpu)
        if len(cpus) != 1:
            return None
        fused = cls(model, cpus.pop())
        return fused if fused._max_rows > 0 else None

    def _bind(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
        """The layers' structs with this pool's caches (rebuilt only when the pool changes)."""
        key = tuple(k.data_ptr() for k, _ in kv_caches) + (kv_caches[0][0].dtype.itemsize,)
        if self._layers is None or self._layers[0] != key:
            arr = (DecodeLayer * len(self.linears))(*(
                decode_layer("fused_decode", layer.input_norm.weight, layer.post_norm.weight, lins, k, v)
                for layer, lins, (k, v) in zip(self.model.layers, self.linears, kv_caches)))
            self._layers = (key, arr)
        return self._layers[1]

    def run(self, model: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor, meta, kv_caches) -> bool:
        """Run every layer over x in place and return True, or return False (x untouched) when this step
        is not one the loop takes (or `model` is a shallow copy with other layers, as a draft is)."""
        t = x.shape[0]
        if (model is not self.model or meta.prefills or meta.num_decode_tokens != t or t > self._max_rows
                or x.dtype != torch.float32
                or positions.dtype != torch.int64 or meta.slot_mapping.dtype != torch.int64
                or len(kv_caches) != len(self.linears)):
            return False
        k0 = kv_caches[0][0]
        if not kernel_available(self.shape[3], k0.dtype):
            return False
        rotary = self.model.rotary
        self.cpu.decode_layers(self._bind(kv_caches), x, self.shape, self.eps, self.scale, rotary.cos, rotary.sin,
                               positions.contiguous(), meta.slot_mapping.contiguous(), k0.dtype, k0.shape[1],
                               meta.sliding_window, meta.decode_block_tables, meta.decode_seq_lens,
                               meta.decode_query_start, meta.decode_row_masks)
        return True
