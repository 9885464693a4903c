"""Builds the CPU attention kernel (plain C++, loaded with ctypes) at install time, so start-up compiles nothing."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tokenforge.attention._paged_attention_cpu",
            sources=["src/tokenforge/attention/csrc/paged_attention.cpp"],
            language="c++",
            extra_compile_args=["-O3", "-march=native", "-ffast-math", "-fopenmp", "-std=c++17"],
            extra_link_args=["-fopenmp"],
            optional=True,  # without a compiler the engine falls back to the torch attention path
        )
    ]
)
