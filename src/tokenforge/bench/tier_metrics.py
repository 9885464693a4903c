"""What a benchmark run did to a tokenforge server's KV tiers, read from its Prometheus `/metrics` before and
after: per-tier hit rates (the share of looked-up prompt blocks each tier served) and load bandwidth.
Servers without these series (other engines) give empty figures."""

from __future__ import annotations

import re

_SERIES = re.compile(r'^tokenforge_kv_tier_(hits_total|misses_total|bytes_loaded_total|load_io_seconds_total)'
                     r'\{tier="(\d)"\} (\S+)$')
_PREFIX = re.compile(r'^tokenforge_prefix_cache_(queried|hit)_tokens_total (\S+)$')


async def tier_counters(client, base_url: str) -> dict[str, float]:
    """{"hits_total/2": 12.0, ...}; empty when the server has no KV tiers or no /metrics."""
    try:
        response = await client.get(base_url.rstrip("/") + "/metrics")
    except Exception:  # a peer without /metrics: nothing to report
        return {}
    if response.status_code != 200:
        return {}
    counters = {}
    for line in response.text.splitlines():
        match = _SERIES.match(line)
        if match:
            counters[f"{match[1]}/{match[2]}"] = float(match[3])
        match = _PREFIX.match(line)
        if match:
            counters[f"prefix_{match[1]}"] = float(match[2])
    return counters


def tier_figures(before: list[dict[str, float]], after: list[dict[str, float]]) -> dict:
    """Hit rate per tier over all lookups and load GB/s per lower tier, from counter snapshots taken around
    each server process's share of the run (a restart resets the counters)."""
    delta: dict[str, float] = {}
    for b, a in zip(before, after, strict=True):
        for key, value in a.items():
            delta[key] = delta.get(key, 0.0) + value - b.get(key, 0.0)
    figures = {}
    if delta.get("prefix_queried"):  # prompt tokens served by any cache tier (tiers on or off)
        figures["prefix_cache_hit_rate"] = round(delta.get("prefix_hit", 0.0) / delta["prefix_queried"], 4)
    lookups = delta.get("hits_total/1", 0.0) + delta.get("misses_total/1", 0.0)
    if not lookups:
        return figures
    figures |= {"kv_tier_hit_rates": {t: round(delta.get(f"hits_total/{t}", 0.0) / lookups, 4) for t in "123"},
               "kv_blocks_looked_up": int(lookups)}
    seconds = {t: delta.get(f"load_io_seconds_total/{t}", 0.0) for t in "23"}
    figures["kv_tier_load_gb_s"] = {t: round(delta.get(f"bytes_loaded_total/{t}", 0.0) / s / 1e9, 3) if s else None
                                    for t, s in seconds.items()}
    return figures


def tier_lines(figures: dict) -> list[str]:
    lines = []
    if "prefix_cache_hit_rate" in figures:
        lines.append(f"prompt tokens served by the KV cache (all tiers): {figures['prefix_cache_hit_rate']:.1%}")
    if "kv_tier_hit_rates" not in figures:
        return lines
    rates = figures["kv_tier_hit_rates"]
    gbs = figures["kv_tier_load_gb_s"]
    return lines + [f"KV hit rate per tier ({figures['kv_blocks_looked_up']} prompt blocks looked up): "
            f"L1 pool {rates['1']:.1%}, L2 host {rates['2']:.1%}, L3 disk {rates['3']:.1%}",
            "KV load bandwidth: " + ", ".join(f"L{t} {'n/a' if v is None else f'{v:.2f} GB/s'}"
                                              for t, v in gbs.items())]
