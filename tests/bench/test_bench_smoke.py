"""Smoke test of `tokenforge bench`: the plumbing runs end to end on a tiny model. Nothing is timed
against a threshold; benchmarks are not tests."""

import json
import sys

import pytest
import torch

from tokenforge.bench import add_bench_parser, reference, run_bench
from tokenforge.bench.cli import dtype_name, main
from tokenforge.bench.make_model import make_model
from tokenforge.bench.peer import run_vllm
from tokenforge.bench.workload import QUICK_THROUGHPUT, ThroughputShape, batches, make_workload


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(make_model(tmp_path_factory.mktemp("bench") / "tiny", "tiny", seed=0))


def test_make_model_writes_a_complete_checkpoint(tiny_model):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert (config.num_hidden_layers, config.hidden_size) == (2, 64)
    assert len(tokenizer) == config.vocab_size
    assert tokenizer.eos_token_id == config.eos_token_id == 2
    assert tokenizer.decode(tokenizer("t7 t4095")["input_ids"]) == "t7 t4095"


def test_workload_is_deterministic_and_in_range():
    shape = ThroughputShape(50, (32, 512), (16, 256), (8,))
    first, again = make_workload(shape, 4096, seed=3), make_workload(shape, 4096, seed=3)
    assert first == again
    assert make_workload(shape, 4096, seed=4).prompt_token_ids != first.prompt_token_ids
    assert first.num_requests == 50
    assert all(32 <= len(p) <= 512 for p in first.prompt_token_ids)
    assert all(16 <= n <= 256 for n in first.output_lens)
    assert all(3 <= t < 4096 for p in first.prompt_token_ids for t in p)


def test_batches_cover_every_request_once_in_order():
    assert [list(b) for b in batches(5, 2)] == [[0, 1], [2, 3], [4]]
    assert reference.effective_batch_sizes((4, 8, 16), 6) == [4, 6]


def test_reference_pads_left_and_counts_only_requested_tokens(tiny_model):
    torch.set_num_threads(1)
    model = reference.load_model(tiny_model, torch.float32)
    workload = make_workload(QUICK_THROUGHPUT, model.config.vocab_size, seed=0)
    # Left padding with a mask must not change a request's greedy tokens.
    short = workload.prompt_token_ids[0][:10]
    alone = reference.generate_batch(model, [short], 5)
    padded = reference.generate_batch(model, [short, workload.prompt_token_ids[1]], 5)
    assert torch.equal(alone[0], padded[0])

    figures = reference.run_batch_size(model, workload, 4)
    assert figures.output_tok_s > 0
    longest = [max(workload.output_lens[i] for i in b) * len(b) for b in batches(workload.num_requests, 4)]
    assert figures.num_computed_output_tokens == sum(longest) >= workload.num_output_tokens

    latency = reference.run_latency(model, [workload.prompt_token_ids[0]], 6)
    assert latency.ttft_s > 0 and latency.decode_tok_s > 0


def test_throughput_quick_end_to_end(tiny_model, capsys):
    main(["throughput", "--model", tiny_model, "--quick", "--threads", "1", "--num-requests", "4", "--json"])
    facts = json.loads(capsys.readouterr().out)
    assert facts["workload"]["num_requests"] == 4
    assert facts["tokenforge_tok_s"] > 0 and facts["reference_tok_s"] > 0
    assert facts["ratio"] == pytest.approx(facts["tokenforge_tok_s"] / facts["reference_tok_s"])
    assert [r["batch_size"] for r in facts["reference_batch_sizes"]] == [4]
    assert facts["machine"]["threads"] == 1 and "peer" not in facts


def test_latency_and_prefix_quick_end_to_end(tiny_model, capsys):
    main(["latency", "--model", tiny_model, "--quick", "--threads", "1", "--repeats", "1",
          "--prompt-len", "16", "--new-tokens", "8", "--json"])
    latency = json.loads(capsys.readouterr().out)
    assert latency["tokenforge_decode_tok_s"] > 0 and latency["reference_ttft_s"] > 0
    main(["prefix", "--model", tiny_model, "--threads", "1", "--prompt-len", "200", "--skip-reference"])
    assert "prefix-cache speed-up" in capsys.readouterr().out


def test_peer_failure_is_reported_not_raised(tiny_model, tmp_path):
    # This interpreter has no vLLM: the worker fails to import it, and that must come back as a result.
    workload = make_workload(ThroughputShape(2, (4, 8), (2, 4), (2,)), 4096, seed=0)
    log = str(tmp_path / "peer.log")
    result = run_vllm(sys.executable, tiny_model, "float32", 1, workload, 64, timeout_s=120, log_path=log)
    assert result.tok_s is None and "vllm" in result.error.lower()
    assert "Traceback" in (tmp_path / "peer.log").read_text()
    missing = run_vllm("/nonexistent/python", tiny_model, "float32", 1, workload, 64, 10, log)
    assert missing.tok_s is None and "cannot run peer python" in missing.error


