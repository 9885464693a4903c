"""The llama.cpp peer's runners read its tools' output correctly and turn every failure into an error line.
Fake tools stand in for llama.cpp, which the project never depends on."""

import json
import stat

from tokenforge.bench.llamacpp import run_llama_bench, run_llama_perplexity

BENCH_JSON = [
    {"build_commit": "abc123", "n_prompt": 512, "n_gen": 0, "avg_ts": 323.5},
    {"build_commit": "abc123", "n_prompt": 0, "n_gen": 128, "avg_ts": 124.25},
]


def _tool(bin_dir, name, script):
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_llama_bench_figures_are_read_from_its_json(tmp_path):
    _tool(tmp_path, "llama-bench", f"cat <<'EOF'\n{json.dumps(BENCH_JSON)}\nEOF\n")
    result = run_llama_bench(str(tmp_path), "m.gguf", threads=2)
    assert (result.prefill_tok_s, result.decode_tok_s, result.version) == (323.5, 124.25, "abc123")
    assert result.error is None


def test_failures_come_back_as_errors(tmp_path):
    missing = run_llama_bench(str(tmp_path / "nowhere"), "m.gguf", threads=2)
    assert missing.prefill_tok_s is None and "llama-bench" in missing.error and "--peer-bin" in missing.error
    _tool(tmp_path, "llama-bench", "echo 'error: failed to load model' >&2; exit 1\n")
    failed = run_llama_bench(str(tmp_path), "m.gguf", threads=2)
    assert "exited 1" in failed.error and "failed to load model" in failed.error


def test_perplexity_reads_the_final_estimate(tmp_path):
    _tool(tmp_path, "llama-perplexity", "echo '[1]12.5,[2]13.1'; echo 'Final estimate: PPL = 13.0421 +/- 0.51' >&2\n")
    assert run_llama_perplexity(str(tmp_path), "m.gguf", "t.txt", 512, 2).perplexity == 13.0421
    _tool(tmp_path, "llama-perplexity", "echo 'too few tokens' >&2; exit 1\n")
    assert "no final estimate" in run_llama_perplexity(str(tmp_path), "m.gguf", "t.txt", 512, 2).error


def test_peer_args_reach_the_tool(tmp_path):
    _tool(tmp_path, "llama-bench", f"echo \"$@\" > {tmp_path}/argv\ncat <<'EOF'\n{json.dumps(BENCH_JSON)}\nEOF\n")
    assert run_llama_bench(str(tmp_path), "m.gguf", threads=2, extra_args=["--repack", "0"]).error is None
    assert (tmp_path / "argv").read_text().split()[-2:] == ["--repack", "0"]
    _tool(tmp_path, "llama-perplexity", f"echo \"$@\" > {tmp_path}/argv; echo 'Final estimate: PPL = 2.0' >&2\n")
    assert run_llama_perplexity(str(tmp_path), "m.gguf", "t.txt", 512, 2, extra_args=["-b", "64"]).perplexity == 2.0
    assert (tmp_path / "argv").read_text().split()[-2:] == ["-b", "64"]
