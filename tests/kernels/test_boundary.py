"""Every tensor handed to a C kernel is checked first: a tensor on another device (a meta tensor stands in
for CUDA), of the wrong dtype or not contiguous raises a TypeError/ValueError naming the argument, for
every public wrapper of every variant, instead of the kernel reading the wrong memory.

Arguments a wrapper documents as copied (a matmul's x, attention's q, the residual delta) accept views, so
the non-contiguous case corrupts another argument of the same call.
"""

import pytest
import torch

from tests import kernel_variants
from tokenforge import kernels
from tokenforge.kernels import QTYPES


@pytest.fixture(params=kernel_variants.NAMES)
def cpu(request):
    return kernel_variants.load(request.param)


def _q4_0(n: int, k: int) -> torch.Tensor:
    return kernels.quant_quantize(torch.randn(n, k), "q4_0") if kernels.ACTIVE else torch.zeros(
        n, QTYPES["q4_0"].row_bytes(k), dtype=torch.uint8)


def _kv_copy(cpu):
    pools = [torch.randn(4, 2, 8) for _ in range(2)]
    pointers = cpu.kv_pool_pointers(pools)
    return lambda block_ids, rows, host: cpu.kv_copy_blocks(pools, pointers, block_ids, rows, host, True)


def _cases(cpu):
    """wrapper name -> (call taking keyword arguments, good arguments, the argument to corrupt)."""
    x = torch.randn(2, 64)
    kc = torch.randn(4, 8, 2, 16)
    attn = dict(q=torch.randn(3, 4, 16), k_cache=kc, v_cache=kc.clone(),
                block_tables=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                seq_lens=torch.tensor([5, 9], dtype=torch.int32),
                query_start=torch.tensor([0, 1, 3], dtype=torch.int32),
                scale=0.25, sliding_window=None)
    rot = dict(qkv=torch.randn(3, 8 * 16), num_heads=4, num_kv_heads=2, head_dim=16, cos=torch.randn(32, 8),
               sin=torch.randn(32, 8), positions=torch.tensor([1, 2, 3]), k_cache=torch.zeros(10, 2, 16),
               v_cache=torch.zeros(10, 2, 16), slots=torch.tensor([0, 4, 9]))
    data = _q4_0(8, 64)
    return {
        "skinny_matmul": (cpu.skinny_matmul, dict(x=x, weight=torch.randn(8, 64)), "weight"),
        "skinny_matmul_int8": (cpu.skinny_matmul_int8, dict(x=x, weight=torch.ones(8, 64, dtype=torch.int8),
                                                             scale=torch.ones(8)), "scale"),
        "panel_matmul": (cpu.panel_matmul, dict(x=x, packed=kernels.pack_panels(torch.randn(8, 64)), n=8), "packed"),
        "bf16_matmul": (cpu.bf16_matmul, dict(x=x, weight=torch.randn(8, 64).bfloat16()), "weight"),
        "paged_attention": (cpu.paged_attention, attn, "k_cache"),
        "paged_attention/tables": (cpu.paged_attention, attn, "block_tables"),
        "rms_norm": (cpu.rms_norm, dict(x=x, weight=torch.randn(64), eps=1e-5), "x"),
        "add_rms_norm": (cpu.add_rms_norm, dict(x=x, delta=x.clone(), weight=torch.randn(64), eps=1e-5), "x"),
        "silu_mul": (cpu.silu_mul, dict(gate_up=x), "gate_up"),
        "rotary_store_kv": (cpu.rotary_store_kv, rot, "k_cache"),
        "rotary_store_kv/positions": (cpu.rotary_store_kv, rot, "positions"),
        "quant_matmul": (cpu.quant_matmul, dict(x=x, data=data, qtype="q4_0", n=8, k=64), "data"),
        "quant_dequantize_rows": (cpu.quant_dequantize_rows, dict(data=data, qtype="q4_0", k=64,
                                                                  ids=torch.tensor([1, 0])), "ids"),
        "quant_quantize": (cpu.quant_quantize, dict(weight=torch.randn(8, 64), qtype="q8_0"), "weight"),
        "apply_bitmask": (cpu.apply_bitmask,
                          dict(logits=torch.randn(64), words=torch.full((2,), -1, dtype=torch.int32)), "words"),
        "kv_copy_blocks": (_kv_copy(cpu), dict(block_ids=torch.tensor([1, 0]), rows=torch.tensor([0, 1]),
                                                 host=torch.zeros(2, 2, 2, 8)), "host"),
        "kv_copy_blocks/rows": (_kv_copy(cpu), dict(block_ids=torch.tensor([1, 0]), rows=torch.tensor([0, 1]),
                                                      host=torch.zeros(2, 2, 2, 8)), "rows"),
        "evict": (lambda t: cpu.evict(t), dict(t=torch.randn(64)), None),
    }


