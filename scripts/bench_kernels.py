"""Kernel A/B benchmarks: every variant this machine runs (and optionally an older build), in one process.

Not a test. Variants take turns within each repetition (the order rotates), each repetition times a loop of
calls, and the figure is the median over repetitions, so drift in the machine's load hits every variant
alike. Matmul weights cycle through enough copies to exceed the last-level cache, so each call streams its
weights from memory as a decode step does. Run with one thread for relative comparisons:

    .venv/bin/python scripts/bench_kernels.py --threads 1 --suite f32 [--baseline /path/to/old.so]
    .venv/bin/python scripts/bench_kernels.py --threads 1 --suite overhead
    .venv/bin/python scripts/bench_kernels.py --threads 1 --suite bandwidth
    .venv/bin/python scripts/bench_kernels.py --threads 1 --suite quant   (GB/s of the 1-row path, paths by rows)
"""
# ruff: noqa: B023  (every timed closure runs inside the loop iteration that defines it)

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from collections.abc import Callable

import torch

from tokenforge import kernels
from tokenforge.kernel_lib import CpuKernels, VariantUnavailable, load_variant

STREAM_BYTES = 96 << 20  # weight copies per case: twice this machine's 48 MB L3


CLOCK = {"clock": time.perf_counter, "stat": statistics.median}


def ab(cases: dict[str, Callable[[], object]], reps: int = 15, min_s: float = 0.01) -> dict[str, float]:
    """Median seconds per call of each case; cases alternate (rotating order) within every repetition.
    With one thread the clock is the thread's CPU time (CLOCK["clock"]): time spent descheduled while other
    processes run does not count, which on a shared machine is most of the noise."""
    clock = CLOCK["clock"]
    names = list(cases)
    inner = {}
    for n in names:  # warm up and size each case's loop to about min_s
        cases[n]()
        t = time.perf_counter()
        cases[n]()
        inner[n] = max(1, int(min_s / max(time.perf_counter() - t, 1e-7)))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            f, k = cases[n], inner[n]
            t = clock()
            for _ in range(k):
                f()
            times[n].append((clock() - t) / k)
    return {n: CLOCK["stat"](v) for n, v in times.items()}


def show(title: str, res: dict[str, float], ref: str | None = None, extra: Callable[[str, float], str] | None = None):
    ref = ref or next(iter(res))
    cells = []
    for n, t in res.items():
        cell = f"{n} {t * 1e6:9.1f} us ({res[ref] / t:4.2f}x)"
        if extra:
            cell += " " + extra(n, t)
        cells.append(cell)
    print(f"{title:34s} " + " | ".join(cells), flush=True)