def test_cli_hooks_into_a_main_parser_and_accepts_dtype_aliases():
    import argparse

    parser = argparse.ArgumentParser(prog="tokenforge")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "throughput", "--model", "m", "--dtype", "bf16", "--peer", "vllm"])
    assert (args.bench_mode, args.dtype, args.peer) == ("throughput", "bfloat16", "vllm")
    assert args.func is run_bench
    assert dtype_name("F32") == "float32"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "throughput", "--model", "m", "--dtype", "int8"])


@pytest.mark.timeout(300)
def test_spec_end_to_end_on_the_demo_model(capsys):
    """Every kind of proposer through `bench spec`, tiny sizes: the report's shape and identical outputs."""
    from tokenforge.config import DEMO_MODEL_DIR

    modes = "ngram-chain-7,draft-tree-7,self-adaptive"
    main(["spec", "--model", str(DEMO_MODEL_DIR), "--threads", "1", "--kv-cache-gib", "0.25", "--num-prompts", "2",
          "--concurrency", "3",
          "--prompt-len", "32", "--new-tokens", "12", "--repeats", "1", "--modes", modes, "--json"])
    facts = json.loads(capsys.readouterr().out)
    assert sorted(facts["proposers"]) == sorted(modes.split(","))  # the JSON is printed with sorted keys
    for r in facts["proposers"].values():
        assert r["token_identical"]
        assert 0 <= r["acceptance_rate"] <= 1 and r["mean_accepted_tokens"] >= 1
        assert r["batch1_speedup"] > 0 and len(r["concurrent_ratios"]) == 1
    assert facts["proposers"]["draft-tree-7"]["config"]["draft_model"].endswith("demo_draft_model")


def test_latency_on_a_gguf_file_with_the_reference(make_gguf, capsys):
    """A GGUF file is a --model like a folder: config and vocabulary from its metadata, transformers' side
    loading it with gguf_file=; and bench serve reads the vocabulary size from one (--tokenizer)."""
    from tests.conftest import gguf_in
    from tokenforge.bench.serve import resolve_vocab_size

    file = str(gguf_in(make_gguf("qwen2", "q8_0")))
    main(["latency", "--model", file, "--quick", "--threads", "1", "--repeats", "1", "--prompt-len", "16",
          "--new-tokens", "4", "--json"])
    latency = json.loads(capsys.readouterr().out)
    assert latency["tokenforge_decode_tok_s"] > 0 and latency["reference_ttft_s"] > 0
    args = type("Args", (), {"vocab_size": None, "tokenizer": file, "model": "served-name"})()
    assert resolve_vocab_size(args) == 380  # the fixture tokenizer's 380 tokens, under the model's 512 rows


def test_latency_beside_llama_bench_reports_ratios_and_the_bandwidth_ceiling(make_gguf, tmp_path, capsys):
    """--peer llama.cpp runs llama-bench on the same file (a fake one here) and divides; the bandwidth
    probe turns the file's weight bytes into a batch-1 decode ceiling."""
    import stat

    from tests.conftest import gguf_in

    rows = [{"build_commit": "fake", "n_prompt": 16, "n_gen": 0, "avg_ts": 100.0},
            {"build_commit": "fake", "n_prompt": 0, "n_gen": 4, "avg_ts": 50.0}]
    tool = tmp_path / "llama-bench"
    tool.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(rows)}\nEOF\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    file = gguf_in(make_gguf("llama", "q4_1"))
    main(["latency", "--model", str(file), "--threads", "1", "--repeats", "1", "--prompt-len", "16",
          "--new-tokens", "4", "--skip-reference", "--peer", "llama.cpp", "--peer-bin", str(tmp_path), "--json"])
    facts = json.loads(capsys.readouterr().out)
    assert facts["peer_prefill_tok_s"] == 100.0 and facts["peer_decode_tok_s"] == 50.0
    assert facts["peer_prefill_ratio"] == pytest.approx(facts["tokenforge_prefill_tok_s"] / 100.0)
    assert facts["peer_decode_ratio"] == pytest.approx(facts["tokenforge_tg_tok_s"] / 50.0)
    assert facts["tokenforge_prefill_tok_s"] == pytest.approx(16 / facts["tokenforge_ttft_s"])
    assert facts["weight_bytes_per_token"] < file.stat().st_size  # tensors only, as stored
    assert facts["decode_ceiling_tok_s"] == pytest.approx(
        facts["read_bandwidth_gb_s"] * 1e9 / facts["weight_bytes_per_token"])
