"""The planner: how many replicas the fleet should have, from queue depth and measured time to first token.

Each tick the client hands it a `FleetSample`; it answers +1 (start a replica), -1 (drain one and remove
it) or 0. Hysteresis keeps the fleet from flapping: scaling up needs `up_after` overloaded ticks in a
row, scaling down `down_after` idle ones, and after any change nothing moves for `cooldown` seconds
(a new replica needs time to load and to take load off the others before it can be judged).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlannerConfig:
    min_replicas: int
    max_replicas: int
    target_ttft: float = 2.0  # seconds; TTFT p50 above this is overload
    queue_high: float = 4.0  # waiting requests per replica above which the fleet is overloaded
    queue_low: float = 0.5  # waiting per replica below which (and TTFT under half the target) it is idle
    up_after: int = 3
    down_after: int = 10
    cooldown: float = 30.0
    interval: float = 2.0  # seconds between ticks

    def __post_init__(self):
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= --min-replicas <= --max-replicas, got {self.min_replicas} and "
                             f"{self.max_replicas}")
        if not self.target_ttft > 0:
            raise ValueError(f"--ttft-target must be > 0 seconds, got {self.target_ttft}")


@dataclass(frozen=True)
class FleetSample:
    num_replicas: int  # serving or starting (draining ones excluded)
    num_waiting: int  # requests queued in the replicas and in the client, not yet running
    ttft_p50: float | None  # over the recent window; None without recent requests


class Planner:
    def __init__(self, config: PlannerConfig):
        self.config = config
        self._hot = 0
        self._cold = 0
        self._last_change: float | None = None

    def decide(self, sample: FleetSample, now: float) -> int:
        cfg = self.config
        if sample.num_replicas < cfg.min_replicas:
            return self._change(+1, now)
        if sample.num_replicas > cfg.max_replicas:
            return self._change(-1, now)
        per_replica = sample.num_waiting / max(sample.num_replicas, 1)
        ttft = sample.ttft_p50
        overloaded = per_replica > cfg.queue_high or (ttft is not None and ttft > cfg.target_ttft)
        idle = per_replica < cfg.queue_low and (ttft is None or ttft < cfg.target_ttft / 2)
        self._hot = self._hot + 1 if overloaded else 0
        self._cold = self._cold + 1 if idle else 0
        if self._last_change is not None and now - self._last_change < cfg.cooldown:
            return 0
        if self._hot >= cfg.up_after and sample.num_replicas < cfg.max_replicas:
            return self._change(+1, now)
        if self._cold >= cfg.down_after and sample.num_replicas > cfg.min_replicas:
            return self._change(-1, now)
        return 0

    def _change(self, delta: int, now: float) -> int:
        self._hot = self._cold = 0
        self._last_change = now
        return delta