def cycling(make: Callable[[], object], bytes_each: int) -> Callable[[], object]:
    """A getter cycling through enough copies made by make() to stream STREAM_BYTES."""
    copies = [make() for _ in range(max(2, STREAM_BYTES // max(bytes_each, 1)))]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]
    return nxt


def legacy(path: str) -> CpuKernels:
    """An older single-variant build (same C entry points, fewer of them) wrapped like a variant."""
    lib = ctypes.CDLL(path)
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    sigs = {"tf_paged_attention": (i, [i, i] + [p] * 5 + [i, p, p, p] + [i] * 4 + [f, i]),
            "tf_supported_head_dim": (i, [i]), "tf_skinny_matmul": (i, [i, p, p, p, i, i, i]),
            "tf_panel_matmul": (i, [p] * 3 + [i] * 3), "tf_rms_norm": (None, [p] * 3 + [i] * 2 + [f]),
            "tf_add_rms_norm": (None, [p] * 4 + [i] * 2 + [f]), "tf_silu_mul": (None, [p] * 2 + [i] * 2),
            "tf_rotary_store_kv": (i, [p] + [i] * 5 + [p] * 6 + [i])}
    for name, (res, args) in sigs.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = res, args
    obj = object.__new__(CpuKernels)
    obj.lib, obj.name = lib, "baseline"
    return obj


def variants(names: list[str], baseline: str | None) -> dict[str, CpuKernels]:
    out = {"baseline": legacy(baseline)} if baseline else {}
    for n in names:
        try:
            out[n] = load_variant(n)
        except VariantUnavailable as e:
            print(f"# skipped: {e}")
    return out


SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2-135M: qkv, o, gate/up, down


def suite_f32(vs: dict[str, CpuKernels]) -> None:
    print("## panel GEMM (float32 weights, streamed)")
    for n, k in SHAPES:
        get = cycling(lambda n=n, k=k: kernels.pack_panels(torch.randn(n, k)), n * k * 4)
        for rows in (1, 4, 16, 32, 64):
            x = torch.randn(rows, k)
            show(f"panel {n}x{k} rows={rows}",
                 ab({v: (lambda c=c: c.panel_matmul(x, get(), n)) for v, c in vs.items()}))
    print("## skinny matmul (streamed)")
    for dtype in (torch.float32, torch.bfloat16):
        for n, k in SHAPES:
            get = cycling(lambda n=n, k=k, d=dtype: torch.randn(n, k).to(d), n * k * dtype.itemsize)
            for rows in (1, 4, 8):
                x = torch.randn(rows, k)
                show(f"skinny {str(dtype)[6:]} {n}x{k} rows={rows}",
                     ab({v: (lambda c=c: c.skinny_matmul(x, get())) for v, c in vs.items()}))
    print("## paged attention (9 heads, 3 KV heads, D 64, 16 requests)")
    for dtype in (torch.float32, torch.bfloat16):
        for seq, q_len in ((512, 1), (2048, 1), (512, 8)):
            bs, reqs = 16, 16
            blocks = reqs * seq // bs
            kc = torch.randn(blocks, bs, 3, 64).to(dtype)
            vc = torch.randn(blocks, bs, 3, 64).to(dtype)
            tables = torch.randperm(blocks).view(reqs, seq // bs).to(torch.int32)
            sl = torch.full((reqs,), seq, dtype=torch.int32)
            qs = torch.arange(0, reqs * q_len + 1, q_len, dtype=torch.int32)
            q = torch.randn(reqs * q_len, 9, 64)
            show(f"attention {str(dtype)[6:]} seq={seq} q_len={q_len}",
                 ab({v: (lambda c=c: c.paged_attention(q, kc, vc, tables, sl, qs, 0.125, None))
                     for v, c in vs.items()}))
    print("## fused elementwise")
    for rows in (1, 16, 64):
        x, d, w = torch.randn(rows, 576), torch.randn(rows, 576), torch.randn(576)
        show(f"rms_norm rows={rows}", ab({v: (lambda c=c: c.rms_norm(x, w, 1e-5)) for v, c in vs.items()}))
        show(f"add_rms_norm rows={rows}", ab({v: (lambda c=c: c.add_rms_norm(x, d, w, 1e-5)) for v, c in vs.items()}))
        gu = torch.randn(rows, 3072)
        show(f"silu_mul rows={rows}", ab({v: (lambda c=c: c.silu_mul(gu)) for v, c in vs.items()}))
        qkv = torch.randn(rows, 960)
        cos, sin = torch.randn(4096, 32), torch.randn(4096, 32)
        pos, slots = torch.randint(0, 4096, (rows,)), torch.randperm(1024)[:rows]
        for cache_dtype in (torch.float32, torch.bfloat16):
            kc, vc = torch.zeros(1024, 3, 64, dtype=cache_dtype), torch.zeros(1024, 3, 64, dtype=cache_dtype)
            show(f"rotary_store {str(cache_dtype)[6:]} rows={rows}",
                 ab({v: (lambda c=c: c.rotary_store_kv(qkv, 9, 3, 64, cos, sin, pos, kc, vc, slots))
                     for v, c in vs.items()}))


def suite_overhead(vs: dict[str, CpuKernels]) -> None:
    """What the boundary checks cost per call: the checked method against the bare ctypes call."""
    c = next(v for n, v in vs.items() if n != "baseline")
    x, w = torch.randn(1, 64), torch.randn(64)
    out = torch.empty_like(x)
    lib = c.lib
    res = ab({
        "checked rms_norm (2 tensors)": lambda: c.rms_norm(x, w, 1e-5),
        "bare ctypes call + empty_like": lambda: lib.tf_rms_norm(x.data_ptr(), w.data_ptr(),
                                                                 torch.empty_like(x).data_ptr(), 1, 64, 1e-5),
        "bare ctypes call": lambda: lib.tf_rms_norm(x.data_ptr(), w.data_ptr(), out.data_ptr(), 1, 64, 1e-5),
    }, reps=21)
    show("rms_norm 1x64 per call", res)
    from tokenforge.kernel_checks import F32, ptr
    res = ab({"ptr() check": lambda: ptr("f", "x", x, F32), "data_ptr() alone": lambda: x.data_ptr()}, reps=21)
    show("one tensor", res)


def suite_bandwidth(threads: list[int]) -> None:
    """This machine's read bandwidth: a sum over a 1 GiB float32 tensor (torch's vectorized reduction)."""
    for t in threads:
        print(f"read bandwidth, {t} thread(s): {bandwidth(t):.1f} GB/s (torch.sum over 1 GiB, best of 5)")


def _gguf_blocks(qtype: str, n: int, k: int) -> torch.Tensor:
    import gguf
    import numpy as np

    from tokenforge.kernel_quant import QTYPES
    if qtype in ("q8_0", "q4_0", "q4_1"):
        w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
        return torch.from_numpy(gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, qtype.upper())))
    q = QTYPES[qtype]
    raw = torch.randint(0, 256, (n, k // q.block, q.block_bytes), dtype=torch.uint8)
    if qtype == "q4_k":
        raw[..., 0:4] = torch.tensor([0x1F, 0x20, 0x1F, 0x24], dtype=torch.uint8)  # small fp16 d, dmin
    else:
        raw[..., 208:210] = torch.tensor([0x1F, 0x20], dtype=torch.uint8)
    return raw.reshape(n, -1).contiguous()


# SmolLM2 gate/up and down (K-quants need K % 256 == 0: 512 for 576) and a 7B-class square
QUANT_SHAPES = {32: [(3072, 576), (576, 1536), (4096, 4096)], 256: [(3072, 512), (512, 1536), (4096, 4096)]}


def bandwidth(threads: int) -> float:
    """Read GB/s of torch.sum over 1 GiB of float32 (vectorized reduction, all threads), best of 5; timed
    with the same clock as the kernels (thread CPU time at one thread)."""
    big = torch.ones(1 << 28)
    torch.set_num_threads(threads)
    clock = CLOCK["clock"] if threads == 1 else time.perf_counter
    best = min(_timed(lambda: big.sum(), clock) for _ in range(5))
    return big.numel() * 4 / best / 1e9


def _timed(f: Callable[[], object], clock: Callable[[], float]) -> float:
    t = clock()
    f()
    return clock() - t


FORMATS = {"list": ["q8_0", "q4_0", "q4_1", "q4_k", "q6_k"]}


def suite_quant(vs: dict[str, CpuKernels], threads: int) -> None:
    from tokenforge.kernel_quant import QTYPES
    print(f"## read bandwidth probe before: {bandwidth(threads):.1f} GB/s ({threads} threads)")
    torch.set_num_threads(threads)
    print("## 1-row path: int8 activations vs float32 activations (weights streamed); GB/s of weight bytes read")
    for qtype in FORMATS["list"]:
        for n, k in QUANT_SHAPES[QTYPES[qtype].block]:
            nbytes = n * QTYPES[qtype].row_bytes(k)
            get = cycling(lambda: _gguf_blocks(qtype, n, k), nbytes)
            x = torch.randn(1, k)
            cases = {}
            for v, c in vs.items():
                cases[f"{v}/int8"] = lambda c=c: c.quant_matmul(x, get(), qtype, n, k)
                if qtype != "q6_k":
                    cases[f"{v}/f32"] = lambda c=c: c.quant_matmul(x, get(), qtype, n, k, f32_activations=True)
            show(f"{qtype} {n}x{k} ({nbytes / 1e6:.1f} MB) t={threads}", ab(cases),
                 extra=lambda name, t, b=nbytes: f"{b / t / 1e9:5.1f} GB/s")
    print(f"## read bandwidth probe after: {bandwidth(threads):.1f} GB/s ({threads} threads)")
    torch.set_num_threads(threads)
    print("## rows: the int8 kernel vs dequantize + torch GEMM (the active variant)")
    from tokenforge import kernels as kk
    c = kk.ACTIVE
    for qtype in ("q4_0", "q4_k", "q8_0"):
        n, k = 3072, QUANT_SHAPES[QTYPES[qtype].block][0][1]
        data = _gguf_blocks(qtype, n, k)
        for rows in (1, 4, 16, 32, 64, 128, 256):
            x = torch.randn(rows, k)
            show(f"{qtype} {n}x{k} rows={rows}", ab({
                "int8": lambda: c.quant_matmul(x, data, qtype, n, k),
                "dequant+gemm": lambda: kk._dequant_matmul(x, data, qtype, k, c)}, reps=7))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--suite", choices=["f32", "overhead", "bandwidth", "quant"], default="f32")
    ap.add_argument("--variants", default="avx2,avx512")
    ap.add_argument("--baseline", help="an older _cpu_kernels .so to compare with (same entry points)")
    ap.add_argument("--formats", default=",".join(FORMATS["list"]), help="GGUF formats for --suite quant")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="per case over repetitions (min: the least disturbed run, for oversubscribed machines)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.threads == 1:
        CLOCK["clock"] = time.thread_time
    CLOCK["stat"] = min if args.stat == "min" else statistics.median
    from tokenforge.platform import cpu_features
    f = cpu_features()
    print(f"# cpu: {f.model_name}; flags: {' '.join(sorted(f.flags))}; threads {args.threads}; "
          f"clock: {CLOCK['clock'].__name__}; {args.stat} of repetitions; load average {os.getloadavg()[0]:.1f}")
    vs = variants(args.variants.split(","), args.baseline)
    if args.suite == "f32":
        suite_f32(vs)
    elif args.suite == "overhead":
        suite_overhead(vs)
    elif args.suite == "quant":
        FORMATS["list"] = args.formats.split(",")
        suite_quant(vs, args.threads)
    else:
        suite_bandwidth(sorted({1, args.threads, 2}))


if __name__ == "__main__":
    main()
