"""`bench structured` end to end against the real test server: every answer the max_tokens cap did not cut
is valid, the overheads are computed from both sides, and the server's mask times are read."""

import argparse
import asyncio

import pytest

from tests.server.conftest import MODEL
from tokenforge.bench.structured import run

pytestmark = pytest.mark.timeout(240)


def test_bench_structured_against_the_test_server(live):
    args = argparse.Namespace(base_url=live.url, model=MODEL, concurrency=3, repeats=1, max_tokens=120,
                              timeout=120)
    facts = asyncio.run(run(args))
    uncut = facts["num_answers"] - facts["num_cut_by_max_tokens"]
    assert facts["num_answers"] == 8 + 3 and uncut > 0
    assert facts["valid_fraction"] == pytest.approx(uncut / facts["num_answers"])
    assert facts["batch1"]["free_tok_s"] > 0 and -1 < facts["overhead_c16"] < 1
    assert facts["mask_ms_p99"] >= facts["mask_ms_p50"] > 0
