"""`tokenforge serve`'s cluster options and their one mapping to `ClusterConfig` (no Ray import here)."""

from __future__ import annotations

import argparse

from tokenforge.cluster.router import ROUTERS


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replicas on Ray (any of these serves through Ray; --threads and "
                             "--kv-cache-memory then apply per replica)")
    g.add_argument("--replicas", type=int, help="engine replicas behind this server, as Ray actors")
    g.add_argument("--ray-address", help="join this Ray cluster (e.g. auto, or HEAD_IP:6379) instead of "
                   "starting a local one")
    g.add_argument("--router", choices=ROUTERS, default="kv-aware", help="how requests pick a replica "
                   "(default kv-aware)")
    g.add_argument("--prefill-replicas", type=int, help="prefill/decode disaggregation: replicas that prefill "
                   "long prompts (with --decode-replicas)")
    g.add_argument("--decode-replicas", type=int, help="replicas that decode (and prefill short prompts)")
    g.add_argument("--pd-threshold", type=int, default=256,
                   help="prompts of at least this many tokens are prefilled on a prefill replica (default 256)")
    g.add_argument("--min-replicas", type=int, help="the planner keeps at least this many replicas")
    g.add_argument("--max-replicas", type=int, help="and at most this many, from queue depth and TTFT")
    g.add_argument("--ttft-target", type=float, default=2.0, help="planner: TTFT p50 target in seconds (default 2)")
    g.add_argument("--step-deadline", type=float, default=30.0,
                   help="a replica with work that finishes no step for this long is restarted and its "
                   "requests resume elsewhere (default 30 s)")


def wants_cluster(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) is not None for name in
               ("replicas", "ray_address", "prefill_replicas", "decode_replicas", "min_replicas", "max_replicas"))


def cluster_config(args: argparse.Namespace):
    """Raises ValueError (ConfigError) naming the flag for inconsistent options."""
    from tokenforge.cluster.config import ClusterConfig
    from tokenforge.cluster.pd import PDConfig
    from tokenforge.cluster.planner import PlannerConfig
    from tokenforge.config import ConfigError

    pd = planner = None
    if (args.prefill_replicas is None) != (args.decode_replicas is None):
        raise ConfigError("give both --prefill-replicas and --decode-replicas, or neither")
    if args.prefill_replicas is not None:
        if args.replicas is not None:
            raise ConfigError("--replicas counts mixed replicas; with --prefill-replicas/--decode-replicas leave "
                              "it out")
        if args.no_prefix_caching:
            raise ConfigError("prefill/decode disaggregation ships KV blocks through the prefix cache; drop "
                              "--no-prefix-caching")
        pd = PDConfig(args.prefill_replicas, args.decode_replicas, args.pd_threshold)
    if args.min_replicas is not None or args.max_replicas is not None:
        low = args.min_replicas or 1
        planner = PlannerConfig(low, args.max_replicas or max(low, args.replicas or 1), target_ttft=args.ttft_target)
    return ClusterConfig(num_replicas=args.replicas or 1, router=args.router, pd=pd, planner=planner,
                         threads_per_replica=args.threads or 1, ray_address=args.ray_address,
                         step_deadline=args.step_deadline)
