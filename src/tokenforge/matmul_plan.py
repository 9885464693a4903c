"""Which matmul path serves how many rows: measured on this machine when a layer is built, cached per process.

A linear layer can compute x @ W^T several ways (its paths: the panel kernel, the skinny kernel, the bf16
dot-product kernel, oneDNN's packed GEMM in float32 or bf16; for GGUF blocks, the int8 kernel or a float
GEMM over dequantized weights), each fastest over some range of row counts.
Where the ranges meet depends on the CPU's vector units, its caches, the thread count and the weight's
shape, so instead of constants tuned on another machine the first layer of each shape times its paths on a
ladder of row counts (the best of alternating runs: on a shared machine other processes only ever add
time, so the minimum is the least disturbed figure) and keeps the fastest at each rung. A call with `rows`
rows then takes the path of the first rung >= rows (the last rung's path beyond the ladder).

In a decode step every weight comes from memory (a model's weights are many times the caches), so each
timed run first evicts the weights its path reads from every cache level (clflushopt, where the CPU has it).
Calibration runs on at most CALIBRATION_BYTES of the weight (the time of every path grows linearly with the
output columns) and stops early once the big-batch GEMM has won two rungs in a row from 16 rows on. It
costs tens to hundreds of milliseconds per distinct shape at load time; the plans are cached per (weight
kind, calibrated shape, kernel variant, thread count). The plan keeps one crossover (see calibrate).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

LADDER = (1, 2, 4, 8, 16, 32, 48, 64, 128)  # 48: a chat turn's short chunk after a cached history
CALIBRATION_BYTES = 4 << 20  # float32 bytes of weight timed per shape
REPEATS = 3


@dataclass(frozen=True)
class Candidate:
    """One way to compute the layer: `run(x)` for x of up to `max_rows` rows (None: any). `large` marks the
    GEMMs built for big batches (prefill): past the ladder only they serve."""

    run: Callable[[torch.Tensor], torch.Tensor]
    max_rows: int | None = None
    large: bool = False
    weights: tuple[torch.Tensor, ...] = ()  # what it reads, evicted from the caches before each timed run


@dataclass(frozen=True)
class MatmulPlan:
    """The fastest path at each rung of row counts, ascending."""

    rungs: tuple[tuple[int, str], ...]

    @staticmethod
    def single(path: str) -> MatmulPlan:
        return MatmulPlan(((LADDER[-1], path),))

    def path_for(self, rows: int) -> str:
        for limit, path in self.rungs:
            if rows <= limit:
                return path
        return self.rungs[-1][1]

    def paths(self) -> set[str]:
        return {path for _, path in self.rungs}

    def crossovers(self) -> list[tuple[int, str]]:
        """(largest row count, path) per run of rungs with the same path: the readable form of the plan."""
        out: list[tuple[int, str]] = []
        for limit, path in self.rungs:
            if out and out[-1][1] == path:
                out[-1] = (limit, path)
            else:
                out.append((limit, path))
        return out


_PLANS: dict[tuple, MatmulPlan] = {}


def calibration_rows(out_features: int, in_features: int) -> int:
    """How many output columns of a weight calibration times."""
    return max(1, min(out_features, CALIBRATION_BYTES // (4 * in_features)))


def plan_key(kind: str, out_features: int, in_features: int, variant: str | None) -> tuple:
    return (kind, calibration_rows(out_features, in_features), in_features, variant, torch.get_num_threads())


def cached(key: tuple) -> MatmulPlan | None:
    return _PLANS.get(key)


def _time(c: Candidate, x: torch.Tensor, evict: Callable[..., None]) -> int:
    evict(*c.weights)
    start = time.perf_counter_ns()
    c.run(x)
    return time.perf_counter_ns() - start


def _fastest(able: dict[str, Candidate], x: torch.Tensor, evict: Callable[..., None]) -> dict[str, int]:
    """Each path's best time on x. Paths alternate, so drift in the machine's load hits all of them; when
    the two best are within 10 % after REPEATS runs, up to 2 * REPEATS runs settle it."""
    for c in able.values():
        c.run(x)  # warm-up: scratch buffers, first-touch pages, oneDNN's kernel for this shape
    best: dict[str, int] = {n: 1 << 62 for n in able}
    for rep in range(2 * REPEATS):
        for n, c in able.items():
            best[n] = min(best[n], _time(c, x, evict))
        ranked = sorted(best.values())
        if rep + 1 >= REPEATS and (len(ranked) < 2 or ranked[1] > 1.1 * ranked[0]):
            break
    return best


def calibrate(key: tuple, candidates: dict[str, Candidate], in_features: int,
              evict: Callable[..., None] = lambda *weights: None) -> MatmulPlan:
    """Time `candidates` (built on the calibration slice of the weight) up the ladder; cache the plan.
    `evict(*tensors)` flushes tensors from the caches (CpuKernels.evict).

    The plan has one crossover: the big-batch GEMM takes over from the first rung from which it wins every
    rung measured; below it the fastest of the other paths serves (a lone GEMM win at few rows is noise)."""
    large = {name for name, c in candidates.items() if c.large} or set(candidates)
    small = set(candidates) - large
    measured: list[tuple[int, dict[str, int]]] = []
    if small:
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for rows in LADDER:
                x = torch.randn(rows, in_features, generator=g)
                able = {n: c for n, c in candidates.items() if c.max_rows is None or rows <= c.max_rows}
                measured.append((rows, _fastest(able, x, evict)))
                winners = [min(t, key=t.get) for _, t in measured[-2:]]
                if rows >= 16 and len(winners) == 2 and all(w in large for w in winners):
                    break
    plan = plan_from_times(measured, large)
    _PLANS[key] = plan
    return plan


def plan_from_times(measured: list[tuple[int, dict[str, int]]], large: set[str]) -> MatmulPlan:
    """The plan from each rung's best times per path (ascending rows): one crossover to the `large` paths,
    at the first rung from which they win every rung measured."""
    cross = len(measured)
    while cross > 0 and min(measured[cross - 1][1], key=measured[cross - 1][1].get) in large:
        cross -= 1
    rungs = []
    for i, (rows, t) in enumerate(measured):
        pool = [n for n in t if (n in large) == (i >= cross)] or list(t)
        rungs.append((rows, min(pool, key=t.get)))
    last = measured[-1][1] if measured else {}
    if not rungs or rungs[-1][1] not in large:  # beyond the ladder: the GEMM fastest at the last rung
        rungs.append((2 * rungs[-1][0] if rungs else LADDER[-1], min(large, key=lambda n: last.get(n, 0))))
    return MatmulPlan(tuple(rungs))


def report() -> dict[str, list[tuple[int, str]]]:
    """The plans measured in this process: 'kind N K variant threads' -> [(up to rows, path), ...]."""
    return {" ".join(str(p) for p in key): plan.crossovers() for key, plan in _PLANS.items()}
