"""Run-time dispatch: CPU flags -> the best variant built for them, a forced variant, the report."""

import os
import subprocess
import sys

import pytest

from tokenforge import kernels
from tokenforge.kernel_lib import VARIANTS, VariantUnavailable, load_variant
from tokenforge.platform import CPU_FLAGS, CpuFeatures, cpu_features, parse_cpuinfo

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Example CPU @ 2.60GHz
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512dq avx512bw avx512vl avx512_vnni sha_ni
processor\t: 1
model name\t: Example CPU @ 2.60GHz
flags\t\t: fpu
"""


def _features(*flags: str) -> CpuFeatures:
    return CpuFeatures("test CPU", frozenset(flags), "test", "AVX2")


def test_cpuinfo_parsing_takes_the_first_processor():
    model, flags = parse_cpuinfo(CPUINFO)
    assert model == "Example CPU @ 2.60GHz"
    assert {"avx2", "avx512_vnni", "sha_ni"} <= flags and "avx512_bf16" not in flags
    assert parse_cpuinfo("processor : 0\n") is None
    f = cpu_features()
    assert f.flags <= set(CPU_FLAGS) and f.model_name and f is cpu_features()  # cached


def test_the_best_runnable_variant_is_chosen():
    names = {v.name for v in VARIANTS}
    avx2 = _features("avx2", "fma", "f16c")
    avx512 = _features(*next(v for v in VARIANTS if v.name == "avx512").flags)
    for features, best in ((avx2, "avx2"), (avx512, "avx512")):
        if cpu_features().missing(next(v for v in VARIANTS if v.name == best).flags):
            continue  # this machine cannot load that library at all
        assert kernels.choose_variant(None, features).name == best
    assert kernels.choose_variant(None, _features("sse2")) is None
    assert kernels.choose_variant("none") is None
    assert names >= {"avx2", "avx512", "avx512bf16", "avx512bf16emu"}


def test_forcing_a_variant_the_cpu_lacks_names_the_flag():
    with pytest.raises(VariantUnavailable, match="TOKENFORGE_CPU_ISA=avx512bf16: .*needs CPU flags avx512_bf16"):
        kernels.choose_variant("avx512bf16", _features(*next(v for v in VARIANTS if v.name == "avx512").flags))
    with pytest.raises(VariantUnavailable, match="needs CPU flags avx2, fma, f16c"):
        load_variant("avx2", _features())
    with pytest.raises(VariantUnavailable, match="not a kernel variant.*choose one of"):
        kernels.choose_variant("sse9")
    with pytest.raises(VariantUnavailable, match="AMX has no variant"):
        kernels.choose_variant("amx")


def _import_with(isa: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENFORGE_CPU_ISA=isa)
    code = "from tokenforge import kernels; print(kernels.ACTIVE.name if kernels.ACTIVE else 'none')"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_the_environment_forces_a_variant():
    runnable = [n for n, k in kernels.runnable_variants().items() if not isinstance(k, str)]
    if "avx2" in runnable:
        assert _import_with("avx2").stdout.strip() == "avx2"
    lacking = [v.name for v in VARIANTS if cpu_features().missing(v.flags)]
    if lacking:
        bad = _import_with(lacking[0])
        assert bad.returncode != 0 and "needs CPU flags" in bad.stderr


def test_runnable_variants_say_why_not():
    for name, got in kernels.runnable_variants().items():
        variant = next(v for v in VARIANTS if v.name == name)
        missing = cpu_features().missing(variant.flags)
        if missing:
            assert isinstance(got, str) and missing[0] in got
        else:
            assert not isinstance(got, str) and got.name == name


def test_report_names_cpu_variant_and_paths():
    import torch

    from tokenforge.layers.linear import Linear

    Linear(torch.randn(24, 16), None)  # at least one measured plan
    report = kernels.kernel_report()
    assert report["cpu_model"] == cpu_features().model_name
    assert set(report["cpu_flags"]) == set(cpu_features().flags)
    assert report["variant"] == (kernels.ACTIVE.name if kernels.ACTIVE else None)
    if kernels.ACTIVE is not None:
        assert report["variant"] in report["variants_built"]
        assert set(report["simd_lanes"]) == {"gemv", "panel", "attention", "fused"}
        wide = "avx512" in report["variant"]
        assert all(lanes == (16 if wide else 8) for lanes in report["simd_lanes"].values())
    assert any(key.startswith("float32 24 16") for key in report["matmul_plans"])
