"""The cluster's configuration (`ClusterConfig`, checked once) and starting or joining Ray for it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from tokenforge.cluster.pd import PDConfig
from tokenforge.cluster.planner import PlannerConfig

logger = logging.getLogger(__name__)

MIXED, PREFILL, DECODE = "mixed", "prefill", "decode"


@dataclass(frozen=True)
class ClusterConfig:
    num_replicas: int = 1  # mixed replicas (prefill and decode both), unless `pd` is set
    router: str = "kv-aware"
    pd: PDConfig | None = None
    planner: PlannerConfig | None = None
    threads_per_replica: int = 1
    gpus_per_replica: float = 0
    ray_address: str | None = None  # None: start a local Ray instance ("auto": join the one running here)
    step_deadline: float = 30.0  # seconds without a finished step, while a replica has work, that read as a hang
    poll_timeout: float = 0.5
    failover_timeout: float = 120.0  # how long a request waits for some replica to take it
    start_timeout: float = 300.0  # replicas must be up within this at start
    resync_interval: float = 30.0  # KV index snapshots, whatever the events say
    kv_ttl: float = 10.0  # how long a routed request's predicted blocks count before their events arrive

    def __post_init__(self):
        if self.pd is None and self.planner is None and self.num_replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.num_replicas}")
        if self.pd is not None and self.planner is not None:
            raise ValueError("the planner scales mixed replicas; use --min/--max-replicas without "
                             "--prefill-replicas/--decode-replicas")
        if self.threads_per_replica < 1:
            raise ValueError(f"--threads must be >= 1 per replica, got {self.threads_per_replica}")
        if not self.step_deadline > 0:
            raise ValueError(f"--step-deadline must be > 0 seconds, got {self.step_deadline}")

    def roles(self) -> list[str]:
        if self.pd is not None:
            return [PREFILL] * self.pd.num_prefill + [DECODE] * self.pd.num_decode
        count = self.planner.min_replicas if self.planner is not None else self.num_replicas
        return [MIXED] * count


def init_ray(config: ClusterConfig) -> None:
    """Start a local Ray instance sized for the replicas (or join `ray_address`), quietly."""
    import ray

    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    if config.ray_address is not None:
        ray.init(address=config.ray_address, **kwargs)
        return
    needed = len(config.roles()) * config.threads_per_replica
    if config.planner is not None:
        needed = config.planner.max_replicas * config.threads_per_replica
    cores = len(os.sched_getaffinity(0))
    if needed > cores:
        logger.warning("%d replicas x %d threads ask for %d CPUs on a machine with %d: they will share cores",
                       len(config.roles()), config.threads_per_replica, needed, cores)
    ray.init(num_cpus=max(needed, cores), **kwargs)