def _wrong_dtype(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16 if t.is_floating_point() else torch.int16)


def _not_contiguous(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([t, t], dim=-1)[..., 0]  # same shape and values, every stride doubled


CORRUPT = {"meta": lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), "dtype": _wrong_dtype,
           "not contiguous": _not_contiguous}


@pytest.mark.parametrize("how", list(CORRUPT))
@pytest.mark.parametrize("case", [
    "skinny_matmul", "skinny_matmul_int8", "panel_matmul", "bf16_matmul", "paged_attention",
    "paged_attention/tables", "rms_norm", "add_rms_norm", "silu_mul", "rotary_store_kv",
    "rotary_store_kv/positions", "quant_matmul", "quant_dequantize_rows", "quant_quantize", "apply_bitmask",
    "kv_copy_blocks", "kv_copy_blocks/rows"])
def test_each_wrapper_refuses_a_wrong_tensor(cpu, case, how):
    call, kwargs, arg = _cases(cpu)[case]
    bad = dict(kwargs, **{arg: CORRUPT[how](kwargs[arg])})
    expected = TypeError if how == "dtype" else ValueError
    with pytest.raises(expected, match=arg) as err:
        call(**bad)
    assert case.split("/")[0] in str(err.value)  # names the function too
    if case != "bf16_matmul" or cpu.bf16_dot != "none":
        call(**kwargs)  # and the good arguments pass


def test_error_messages_say_what_was_expected(cpu):
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match=r"weight must be a CPU tensor, got torch.float32 \(8, 64\) on meta"):
        cpu.skinny_matmul(torch.randn(1, 64), w.to("meta"))
    with pytest.raises(TypeError, match=r"weight must have dtype torch.float32 or torch.bfloat16, got torch.float16"):
        cpu.skinny_matmul(torch.randn(1, 64), w.half())
    with pytest.raises(ValueError, match=r"weight must be contiguous.*strides \(1, 8\)"):
        cpu.skinny_matmul(torch.randn(1, 64), torch.randn(64, 8).T)
    with pytest.raises(TypeError, match="must be a torch.Tensor, got ndarray"):
        cpu.skinny_matmul(torch.randn(1, 64), w.numpy())
    with pytest.raises(ValueError, match="agree on K"):
        cpu.skinny_matmul(torch.randn(1, 63), w)
    with pytest.raises(ValueError, match="evict"):
        cpu.evict(torch.randn(4).to("meta"))


def test_public_quant_functions_check_their_tensors():
    data = _q4_0(8, 64)
    meta = torch.empty(data.shape, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match="quant_pack: data must be a CPU tensor"):
        kernels.quant_pack(meta, "q4_0", 8, 64)
    with pytest.raises(ValueError, match="quant_pack: data must be contiguous"):
        kernels.quant_pack(_not_contiguous(data), "q4_0", 8, 64)
    with pytest.raises(TypeError, match="quant_pack: data must have dtype torch.uint8"):
        kernels.quant_pack(data.to(torch.int16), "q4_0", 8, 64)
    packed = kernels.quant_pack(data, "q4_0", 8, 64)
    with pytest.raises(ValueError, match="quant_matmul: x must be a CPU tensor"):
        kernels.quant_matmul(torch.empty(1, 64, device="meta"), packed)
    with pytest.raises(TypeError, match="quant_matmul: x must have dtype torch.float32"):
        kernels.quant_matmul(torch.randn(1, 64, dtype=torch.float64), packed)
    for bad, err in ((torch.empty(2, dtype=torch.int64, device="meta"), ValueError),
                     (torch.tensor([1, 2], dtype=torch.int32), TypeError),
                     (_not_contiguous(torch.tensor([1, 2])), ValueError)):
        with pytest.raises(err, match="quant_rows: ids"):
            kernels.quant_rows(bad, packed)
    for bad, err in ((torch.empty(8, 64, device="meta"), ValueError), (torch.randn(8, 64).double(), TypeError),
                     (_not_contiguous(torch.randn(8, 64)), ValueError)):
        with pytest.raises(err, match="quant_quantize: weight"):
            kernels.quant_quantize(bad, "q8_0")
