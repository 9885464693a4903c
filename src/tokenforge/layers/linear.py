"""Linear layers computed from weights prepared once at load time for the CPU, with float32 outputs.

A layer keeps the weight copies its paths need and takes, per call, the path measured fastest for that
many rows on this machine (matmul_plan.py; `plan.crossovers()` and kernels.kernel_report() show
the choice):
- float32 (and float16) weights: the panel kernel (weights packed into 6-column panels, read once for up
  to 16 or 32 rows while the arithmetic overlaps the stream: decode batches) or oneDNN's GEMM on a copy
  reordered into its blocked layout (as vLLM's CPU backend and torch's inductor do: prefill).
- bf16 weights on a CPU with bf16 dot products (avx512_bf16 or AMX): bf16 stays bf16 for every matmul: the
  bf16 dot-product kernel (vdpbf16ps, float32 sums) for few rows and oneDNN's bf16 GEMM for many (AMX tiles
  where present: with `ONEDNN_VERBOSE=1` its `inner_product` lines name the implementation, e.g. a `brg`
  one with `amx`). Activations are rounded to bf16. No float32 copy is kept.
- bf16 weights elsewhere: the skinny kernel reads bf16 directly (half the bytes of float32) for up to 8
  rows; more rows use a float32 oneDNN copy (without bf16 units, bf16 GEMMs are slower than float32 ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenforge import kernels, matmul_plan
from tokenforge.kernel_lib import CpuKernels
from tokenforge.matmul_plan import Candidate, MatmulPlan
from tokenforge.platform import cpu_features

# The batch size oneDNN tunes the packed layout for; measured best overall between 1 and 1024 rows.
_PACK_FOR_ROWS = 64
ACTIVE = object()  # Linear's default `cpu`: the process's kernel variant (kernels.ACTIVE) at construction


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_FOR_ROWS)
    except (RuntimeError, AttributeError):  # a torch build without the op: plain matmuls still work
        return None


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (so bf16 weights never need a float32 copy)."""
    return cpu_features().has("avx512_bf16") or cpu_features().has("amx_bf16")


class Linear(torch.nn.Module):
    """y = x @ W^T (+ b) with x, y in float32. `weight_dtype` records the checkpoint's precision; `cpu` is the
    kernel variant to use (default: the process's; None: torch paths only). `keep_all_paths` keeps every
    weight copy, not only those the plan uses, so that each path can be run (tests)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, cpu: CpuKernels | None | object = ACTIVE,
                 keep_all_paths: bool = False):
        super().__init__()
        self.cpu: CpuKernels | None = kernels.ACTIVE if cpu is ACTIVE else cpu
        self.weight_dtype = weight.dtype
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.float()
        bf16 = weight.dtype == torch.bfloat16
        self.kind = "bf16-native" if bf16 and native_bf16() and self._bf16_dot() else "bf16" if bf16 else "float32"
        self.plain = weight.contiguous() if bf16 else weight.float().contiguous()
        self.panels = self.packed = None
        if self.kind == "float32" and self.cpu is not None:
            self.panels = kernels.pack_panels(self.plain)
        if self.kind == "bf16-native":
            self.packed = _pack(self.plain)  # bf16 in oneDNN's layout
        else:
            self.packed = _pack(self.plain.float())
        self.plan = self._calibrated_plan(weight)
        if not keep_all_paths:
            self._keep_only(self.plan.paths())

    def _bf16_dot(self) -> bool:
        return self.cpu is not None and self.cpu.bf16_dot != "none"

    def candidates(self) -> dict[str, Candidate]:
        """Every path this layer's copies allow, by name (tests run each against the reference)."""
        out: dict[str, Candidate] = {}
        cpu, n = self.cpu, self.out_features
        if self.panels is not None:
            out["panel"] = Candidate(lambda x: cpu.panel_matmul(x, self.panels, n), weights=(self.panels,))
        if self.kind == "bf16" and cpu is not None:
            out["skinny"] = Candidate(lambda x: cpu.skinny_matmul(x, self.plain), max_rows=kernels.SKINNY_MAX_ROWS,
                                      weights=(self.plain,))
        if self.kind.startswith("bf16") and self._bf16_dot():
            out["bf16_dot"] = Candidate(lambda x: cpu.bf16_matmul(x, self.plain), weights=(self.plain,))
        if self.packed is not None and self.packed.dtype == torch.bfloat16:
            out["onednn_bf16"] = Candidate(lambda x: torch.ops.mkldnn._linear_pointwise(
                x.to(torch.bfloat16), self.packed, None, "none", [], "").float(), large=True, weights=(self.packed,))
        elif self.packed is not None:
            out["onednn"] = Candidate(lambda x: torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [],
                                                                                   ""),
                                      large=True, weights=(self.packed,))
        if not any(c.large for c in out.values()):
            out["torch"] = Candidate(lambda x: F.linear(x, self.plain.float()), large=True)
        return out

    def _calibrated_plan(self, weight: torch.Tensor) -> MatmulPlan:
        key = matmul_plan.plan_key(self.kind, self.out_features, self.in_features,
                                   None if self.cpu is None else self.cpu.name)
        plan = matmul_plan.cached(key)
        if plan is not None:
            return plan
        rows = matmul_plan.calibration_rows(self.out_features, self.in_features)
        if rows < self.out_features:  # time a slice: a layer of its own, whose plan lands in the cache
            Linear(weight[:rows].clone(), None, self.cpu)
            return matmul_plan.cached(key)
        evict = (lambda *weights: None) if self.cpu is None else self.cpu.evict
        return matmul_plan.calibrate(key, self.candidates(), self.in_features, evict)

    def _keep_only(self, paths: set[str]) -> None:
        """Free the copies no planned path reads; keep one the dense weight can be rebuilt from."""
        if "panel" not in paths and self.panels is not None:
            self.panels = None
        if not paths & {"onednn", "onednn_bf16"}:
            self.packed = None
        if not paths & {"skinny", "bf16_dot", "torch"} and self.panels is not None:
            self.plain = None  # the panels hold the float32 weight

    def dense_weight(self) -> torch.Tensor:
        """W [out, in] in the checkpoint's precision (float32 or bf16), rebuilt from the panels if need be."""
        if self.plain is not None:
            return self.plain
        return kernels.unpack_panels(self.panels, self.out_features, self.in_features)

    def run_path(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """x through one named path (see candidates()), bias included."""
        y = self.candidates()[path].run(x)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.plan.path_for(x.shape[0])
        cpu = self.cpu
        if path == "panel":
            y = cpu.panel_matmul(x, self.panels, self.out_features)
        elif path == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        elif path == "skinny":
            y = cpu.skinny_matmul(x, self.plain)
        elif path == "bf16_dot":
            y = cpu.bf16_matmul(x, self.plain)
        elif path == "onednn_bf16":
            y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, None, "none", [], "").float()
        else:
            return F.linear(x, self.plain.float(), self.bias)
        return y if self.bias is None else y + self.bias
