"""Builds the CPU kernels (plain C++, loaded with ctypes) at install time, so start-up compiles nothing.

One source tree is compiled once per instruction-set variant, each with its own target flags (never
-march=native: a wheel built on one machine must run on another); the C++ picks its code paths from the
compiler's target macros (csrc/simd.h) and tokenforge.kernels loads the best variant the CPU supports.
The emulated variant computes the AVX-512 BF16 dot product with AVX-512F instructions, so the bf16 kernels
are testable on CPUs without that extension. AMX has no variant of its own: large bf16 matmuls reach AMX
tiles through oneDNN, and AMX CPUs load the avx512bf16 variant.
"""

import copy
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "src/tokenforge/csrc"
SOURCES = [f"{CSRC}/{name}.cpp"
           for name in ("paged_attention", "gemv", "fused", "panel_gemm", "bf16_gemm", "quant_matmul", "quant_rows",
                        "decode_layers", "variant", "evict", "kv_copy")]
COMMON = ["-O3", "-ffast-math", "-fopenmp", "-std=c++17"]

AVX2 = ["-mavx2", "-mfma", "-mf16c"]
AVX512 = AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]
# variant name -> target flags; keep in step with VARIANTS in src/tokenforge/kernel_lib.py
VARIANTS = {
    "avx2": AVX2,
    "avx512": AVX512,
    "avx512bf16": AVX512 + ["-mavx512bf16"],
    "avx512bf16emu": AVX512 + ["-DTF_BF16_EMULATE"],
}



class BuildVariants(build_ext):
    """Compiles each variant's objects in a folder of its own: the variants share source paths, and in one
    folder (setuptools' default) parallel builds would overwrite each other's objects."""

    def build_extension(self, ext):
        own = copy.copy(self)  # a copy per extension: the parallel builds run in threads sharing `self`
        own.build_temp = os.path.join(self.build_temp, ext.name.rsplit(".", 1)[-1])
        build_ext.build_extension(own, ext)


setup(
    cmdclass={"build_ext": BuildVariants},
    ext_modules=[
        Extension(
            f"tokenforge._cpu_kernels_{name}",
            sources=SOURCES,
            depends=[f"{CSRC}/simd.h", f"{CSRC}/quant.h"],
            language="c++",
            extra_compile_args=COMMON + flags,
            # -Bsymbolic: each variant's calls between its own functions stay inside that library, even with
            # several variants loaded in one process (the tests load all of them)
            extra_link_args=["-fopenmp", "-Wl,-Bsymbolic"],
            optional=True,  # without a compiler (or on a non-x86 CPU) the engine falls back to plain torch paths
        )
        for name, flags in VARIANTS.items()
    ],
    options={"build_ext": {"parallel": os.cpu_count() or 1}},
)
