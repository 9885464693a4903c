"""Turning raw clock readings into the figures the benchmarks report, the same way for every side."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyFigures:
    """Single-request latency: time to first token and the decode rate after it."""

    ttft_s: float
    decode_tok_s: float


def latency_from_token_times(t_submit: float, token_times: list[float]) -> LatencyFigures:
    """`token_times[i]` is when token i became visible; decode rate = (n - 1) / (t_last - t_first)."""
    if len(token_times) < 2:
        raise ValueError(f"need at least 2 generated tokens to measure decode speed, got {len(token_times)}")
    decode_s = token_times[-1] - token_times[0]
    return LatencyFigures(token_times[0] - t_submit, (len(token_times) - 1) / decode_s)


def median_latency(samples: list[LatencyFigures]) -> LatencyFigures:
    """Median of each figure separately: one slow repeat (a page fault, a noisy neighbour) is ignored."""
    return LatencyFigures(
        statistics.median(s.ttft_s for s in samples),
        statistics.median(s.decode_tok_s for s in samples),
    )


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """A ratio when both sides ran, else None (a side skipped or failed is not a zero)."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator
