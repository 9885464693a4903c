"""Builds the CPU kernels (plain C++, loaded with ctypes) at install time, so start-up compiles nothing."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tokenforge._cpu_kernels",
            sources=["src/tokenforge/csrc/paged_attention.cpp", "src/tokenforge/csrc/gemv.cpp",
                     "src/tokenforge/csrc/fused.cpp", "src/tokenforge/csrc/panel_gemm.cpp"],
            depends=["src/tokenforge/csrc/simd.h"],
            language="c++",
            extra_compile_args=["-O3", "-march=native", "-ffast-math", "-fopenmp", "-std=c++17"],
            extra_link_args=["-fopenmp"],
            optional=True,  # without a compiler the engine falls back to plain torch paths
        )
    ]
)
