"""`tokenforge bench`: throughput, latency and prefix-cache benchmarks against transformers (and vLLM).

Benchmarks are not tests: nothing here is run by pytest's timing-free suite except a smoke check, and
the engine core never imports this package. Entry points for the main CLI: `add_bench_parser`, `run_bench`.
"""

from tokenforge.bench.cli import add_bench_parser, run_bench

__all__ = ["add_bench_parser", "run_bench"]
