"""`tokenforge bench serve`: the figures' definitions, and a real run against the live test server."""

from __future__ import annotations

import argparse
import json
import math
import statistics

import numpy as np
import pytest

from tokenforge.bench import serve as bs
from tokenforge.bench.cli import main as bench_main
from tokenforge.bench.workload import ThroughputShape, make_workload

from .conftest import MODEL

pytestmark = pytest.mark.timeout(120)


def test_percentile_matches_numpy():
    values = sorted([3.0, 1.0, 7.5, 2.25, 9.0, 4.0, 4.0])
    for q in (0, 25, 50, 90, 99, 100):
        assert bs.percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_parse_len_and_range_ratio():
    assert bs.parse_len("128") == (128, 128)
    assert bs.parse_len("32:512") == (32, 512)
    for bad in ("0", "9:3", "x", "1:y"):
        with pytest.raises(argparse.ArgumentTypeError):
            bs.parse_len(bad)
    assert bs.with_ratio((100, 100), 0.5) == (50, 150)
    assert bs.with_ratio((10, 20), 0.5) == (10, 20)  # an explicit range is kept as given


def test_poisson_arrivals_have_the_asked_rate():
    gaps = bs.arrival_delays(4000, rate=8.0, burstiness=1.0, seed=1)
    assert gaps[0] == 0.0
    assert statistics.mean(gaps[1:]) == pytest.approx(1 / 8, rel=0.06)
    # exponential gaps: standard deviation equals the mean
    assert statistics.stdev(gaps[1:]) == pytest.approx(1 / 8, rel=0.1)
    assert bs.arrival_delays(5, rate=math.inf, burstiness=1.0, seed=1) == [0.0] * 5


def test_pareto_front_drops_dominated_points():
    points = [(10.0, 5.0), (20.0, 8.0), (15.0, 9.0), (30.0, 20.0), (5.0, 6.0)]
    assert bs.pareto_front(points) == [(10.0, 5.0), (20.0, 8.0), (30.0, 20.0)]


def _args(**over) -> argparse.Namespace:
    base = dict(dataset="random", num_prompts=10, input_len=(32, 512), output_len=(16, 256), range_ratio=0.0,
                seed=0, prefix_len=20, num_prefixes=3)
    return argparse.Namespace(**{**base, **over})


def test_random_prompts_are_the_offline_benchmarks_prompts():
    requests = bs.build_requests(_args(), vocab_size=500)
    offline = make_workload(ThroughputShape(10, (32, 512), (16, 256), ()), 500, 0)
    assert [r.prompt for r in requests] == offline.prompt_token_ids
    assert [r.output_len for r in requests] == offline.output_lens


def test_shared_prefix_prompts_share_their_prefixes():
    requests = bs.build_requests(_args(dataset="shared-prefix", input_len=(5, 9)), vocab_size=500)
    prefixes = {tuple(r.prompt[:20]) for r in requests}
    assert len(prefixes) == 3
    assert all(5 <= len(r.prompt) - 20 <= 9 for r in requests)


def _bench(live, llama_dir, *extra) -> list[str]:
    return ["serve", "--base-url", live.url, "--model", MODEL, "--tokenizer", str(llama_dir), "--num-prompts", "6",
            "--input-len", "8:24", "--output-len", "3:9", "--no-progress", *extra]


def test_bench_serve_against_the_live_server(live, llama_dir, capsys):
    assert bench_main(_bench(live, llama_dir, "--max-concurrency", "3", "--json")) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["completed"] == 6 and figures["failed"] == 0
    # ignore_eos + max_tokens: every request yields exactly what it asked for
    assert figures["total_output_tokens"] == figures["workload"]["total_output_tokens_asked"]
    assert figures["output_tok_s"] > 0 and figures["request_throughput"] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        row = figures[key]
        assert 0 < row["median"] <= row["p90"] <= row["p99"], key
    assert figures["ttft_ms"]["p99"] <= figures["e2el_ms"]["p99"]


def test_bench_serve_sweep_writes_plot_and_json(live, llama_dir, tmp_path, capsys):
    stem = tmp_path / "sweep"
    assert bench_main(_bench(live, llama_dir, "--sweep", "--sweep-rates", "20,inf", "--sweep-out", str(stem))) == 0
    data = json.loads(stem.with_suffix(".json").read_text())
    assert [r["request_rate"] for r in data["runs"]] == [20.0, "inf"]
    assert all(r["completed"] == 6 for r in data["runs"])
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_bench_serve_unknown_model_fails_clearly(live, llama_dir):
    args = _bench(live, llama_dir)
    args[args.index(MODEL)] = "no-such-model"
    with pytest.raises(SystemExit, match="warm-up request .* failed: HTTP 404"):
        bench_main(args)
